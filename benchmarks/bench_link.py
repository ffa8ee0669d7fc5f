"""Table 2 measured: `rcst run --server` through a rate-limited loopback link.

Starts `rcst serve`'s server (the demo server model) in this process, puts a
user-space token-bucket link (`serving.link.Link`: 1,500-byte pieces paced at
the rate, plus one-way delay) between it and the networked edge, and runs
Algorithm 2 on generated demo test images at the demo calibration's
certified (lambda, tau) for each codec. Prints per rate and codec the
measured end-to-end latency of offloaded images (edge + encode + round trip:
mean, p50, p95), the prediction bytes-on-wire / rate + 2 x delay + the
server's reported time + edge + encode, the paper's formula (cost x 147 KiB x
8 / rate) and the framing overhead (wire bytes up / payload bytes - 1).
Then the load check: C concurrent clients x M requests on the same payloads
against the in-process batched server. CPU kind: print `lscpu` next to it.

  python benchmarks/bench_link.py [--images 40] [--delay-ms 5]
      [--calibration outputs/demo/calibration.json]   (`make demo` writes it)
"""

import argparse
import os
import threading
import time

import common  # noqa: F401  (XLA:CPU flags first)
import numpy as np

from rcst_jax.calibration.artifact import Calibration
from rcst_jax.data.synthetic import SyntheticShapes
from rcst_jax.inference.collaborative import collaborative_inference
from rcst_jax.inference.server import Server
from rcst_jax.models.checkpoints import load_model
from rcst_jax.report.tables import latency_ms
from rcst_jax.serving.client import RemoteServer
from rcst_jax.serving.link import Link
from rcst_jax.serving.service import RcstServer, ServeOptions

WEIGHTS = os.path.join(os.path.dirname(common.HERE), "weights")
FULL = 224 * 224 * 3


def _stats(x):
  return f"{np.mean(x):8.1f} {np.percentile(x, 50):8.1f} {np.percentile(x, 95):8.1f}"


def link_table(srv, edge, cal, images, codecs, rates, delay_s):
  print("\nrate Mb/s | codec       | n off | measured ms: mean p50 p95 | predicted mean | "
        "paper formula | framing %")
  payloads = {}
  # Untimed: compiles the edge step at this batch size, so no image pays for it.
  collaborative_inference(images, edge, srv.service.server.model, cal.operating_point(),
                          batch_size=16, layer=cal.gradcam_layer or "features")
  for codec in codecs:
    point = cal.operating_point(None, codec)
    for rate in rates:
      link = Link(("127.0.0.1", srv.port), rate_bps=rate * 1e6, delay_s=delay_s)
      remote = RemoteServer(link.address, geometry=cal.patch_geometry())
      remote.describe()  # connection set up outside the timed images
      out = collaborative_inference(images, edge, None, point, remote=remote, batch_size=16,
                                    layer=cal.gradcam_layer or "features")
      off = out["offloaded"] & (out["status"] == "server")
      e2e = (out["edge_s"] + out["encode_s"] + out["rtt_s"])[off] * 1e3
      on_server = out["server_s"] + out["queue_s"]  # decode is inside rtt - compute
      pred = (out["edge_s"] + out["encode_s"] + (out["wire_up"] + out["wire_down"]) * 8
              / (rate * 1e6) + 2 * delay_s + on_server)[off] * 1e3
      cost = out["bytes"].sum() / (FULL * len(images))
      framing = 100 * (out["wire_up"][off].sum() / out["bytes"][off].sum() - 1)
      if codec not in payloads:  # the same at every rate
        payloads[codec] = list(_payloads(out, images, point, cal))
      print(f"{rate:9g} | {codec:11s} | {off.sum():5d} | {_stats(e2e)} | {pred.mean():14.1f} | "
            f"{float(latency_ms(cost, rate)):13.1f} | {framing:8.2f}")
      remote.close()
      link.close()
  return payloads


def _payloads(out, images, point, cal):
  from rcst_jax.inference import payload
  for i in np.flatnonzero(out["offloaded"]):
    yield payload.encode_image_payload(images[i], out["keep"][i], cal.patch_geometry(),
                                       point.codec)


def inprocess_rate(server, data, total):
  """Requests/s of ``server`` on all of ``data`` at once, repeated to ``total``."""
  decoded = [server.decode(d) for d in data]
  server.logits_from_decoded(decoded)  # compiles
  reps = max(1, total // len(data))
  t0 = time.perf_counter()
  for _ in range(reps):
    server.logits_from_decoded(decoded)
  return reps * len(data) / (time.perf_counter() - t0)


def load_check(srv, model, data, clients, per_client, options):
  # The reference: the same server shapes with every payload in hand at once,
  # and the sweep's (64 rows, every bucket).
  inproc_rate = inprocess_rate(Server(model, options.batch, tuple(options.buckets),
                                      min_batch=options.batch), data, clients * per_client)
  sweep_rate = inprocess_rate(Server(model, 64), data, clients * per_client)
  lat, sizes, lock = [], [], threading.Lock()

  def client(k):
    remote = RemoteServer(srv.address, metered=False)
    remote.describe()
    for j in range(per_client):
      t = time.perf_counter()
      r = remote.classify(data[(k * per_client + j) % len(data)])
      with lock:
        lat.append(time.perf_counter() - t)
        sizes.append(r.batch_requests)
    remote.close()
  threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
  t0 = time.perf_counter()
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  rate = clients * per_client / (time.perf_counter() - t0)
  lat = np.array(lat) * 1e3
  print(f"\nload: {clients} clients x {per_client} requests: {rate:.1f} req/s "
        f"(p50 {np.percentile(lat, 50):.1f} ms, p99 {np.percentile(lat, 99):.1f} ms; "
        f"{np.mean(sizes):.1f} requests per server call); "
        f"in-process batched server on the same payloads: {inproc_rate:.1f} req/s "
        f"(ratio {rate / inproc_rate:.2f}); the sweep's 64-row server: {sweep_rate:.1f} req/s "
        f"(ratio {rate / sweep_rate:.2f})")


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--images", type=int, default=40)
  ap.add_argument("--delay-ms", type=float, default=5.0)
  ap.add_argument("--rates", default="1,8,20")
  ap.add_argument("--codecs", default="raw,jpeg420:50")
  ap.add_argument("--clients", type=int, default=8)
  ap.add_argument("--requests", type=int, default=40)
  ap.add_argument("--calibration", default="outputs/demo/calibration.json")
  ap.add_argument("--buckets", default="16,32,48,64,96,128,196",
                  help="the server's kept-token buckets (one compiled shape each)")
  ap.add_argument("--batch", type=int, default=2, help="rows per server call")
  args = ap.parse_args()
  cal = Calibration.from_json(args.calibration)
  edge, model = load_model(f"{WEIGHTS}/demo_edge"), load_model(f"{WEIGHTS}/demo_server")
  src = SyntheticShapes("test", args.images, seed=11)
  images = np.stack([src[i].image for i in range(args.images)])
  options = ServeOptions(batch=args.batch, buckets=tuple(int(b) for b in args.buckets.split(",")),
                         max_wait_ms=2.0)
  srv = RcstServer(model, "127.0.0.1:0", options)
  print(f"server: {srv.service.shapes} shapes compiled; one-way delay {args.delay_ms} ms; "
        f"{args.images} demo test images at the certified (lambda, tau) = "
        f"({cal.certificate['lambda_hat']}, {cal.certificate['tau']})")
  payloads = link_table(srv, edge, cal, images, args.codecs.split(","),
                        [float(r) for r in args.rates.split(",")], args.delay_ms / 1e3)
  for codec, data in payloads.items():
    print(f"\n[{codec}] mean payload {np.mean([len(d) for d in data]):.0f} B")
    load_check(srv, model, data, args.clients, args.requests, options)
  srv.stop()


if __name__ == "__main__":
  main()
