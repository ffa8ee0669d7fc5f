"""Wall time of a full sweep on a fixed small set (the demo models on the
synthetic test split), split into its phases (calibration, certification:
its calibration, edge and server passes; the test set's edge and server
passes; the rest); then the
server alone per operating point of the proposed method against the number
of kept tokens, with the padding waste of bucketing. For the whole sweep it
reports the server's processed tokens (padding rows and slots, CLS included)
over useful tokens and the time per useful token, by bucket.

  .venv/bin/python benchmarks/bench_sweep.py [--n 512] [--models weights] [--devices 8]

``--devices N`` forces N host (CPU) devices, shards the sweep over them, and
runs the same sweep on 1 device in a subprocess to report the throughput
ratio. XLA reads the device count when jax is imported, hence the argv
look-up before the imports.
"""

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time


def _devices_from_argv(argv) -> int:
  for i, a in enumerate(argv):
    if a == "--devices" and i + 1 < len(argv):
      return int(argv[i + 1])
    if a.startswith("--devices="):
      return int(a.split("=", 1)[1])
  return 1


if _devices_from_argv(sys.argv) > 1:
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_"
                             f"device_count={_devices_from_argv(sys.argv)}").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from rcst_jax.cli import parse_config  # noqa: E402
from rcst_jax.core import xla_cpu  # noqa: E402
from rcst_jax.data.sources import load_sources, run_transform  # noqa: E402
from rcst_jax.inference import edge as edge_lib  # noqa: E402
from rcst_jax.inference import methods, patches  # noqa: E402
from rcst_jax.inference import server as server_lib  # noqa: E402
from rcst_jax.models.loading import load_models  # noqa: E402
from rcst_jax.sweep import engine, passes  # noqa: E402

xla_cpu.tune()  # as `rcst` does, before any computation


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--n", type=int, default=512, help="test images")
  p.add_argument("--models", default=os.path.join(REPO, "weights"))
  p.add_argument("--devices", type=int, default=1, help="forced host devices (CPU)")
  p.add_argument("--min-batch", type=int, default=0,
                 help="config server_min_batch (default 0: server_batch, full batches only)")
  p.add_argument("--sweep-only", action="store_true",
                 help="only the full sweep; print its timings as one JSON line")
  args = p.parse_args()
  with tempfile.TemporaryDirectory() as out:
    config = parse_config("demo:full", [
        f"--config.models_dir={args.models}", f"--config.output_dir={out}",
        f"--config.data.n_test={args.n}", "--config.progress=False",
        f"--config.server_min_batch={args.min_batch}"])
    models = load_models(config)
    transform = run_transform(models.edge.metadata)
    sources = load_sources(config, transform)
    ev = engine.Sweep(config, models, sources, out, transform, progress=False)
    # Keep every Server the sweep makes (one per chunk) for its token stats:
    # sweep.passes instantiates the class by this name.
    servers, server_cls = [], server_lib.Server
    passes.Server = lambda *a, **k: servers.append(server_cls(*a, **k)) or servers[-1]
    try:
      t0 = time.perf_counter()
      res = ev.run()
      total = time.perf_counter() - t0
    finally:
      passes.Server = server_cls
    stats = functools.reduce(lambda a, s: a.merge(s.stats), servers, server_lib.ServerStats())
    # What padding every bucket's last batch to server_batch rows (before) cost.
    batch = int(config.server_batch)
    fixed = sum(-(-b["rows"] // batch) * batch * (bucket + 1)
                for s in servers for bucket, b in s.stats.by_bucket.items())
    phases = sweep_phases(res["timings"], total)
    if args.sweep_only:
      print(json.dumps({**phases, "ratio": stats.ratio, "devices": jax.device_count()}))
      return
    print(f"backend={jax.default_backend()} devices={jax.device_count()} test images={args.n} "
          f"operating points={len(ev.points)}")
    print(f"full sweep: {total:.1f} s  ("
          + ", ".join(f"{label} {phases[k]:.1f} s" for k, label in PHASES[1:]) + ")")
    report_tokens(stats, batch, fixed)
    if args.devices > 1:
      one = subprocess.run([sys.executable, os.path.abspath(__file__), "--n", str(args.n),
                            "--models", args.models, "--devices", "1", "--sweep-only"]
                           + ["--min-batch", str(args.min_batch)],
                           env={**os.environ, "XLA_FLAGS": ""}, check=True,
                           capture_output=True, text=True)
      one = json.loads(one.stdout.strip().splitlines()[-1])
      print(f"\n{args.devices} devices vs 1 (same sweep, 1 device in a subprocess after); "
            f"throughput = 1-device s / {args.devices}-device s:")
      print(f"{'phase':<34} {f'{args.devices} dev s':>9} {'1 dev s':>9} {'ratio':>6}")
      for k, label in PHASES:
        if phases[k] > 0 or one.get(k, 0) > 0:
          print(f"{label:<34} {phases[k]:>9.1f} {one.get(k, 0.0):>9.1f} "
                f"{one.get(k, 0.0) / max(phases[k], 1e-9):>5.2f}x")
      print(f"processed/useful server tokens {stats.ratio:.3f} vs {one['ratio']:.3f}")

    # Server alone per tau: time against kept tokens, and bucket padding.
    images = np.stack([sources.test_source[i].image for i in range(args.n)])
    cal = res["calibration"]
    e = jax.device_get(edge_lib.edge_step(models.edge, images, cal.lambda_hat, cal.q_hat))
    off = ~e["accept"]
    server = server_lib.Server(models.server, int(config.server_batch), tuple(config.buckets),
                               min_batch=args.min_batch or None)
    full = np.ones((off.sum(), 196), bool)
    server.logits_from_images(images[off], full)  # compile the full bucket once
    print(f"\n{'tau':>5} {'offloaded':>9} {'kept/img':>9} {'tokens':>8} {'server s':>9} "
          f"{'us/token':>9} {'slot pad':>8} {'proc/useful':>11}")
    for tau in (0.0,) + tuple(config.tau_grid[1:]):
      keep = np.asarray(methods.PROPOSED.select(e["patch_scores"][off], tau))
      kept = keep.sum(-1)
      padded = sum(patches.bucket_for(k, config.buckets) for k in kept)
      server.logits_from_images(images[off], keep)  # compile this tau's buckets
      server.stats = server_lib.ServerStats()
      t0 = time.perf_counter()
      server.logits_from_images(images[off], keep)
      dt = time.perf_counter() - t0
      tokens = int(kept.sum()) + len(kept)  # + CLS per image
      waste = 1 - (kept.sum() + len(kept)) / (padded + len(kept))
      print(f"{tau:>5.2f} {off.sum():>9d} {kept.mean():>9.1f} {tokens:>8d} {dt:>9.2f} "
            f"{1e6 * dt / tokens:>9.1f} {100 * waste:>7.1f}% {server.stats.ratio:>11.3f}", flush=True)


# The sweep's phases (Sweep.timings), whole sweep first; "other" is the
# rest: data loading outside the timed passes, caching, metrics.
PHASES = (("total_s", "full sweep"), ("calibration_s", "calibration (Algorithm 1)"),
          ("cert_calibration_s", "certification: Algorithm 1 on fit"),
          ("cert_edge_s", "certification: edge passes"),
          ("cert_server_s", "certification: server passes"),
          ("cert_other_s", "certification: other"),
          ("edge_s", "test: edge passes"), ("server_s", "test: server passes"),
          ("other_s", "other"))


def sweep_phases(t: dict, total: float) -> dict:
  """Seconds per phase from ``Sweep.timings`` (keys of PHASES)."""
  cert = {k: t.get(f"certification_{k}_s", 0.0) for k in ("calibration", "edge", "server")}
  out = {"total_s": total, "calibration_s": t.get("calibration_s", 0.0),
         **{f"cert_{k}_s": v for k, v in cert.items()},
         "cert_other_s": t.get("certification_s", 0.0) - sum(cert.values()),
         "edge_s": t.get("edge_s", 0.0), "server_s": t.get("server_s", 0.0)}
  out["other_s"] = total - out["calibration_s"] - t.get("certification_s", 0.0) \
      - out["edge_s"] - out["server_s"]
  return out


def report_tokens(stats, batch_size: int, fixed: int):
  """Processed / useful server tokens of the whole sweep, by bucket, next to
  what padding every bucket's last batch to ``batch_size`` rows would cost
  (per bucket: as if the rows came in one call; ``fixed``: the real calls)."""
  print(f"\nwhole sweep, server by bucket:\n{'bucket':>6} {'rows':>6} {'batches':>7} "
        f"{'shapes':>6} {'useful tok':>10} {'processed':>10} {'ratio':>6} {'fixed-batch':>11} "
        f"{'s':>7} {'us/useful':>9}")
  for bucket, b in sorted(stats.by_bucket.items()):
    f = -(-b["rows"] // batch_size) * batch_size * (bucket + 1)
    print(f"{bucket:>6} {b['rows']:>6} {b['batches']:>7} {len(b['shapes']):>6} "
          f"{b['useful']:>10} {b['processed']:>10} {b['processed'] / b['useful']:>6.3f} "
          f"{f / b['useful']:>11.3f} {b['seconds']:>7.2f} "
          f"{1e6 * b['seconds'] / b['useful']:>9.1f}")
  secs = sum(b["seconds"] for b in stats.by_bucket.values())
  print(f"{'all':>6} {sum(b['rows'] for b in stats.by_bucket.values()):>6} "
        f"{sum(b['batches'] for b in stats.by_bucket.values()):>7} {len(stats.shapes()):>6} "
        f"{stats.useful:>10} {stats.processed:>10} {stats.ratio:>6.3f} "
        f"{fixed / stats.useful:>11.3f} {secs:>7.2f} {1e6 * secs / stats.useful:>9.1f}")
  print("(ratio: processed / useful tokens, padding rows and slots and CLS included; "
        f"fixed-batch: the same rows with every batch padded to {batch_size} rows)")


if __name__ == "__main__":
  main()
