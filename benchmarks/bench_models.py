"""Forward throughput: Flax EfficientNet-B0 and DeiT-Base (196/98/49 tokens)
next to timm, default and best-tuned, interleaved in one run. Random fp32
weights (speed only); medians of interleaved rounds (see common.py).

  .venv/bin/python benchmarks/bench_models.py [--repeats 7] [--inner N] [--no-tuned] [--rounds]
"""

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from rcst_jax.models import (
  create_model,  # noqa: E402
  efficientnet,  # noqa: E402
)


def effnet(workers, batches, repeats, inner, rounds=False):
  module = create_model("efficientnet_b0")
  x1 = jnp.zeros((1, 224, 224, 3), jnp.float32)
  variables = common.random_variables(module, x1)
  # Inference form, as Model.inference() makes it once at load: BatchNorm
  # folded into the convs; CPU forms ('auto' switches) for the rest.
  fast, folded = efficientnet.fold_batchnorm(module, variables)
  fwd = jax.jit(lambda v, x: fast.apply(v, x)[0])
  for b in batches:
    x = jnp.asarray(np.random.default_rng(0).normal(size=(b, 224, 224, 3)), jnp.float32)
    common.run_case("efficientnet_b0 forward", b, fwd, (folded, x), workers, "effnet_fwd",
                    repeats, inner, rounds)


def deit_gflop(tokens: int, d: int = 768, depth: int = 12, classes: int = 1000) -> float:
  """Forward GFLOP of DeiT-Base on ``tokens`` patch tokens (+ CLS), 2 FLOP per MAC."""
  n = tokens + 1
  per_block = 12 * n * d * d + 2 * n * n * d  # qkv, proj, mlp; q.k and attn.v
  return 2 * (tokens * 16 * 16 * 3 * d + depth * per_block + d * classes) / 1e9


def matmul_peak(n: int = 2048, runs: int = 7) -> float:
  """fp32 GFLOP/s of jnp.dot on n x n matrices (median of runs)."""
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
  f = jax.jit(jnp.dot)
  jax.block_until_ready(f(a, a))
  ts = []
  for _ in range(runs):
    t0 = time.perf_counter()
    jax.block_until_ready(f(a, a))
    ts.append(time.perf_counter() - t0)
  return 2 * n ** 3 / statistics.median(ts) / 1e9


def deit(workers, batch, tokens_list, repeats, inner, rounds=False):
  module = create_model("deit_base_patch16_224")
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch, 224, 224, 3)), jnp.float32)
  variables = common.random_variables(module, x[:1])
  full = jax.jit(lambda v, x: module.apply(v, x)[0])
  sub = jax.jit(lambda v, p, i, m: module.apply(v, p, i, m, method="tokens")[0])
  peak = matmul_peak()
  print(f"fp32 matmul peak (jnp.dot 2048^2, JAX): {peak:.0f} GFLOP/s")
  gflops = lambda k, med: "  " + "  ".join(
      f"{n} {deit_gflop(k) * batch / s:.0f}" for n, s in med.items()) + " GFLOP/s"
  for k in tokens_list:
    if k == 196:
      med = common.run_case("deit_base full image", batch, full, (variables, x), workers,
                            "deit_full", repeats, inner, rounds)
      print(" " * 4 + gflops(196, med).strip() + f" (peak {peak:.0f})")
    idx = np.sort(np.stack([rng.choice(196, k, replace=False) for _ in range(batch)]), 1)
    patches = rng.integers(0, 256, (batch, k, 16, 16, 3), dtype=np.uint8)
    mask = np.ones((batch, k), bool)
    med = common.run_case(f"deit_base {k} tokens", batch, sub, (variables, patches, idx, mask),
                          workers, f"deit_tokens_{k}", repeats, inner, rounds)
    print(" " * 4 + gflops(k, med).strip() + f" (peak {peak:.0f})")


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--inner", type=int, default=0,
                 help="timed calls per round (default 12 at batch 1, 2 above)")
  p.add_argument("--no-tuned", action="store_true")
  p.add_argument("--rounds", action="store_true", help="print every round's img/s")
  p.add_argument("--skip-deit", action="store_true")
  args = p.parse_args()
  workers, note = common.start_workers(not args.no_tuned)
  common.print_run_header(workers, args, note)
  print(common.HEADER)
  try:
    effnet(workers, (1, 16), args.repeats, args.inner, args.rounds)
    if not args.skip_deit:
      deit(workers, 16, (196, 98, 49), args.repeats, args.inner, args.rounds)
  finally:
    for w in workers.values():
      w.close()


if __name__ == "__main__":
  main()
