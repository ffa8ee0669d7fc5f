"""How the sweep's token server should be called on CPU: rows per call (the
token budget) and calls in flight (host threads), per kept-token bucket,
next to timm's VisionTransformer blocks on the same tokens in PyTorch.

  .venv/bin/python benchmarks/bench_server_calls.py [--buckets 24,48,96,196] [--rows 8,16,64]

JAX: the demo server's compiled token program (`server._server_from_patches`)
on R rows of `bucket` random patches, called back to back from 1 or 2 host
threads (`Server.concurrency`), XLA:CPU's default thread pool either way.
timm: a VisionTransformer of the same size (random init) running its
blocks, norm and head on the same [R, bucket + 1, D] tokens, torch's default
threads, torch.inference_mode(). Both report milliseconds per row (lower is
better); each figure is the best of 3 timed rounds.
"""

import argparse
import os
import sys
import threading
import time

import common  # noqa: F401  (XLA:CPU flags first)
import numpy as np
from bench_codecs import cpu_line

from rcst_jax.inference import server as server_lib
from rcst_jax.models.checkpoints import load_model

WEIGHTS = os.path.join(os.path.dirname(common.HERE), "weights")


def per_row(call, rows: int, threads: int, budget_s: float = 1.0) -> float:
  """Best of 3 rounds of ms per row, ``threads`` callers each calling back to back."""
  call()
  t0, n = time.perf_counter(), 0
  while time.perf_counter() - t0 < 0.2:
    call()
    n += 1
  reps = max(2, int(budget_s / 3 / max((time.perf_counter() - t0) / n, 1e-6) / threads))
  best = float("inf")
  for _ in range(3):
    workers = [threading.Thread(target=lambda: [call() for _ in range(reps)])
               for _ in range(threads)]
    t0 = time.perf_counter()
    for w in workers:
      w.start()
    for w in workers:
      w.join()
    best = min(best, (time.perf_counter() - t0) / (reps * threads * rows) * 1e3)
  return best


def jax_case(model, bucket: int, rows: int):
  rng = np.random.default_rng(0)
  sent = rng.integers(0, 256, (rows, bucket, 16, 16, 3), dtype=np.uint8)
  idx = np.tile(np.arange(bucket, dtype=np.int32), (rows, 1))
  valid = np.ones((rows, bucket), bool)
  return lambda: np.asarray(server_lib._server_from_patches(
      model.variables, sent, idx, valid, module=model.module))


def timm_case(module, bucket: int, rows: int):
  import timm  # noqa: PLC0415
  import torch  # noqa: PLC0415
  vit = timm.models.vision_transformer.VisionTransformer(
      img_size=224, patch_size=16, embed_dim=module.embed_dim, depth=module.depth,
      num_heads=module.num_heads, mlp_ratio=module.mlp_ratio,
      num_classes=module.num_classes).eval()
  tokens = torch.randn(rows, bucket + 1, module.embed_dim)

  def run():
    with torch.inference_mode():
      return vit.head(vit.norm(vit.blocks(tokens))[:, 0]).numpy()
  return run


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--buckets", default="24,48,96,196")
  ap.add_argument("--rows", default="8,16,64")
  args = ap.parse_args()
  model = load_model(f"{WEIGHTS}/demo_server")
  m = model.module
  print(cpu_line())
  print(f"demo server: embed {m.embed_dim}, depth {m.depth}, heads {m.num_heads}; "
        f"{os.cpu_count()} cores; ms per row, best of 3 rounds\n")
  rows_list = [int(r) for r in args.rows.split(",")]
  print(f"{'tokens':>6} {'rows':>5} | {'jax 1 call':>10} {'jax 2 calls':>11} | "
        f"{'timm':>8} | {'2 calls vs 1':>12} {'vs timm':>8}")
  for bucket in (int(b) for b in args.buckets.split(",")):
    for rows in rows_list:
      call = jax_case(model, bucket, rows)
      one, two = per_row(call, rows, 1), per_row(call, rows, 2)
      ref = per_row(timm_case(m, bucket, rows), rows, 1)
      print(f"{bucket + 1:>6} {rows:>5} | {one:>10.3f} {two:>11.3f} | {ref:>8.3f} | "
            f"{one / two:>11.2f}x {ref / two:>7.2f}x")
    sys.stdout.flush()


if __name__ == "__main__":
  main()
