"""Wall time of a full sweep on a fixed small set (the demo models on the
synthetic test split), split into edge pass and server passes; then the
server alone per operating point of the proposed method against the number
of kept tokens, with the padding waste of bucketing.

  .venv/bin/python benchmarks/bench_sweep.py [--n 512] [--models weights]
"""

import argparse
import os
import sys
import tempfile
import time

import jax
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from rcst_jax import engine, methods, patches, pipeline  # noqa: E402
from rcst_jax.data.sources import load_sources, run_transform  # noqa: E402
from rcst_jax.models.loading import load_models  # noqa: E402
from rcst_jax.cli import parse_config  # noqa: E402


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--n", type=int, default=512, help="test images")
  p.add_argument("--models", default=os.path.join(REPO, "weights"))
  args = p.parse_args()
  with tempfile.TemporaryDirectory() as out:
    config = parse_config("demo", [
        f"--config.models_dir={args.models}", f"--config.output_dir={out}",
        f"--config.data.n_test={args.n}", "--config.progress=False"])
    models = load_models(config)
    transform = run_transform(models.edge.metadata)
    sources = load_sources(config, transform)
    ev = engine.Evaluation(config, models, sources, out, transform, progress=False)
    t0 = time.perf_counter()
    res = ev.run()
    total = time.perf_counter() - t0
    t = res["timings"]
    print(f"backend={jax.default_backend()} devices={jax.device_count()} test images={args.n} "
          f"operating points={len(ev.points)}")
    print(f"full sweep: {total:.1f} s  (calibration+data {total - t['edge_s'] - t['server_s']:.1f} s,"
          f" edge pass {t['edge_s']:.1f} s = {args.n / t['edge_s']:.1f} img/s incl. data,"
          f" server passes {t['server_s']:.1f} s)")

    # Server alone per tau: time against kept tokens, and bucket padding.
    images = np.stack([sources.test_source[i].image for i in range(args.n)])
    cal = res["calibration"]
    e = jax.device_get(pipeline.edge_step(models.edge, images, cal.lambda_hat, cal.q_hat))
    off = ~e["accept"]
    server = pipeline.Server(models.server, int(config.server_batch), tuple(config.buckets))
    full = np.ones((off.sum(), 196), bool)
    server.logits_from_images(images[off], full)  # compile the full bucket once
    print(f"\n{'tau':>5} {'offloaded':>9} {'kept/img':>9} {'tokens':>8} {'server s':>9} "
          f"{'us/token':>9} {'padding':>8}")
    for tau in (0.0,) + tuple(config.tau_grid[1:]):
      keep = np.asarray(methods.PROPOSED.select(e["patch_scores"][off], tau))
      kept = keep.sum(-1)
      padded = sum(patches.bucket_for(k, config.buckets) for k in kept)
      server.logits_from_images(images[off], keep)  # compile this tau's buckets
      t0 = time.perf_counter()
      server.logits_from_images(images[off], keep)
      dt = time.perf_counter() - t0
      tokens = int(kept.sum()) + len(kept)  # + CLS per image
      waste = 1 - (kept.sum() + len(kept)) / (padded + len(kept))
      print(f"{tau:>5.2f} {off.sum():>9d} {kept.mean():>9.1f} {tokens:>8d} {dt:>9.2f} "
            f"{1e6 * dt / tokens:>9.1f} {100 * waste:>7.1f}%", flush=True)


if __name__ == "__main__":
  main()
