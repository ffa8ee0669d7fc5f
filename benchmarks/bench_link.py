"""Table 2 measured: `rcst run --server` through a rate-limited loopback link.

Starts `rcst serve`'s server (the demo server model) in this process and
runs Algorithm 2 on generated demo test images for every row of Table 2
(server-only; random, top-k and attention-sum with the DeiT-Tiny edge and the
proposed method, each at its cheapest point within 1 pp of server-only in the
demo's results.json; the certified point), per codec and rate, through a
shaped link:

  tbf   (default where it works: root, `unshare`, `ip`, `tc`) the bench re-runs
        itself in a private network namespace (`unshare --net`) whose
        loopback gets MTU 1500 and a kernel `tc tbf` at the rate, burst one
        packet (`tbf.TbfLoopback`). The edge's one TCP hop is the
        relay `serving.meter.Link` (meter + one-way delay, since this kernel
        has no netem), which reaches the server over a Unix socket, off the
        shaped interface. Both directions share the one qdisc.
  user  `serving.meter.Link` paces each direction itself: 1,500-byte pieces
        at the rate, plus the delay.

Per row it prints the measured end-to-end latency of offloaded images (edge
+ encode + round trip: mean, p50, p95) next to the prediction

  edge + encode + server (decode + queue + compute) + RTT + transmission

where RTT is the link's own round trip (the median of 20 empty `Describe`
calls through it, less their transmission) and transmission is each
message's bytes on the link over the rate, less the token bucket's burst
under tbf (`tbf.transmit_s`); bytes on the link are the metered
request and reply (HTTP/2 and gRPC framing included), scaled under tbf by the
qdisc's own count (TCP/IP headers, ACKs). Also: bytes / rate + 2 x delay,
and the framing overhead (wire bytes up / payload bytes - 1). Then Table 2
measured (mean end-to-end ms per image over all images) next to the paper's
formula (cost x 147 KiB x 8 / rate). Last, the load check (unshaped): C
client processes x M requests on the certified point's payloads against the
same server in process with every payload in hand, and against the sweep's
64-row batched server, with the server process's CPU time per request.
CPU kind: print `lscpu` next to it.

  python benchmarks/bench_link.py [--images 40] [--delay-ms 5] [--link auto|tbf|user]
      [--calibration outputs/demo/calibration.json]   (`make demo` writes it)
"""

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import sys
import tempfile
import time

import common  # noqa: F401  (XLA:CPU flags first)
import jax
import numpy as np
from tbf import TbfLoopback, tbf_available, transmit_s

from rcst_edge.link.client import RemoteServer
from rcst_edge.link.meter import Link
from rcst_jax.calibration.artifact import Calibration
from rcst_jax.configs import demo as demo_config
from rcst_jax.core import spmd, xla_cpu
from rcst_jax.data.synthetic import SyntheticShapes
from rcst_jax.inference import collaborative, methods
from rcst_jax.inference import edge as edge_lib
from rcst_jax.inference.collaborative import collaborative_inference
from rcst_jax.inference.server import Server
from rcst_jax.models.checkpoints import load_model
from rcst_jax.report import styles, tables
from rcst_jax.report.tables import latency_ms
from rcst_jax.serving.service import RcstServer, ServeOptions

xla_cpu.tune_for_serving()  # this process is the server: as `rcst serve` runs it

WEIGHTS = os.path.join(os.path.dirname(common.HERE), "weights")
FULL = 224 * 224 * 3
PINGS = 20
_INSIDE = "RCST_BENCH_NETNS"  # set when this process runs in its own namespace


def _stats(x):
  return f"{np.mean(x):8.1f} {np.percentile(x, 50):8.1f} {np.percentile(x, 95):8.1f}"


# ---------------------------------------------------------------- the shaped link

def rerun_in_namespace() -> None:
  """This bench again, in a private network namespace, with --link tbf."""
  env = dict(os.environ, **{_INSIDE: "1"})
  argv = [a for a in sys.argv[1:] if not a.startswith("--link")]
  os.execvpe("unshare", ["unshare", "--net", "--", sys.executable, sys.argv[0], *argv,
                         "--link=tbf"], env)


def open_link(kind, srv, sock_path, rate_mbps, delay_s, shaper) -> Link:
  if kind == "tbf":
    shaper.set(rate_mbps * 1e6)
    return Link(sock_path, delay_s=delay_s)
  return Link(("127.0.0.1", srv.port), rate_bps=rate_mbps * 1e6, delay_s=delay_s)


def link_rtt(remote, link, shaper, rate_bps):
  """The link's round trip without payload: the median time of empty
  Describe calls less their own transmission (bytes on the link scaled by
  the qdisc's count under tbf; the user-space pacer paces the metered ones)."""
  up0, down0 = link.totals()
  q0 = shaper.sent_bytes() if shaper else 0
  times = []
  for _ in range(PINGS):
    t0 = time.perf_counter()
    remote.describe()
    times.append(time.perf_counter() - t0)
  up, down = ((a - b) / PINGS for a, b in zip(link.totals(), (up0, down0)))
  scale = (shaper.sent_bytes() - q0) / PINGS / (up + down) if shaper else 1.0
  burst = shaper.BURST if shaper else 0
  own = transmit_s(up * scale, rate_bps, burst) + transmit_s(down * scale, rate_bps, burst)
  return float(np.median(times)) - float(own)


def edges(cal, results_path, codec, edge, base, images, eta, seed):
  """{row: run(remote) -> collaborative output} for Table 2's rows: server-only,
  each method at its cheapest point within 1 pp of server-only on raw patches
  (the demo's results.json) under ``codec``, and the certified point: the proposed edge
  through `collaborative_inference` (what `rcst run --server` runs), the
  baselines' DeiT-Tiny edge through its own decision and the same
  `collaborative.transmit`."""
  layer = cal.gradcam_layer or "features"
  geo = cal.patch_geometry()
  with open(results_path) as f:
    points = json.load(f)
  server_acc = tables.server_accuracy([p for p in points if p["codec"] == "raw"])
  within = tables.operating_points([p for p in points if p["codec"] == codec], server_acc,
                                   cost_key="cost_bytes")
  probs_fn = edge_lib.softmax_fn(base, with_attn=True)
  keys = [f"bench-{i}" for i in range(len(images))]

  def proposed(point):
    return lambda remote: collaborative_inference(images, edge, None, point, remote=remote,
                                                  batch_size=16, layer=layer)

  def baseline(method, param):
    def decide():
      parts = [jax.device_get(probs_fn(edge_lib.pad_rows(images[i:i + 16], 16)))
               for i in range(0, len(images), 16)]
      probs, attn = (np.concatenate([q[k] for q in parts])[:len(images)] for k in (0, 1))
      view = edge_lib.baseline_view(edge_lib.baseline_outputs(probs, attn, eta), keys, seed,
                                    geo.num_patches)
      return methods.decide(method, view, [param])

    def run(remote):
      t0 = time.perf_counter()
      off, keep, fallback = decide()
      edge_s = (time.perf_counter() - t0) / len(images)
      out = collaborative.transmit(images, off[0], keep[0], fallback, geo, codec, remote=remote)
      return {**out, "edge_s": np.full(len(images), edge_s)}
    decide()  # untimed: compiles the edge and this method's decision, as for the proposed edge
    return run

  def server_only(remote):  # no edge: every image sent whole
    n = len(images)
    out = collaborative.transmit(images, np.ones(n, bool), np.ones((n, geo.num_patches), bool),
                                 np.zeros(n, np.int32), geo, codec, remote=remote)
    return {**out, "edge_s": np.zeros(n)}
  rows = {"Server-only": server_only}
  for m in (methods.RANDOM, methods.TOPK, methods.ATTENTION_SUM, methods.PROPOSED):
    pt = (within.get(m.name) or {}).get("within_gap")
    if pt is None:
      continue
    label = f"{styles.SHORT_NAMES[m.name]} ({m.param} {pt['param']:g})"
    rows[label] = (baseline(m, pt["param"]) if m.edge == methods.BASELINE else proposed(
        methods.OperatingPoint(cal.lambda_hat, cal.q_hat, pt["param"], codec=codec)))
  if cal.certificate is not None and cal.certificate.get("certified"):
    point = cal.operating_point(None, codec)
    rows[f"Certified (tau {point.tau:g})"] = proposed(point)
  return rows


def link_table(srv, edge, base, cal, images, codecs, rates, delay_s, kind, sock_path,
               results_path, eta, seed):
  if kind == "tbf" and os.environ.get(_INSIDE) != "1":
    raise RuntimeError("--link tbf shapes the loopback of a private namespace only")
  shaper = TbfLoopback() if kind == "tbf" else None
  print(f"\nlink: {kind}; RTT = median of {PINGS} empty calls through the link less their "
        "transmission time; per offloaded image:")
  print("rate Mb/s | codec      | method                 | n off | measured ms: mean p50 p95 | "
        "predicted mean (error) | RTT ms | bytes/rate + 2 x delay | framing %")
  payloads, summary = {}, []
  collaborative_inference(images, edge, srv.service.server.model, cal.operating_point(),
                          batch_size=16, layer=cal.gradcam_layer or "features")  # compiles
  for codec in codecs:
    for label, run in edges(cal, results_path, codec, edge, base, images, eta, seed).items():
      means = []
      for rate in rates:
        link = open_link(kind, srv, sock_path, rate, delay_s, shaper)
        remote = RemoteServer(link.address, geometry=cal.patch_geometry(), link=link)
        remote.describe()  # connection set up outside the timed images
        rtt = link_rtt(remote, link, shaper, rate * 1e6)
        q0 = shaper.sent_bytes() if shaper else 0
        out = run(remote)
        remote.close()
        off = out["offloaded"] & (out["status"] == "server")
        if not off.any():
          continue
        up, down = out["wire_up"][off], out["wire_down"][off]
        scale = (shaper.sent_bytes() - q0) / (up + down).sum() if shaper else 1.0
        total = out["edge_s"] + out["encode_s"] + out["rtt_s"]  # accepted: the edge alone
        e2e = total[off] * 1e3
        fixed = (out["edge_s"] + out["encode_s"] + out["decode_s"] + out["queue_s"]
                 + out["server_s"])[off]
        burst = shaper.BURST if shaper else 0
        transmit = (transmit_s(up * scale, rate * 1e6, burst)
                    + transmit_s(down * scale, rate * 1e6, burst))
        pred = (fixed + rtt + transmit) * 1e3
        naive = (fixed + 2 * delay_s + (up + down) * scale * 8 / (rate * 1e6)) * 1e3
        framing = 100 * (up.sum() / out["bytes"][off].sum() - 1)
        if label.startswith("Certified") and codec not in payloads:  # the load check's
          payloads[codec] = [d for d in _payloads(out, images, codec, cal)]
        err = 100 * (e2e.mean() / pred.mean() - 1)
        print(f"{rate:9g} | {codec:10s} | {label:22s} | {off.sum():5d} | {_stats(e2e)} | "
              f"{pred.mean():8.1f} ({err:+5.1f} %) | {rtt * 1e3:6.2f} | {naive.mean():22.1f} | "
              f"{framing:8.2f}")
        means.append((rate, total.mean() * 1e3, out["bytes"].sum() / (FULL * len(images))))
      summary.append((codec, label, means))
  if shaper:
    shaper.clear()
  print("\nTable 2 measured: mean end-to-end ms per image over all images (accepted ones: "
        "the edge alone), next to the paper's formula (cost x 147 KiB x 8 / rate, upload "
        "only)\n")
  print("| codec | method | byte cost | " + " | ".join(
      f"{r:g} Mb/s measured | formula" for r in rates) + " |")
  print("|---|---|---:|" + "---:|---:|" * len(rates))
  for codec, label, means in summary:
    if means:
      print(f"| {codec} | {label} | {means[0][2]:.4f} | " + " | ".join(
          f"{m:.1f} | {float(latency_ms(c, r)):.1f}" for r, m, c in means) + " |")
  return payloads


def _payloads(out, images, codec, cal):
  from rcst_edge.payload import message as payload
  for i in np.flatnonzero(out["offloaded"]):
    yield payload.encode_image_payload(images[i], out["keep"][i], cal.patch_geometry(), codec)


def _cpu_s() -> float:
  """CPU seconds of this process so far, every thread (XLA's, gRPC's) included."""
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def inprocess_rate(server, data, total, decode: bool = True, chunk: int | None = None):
  """(requests/s, CPU ms per request) of ``server`` on all of ``data`` at
  once, repeated to ``total`` requests: payloads in, logits out, as `rcst
  run`'s in-process server (``decode`` False: already decoded payloads in;
  ``chunk``: handed them that many at a time instead)."""
  decoded = [server.decode(d) for d in data]
  server.logits_from_decoded(decoded)  # compiles
  reps, chunk = max(1, total // len(data)), chunk or len(data)
  t0, c0 = time.perf_counter(), _cpu_s()
  for _ in range(reps):
    for i in range(0, len(data), chunk):
      part = data[i:i + chunk]
      server.logits_from_decoded([server.decode(d) for d in part] if decode
                                 else decoded[i:i + chunk])
  n = reps * len(data)
  return n / (time.perf_counter() - t0), (_cpu_s() - c0) / n * 1e3


def _client(address, data, per_client, k, ready, start, results):
  """One edge in its own process (as on its own device): per_client requests
  in turn, their latencies and batch sizes put on ``results``."""
  remote = RemoteServer(address, metered=False)
  remote.describe()
  ready.put(k)
  start.wait()
  lat, sizes = [], []
  for j in range(per_client):
    t = time.perf_counter()
    r = remote.classify(data[(k * per_client + j) % len(data)])
    lat.append(time.perf_counter() - t)
    sizes.append(r.batch_requests)
  remote.close()
  results.put((lat, sizes))


def load_check(srv, model, data, clients, per_client, options):
  # The references: the same server (its calls in flight too) with every
  # payload in hand at once, and the sweep's (the demo config's plain batches).
  calls = spmd.host_concurrency(options.calls_in_flight)
  same = Server(model, options.batch, tuple(options.buckets), row_by_row=True,
                concurrency=calls)
  inproc_rate, inproc_cpu = inprocess_rate(same, data, clients * per_client)
  compute_rate, _ = inprocess_rate(same, data, clients * per_client, decode=False)
  config = demo_config.get_config()
  sweep_rate, _ = inprocess_rate(Server(model, int(config.server_batch), tuple(config.buckets),
                                        token_budget=int(config.server_token_budget) or None,
                                        concurrency=calls), data, clients * per_client)
  ctx = multiprocessing.get_context("spawn")
  ready, results, start = ctx.Queue(), ctx.Queue(), ctx.Event()
  procs = [ctx.Process(target=_client, args=(srv.address, data, per_client, k, ready, start,
                                             results)) for k in range(clients)]
  for p in procs:
    p.start()
  for _ in procs:  # every client connected (imports and channel set-up untimed)
    ready.get(timeout=120)
  t0, c0 = time.perf_counter(), _cpu_s()
  start.set()
  got = [results.get(timeout=300) for _ in procs]
  rate = clients * per_client / (time.perf_counter() - t0)
  served_cpu = (_cpu_s() - c0) / (clients * per_client) * 1e3  # this process: the server
  for p in procs:
    p.join()
  lat = np.array([x for g in got for x in g[0]]) * 1e3
  sizes = [x for g in got for x in g[1]]
  print(f"\nload: {clients} client processes x {per_client} requests: {rate:.1f} req/s "
        f"(p50 {np.percentile(lat, 50):.1f} ms, p99 {np.percentile(lat, 99):.1f} ms; "
        f"{np.mean(sizes):.1f} requests per server call); "
        f"the same server in process, every payload in hand: {inproc_rate:.1f} req/s "
        f"(ratio {rate / inproc_rate:.2f}; {compute_rate:.1f} req/s, ratio "
        f"{rate / compute_rate:.2f}, if it were handed them decoded); the sweep's server: "
        f"{sweep_rate:.1f} req/s (ratio {rate / sweep_rate:.2f})")
  # On 2 cores the clients take CPU the in-process reference never pays for;
  # what the serving stack itself costs is the server process's CPU per request.
  print(f"server process CPU per request: {served_cpu:.2f} ms served over gRPC, "
        f"{inproc_cpu:.2f} ms in process (ratio {inproc_cpu / served_cpu:.2f}); the clients "
        f"had the rest of the {os.cpu_count()} cores")


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--images", type=int, default=40)
  ap.add_argument("--delay-ms", type=float, default=5.0)
  ap.add_argument("--rates", default="1,8,20")
  ap.add_argument("--codecs", default="raw,jpeg420:50")
  ap.add_argument("--clients", type=int, default=8)
  ap.add_argument("--requests", type=int, default=40)
  ap.add_argument("--calibration", default="outputs/demo/calibration.json")
  ap.add_argument("--results", default=None,
                  help="the sweep's results.json (default: beside the calibration)")
  ap.add_argument("--buckets", default=None,
                  help="the server's kept-token buckets (default: rcst serve's)")
  ap.add_argument("--batch", type=int, default=ServeOptions.batch,
                  help="rows per server call at most")
  ap.add_argument("--max-wait-ms", type=float, default=ServeOptions.max_wait_ms)
  ap.add_argument("--link", choices=("auto", "tbf", "user"), default="auto")
  args = ap.parse_args()
  if args.link != "user" and os.environ.get(_INSIDE) != "1":
    if tbf_available():
      rerun_in_namespace()  # does not return
    if args.link == "tbf":
      sys.exit("--link tbf needs root, unshare, ip and tc with the tbf qdisc")
    args.link = "user"
  cal = Calibration.from_json(args.calibration)
  results = args.results or os.path.join(os.path.dirname(args.calibration), "results.json")
  config = demo_config.get_config()
  edge, model = load_model(f"{WEIGHTS}/demo_edge"), load_model(f"{WEIGHTS}/demo_server")
  base = load_model(f"{WEIGHTS}/demo_baseline_edge")
  src = SyntheticShapes("test", args.images, seed=11)
  images = np.stack([src[i].image for i in range(args.images)])
  options = ServeOptions(batch=args.batch, max_wait_ms=args.max_wait_ms)
  if args.buckets:
    options.buckets = tuple(int(b) for b in args.buckets.split(","))
  sock_dir = tempfile.mkdtemp(prefix="rcst-bench-")
  sock_path = os.path.join(sock_dir, "server.sock")
  t0 = time.perf_counter()
  srv = RcstServer(model, "127.0.0.1:0", options, also=[f"unix:{sock_path}"])
  print(f"server: {srv.service.shapes} shapes compiled in {time.perf_counter() - t0:.1f} s "
        f"({options.batch} rows a call at most, {options.max_wait_ms} ms wait); "
        f"one-way delay {args.delay_ms} ms; {args.images} demo test images; each method at "
        f"its cheapest point within 1 pp of server-only ({results}), and the certified one")
  payloads = link_table(srv, edge, base, cal, images, args.codecs.split(","),
                        [float(r) for r in args.rates.split(",")], args.delay_ms / 1e3,
                        args.link, sock_path, results, float(config.eta), int(config.seed))
  for codec, data in payloads.items():
    print(f"\n[{codec}] mean payload {np.mean([len(d) for d in data]):.0f} B")
    load_check(srv, model, data, args.clients, args.requests, options)
  srv.stop()
  shutil.rmtree(sock_dir, ignore_errors=True)


if __name__ == "__main__":
  main()
