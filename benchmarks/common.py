"""Timing helpers shared by the benchmarks: warm up, then the median of runs."""

import statistics
import time

import jax


def time_fn(fn, *args, warmup: int = 2, runs: int = 5) -> float:
  """Median seconds per call; JAX outputs are blocked on."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def time_torch(fn, *args, warmup: int = 2, runs: int = 5) -> float:
  import torch
  with torch.inference_mode(False):
    for _ in range(warmup):
      fn(*args)
    times = []
    for _ in range(runs):
      t0 = time.perf_counter()
      fn(*args)
      times.append(time.perf_counter() - t0)
  return statistics.median(times)


def row(name: str, batch: int, jax_s: float, torch_s: float | None) -> str:
  j = batch / jax_s
  if torch_s is None:
    return f"{name:<44} {batch:>5} {j:>10.1f} {'-':>10} {'-':>7}"
  t = batch / torch_s
  return f"{name:<44} {batch:>5} {j:>10.1f} {t:>10.1f} {j / t:>6.2f}x"


HEADER = f"{'case':<44} {'batch':>5} {'jax img/s':>10} {'torch':>10} {'ratio':>7}"
