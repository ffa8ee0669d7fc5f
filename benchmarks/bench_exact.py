"""Time of the exact p-value's table (`stats/exact.py`) against the previous
implementation, kept here as the reference, on the demo's two sample sizes.

  .venv/bin/python benchmarks/bench_exact.py [--n 1200 2800] [--repeats 2]

Workload: 22 x 6 configurations of accuracy drops (each image's drop -1, 0 or
+1, mostly 0, with 0.5-15 % of +1 and 0.2-5 % of -1), rescaled as the
certificate does at epsilon = 0.02, at the fitting (1,200) and testing (2,800)
sizes of the shipped demo. Each timing starts cold (no cached outcomes or
table): sorting the outcomes, then the grid rows those counts need. The two
implementations alternate within each repeat, and their p-values must agree
bit for bit. Report ratios from one run: 2-core hosts are noisy.
"""

import argparse
import concurrent.futures
import functools
import math
import os
import time

import numpy as np
from machine import cpu_name

from rcst_jax.stats import exact, ltt

# ---------------------------------------------------------------- the reference (before)


@functools.lru_cache(maxsize=2)
def _old_outcomes(n, eps):
  n1, nh = (a.ravel() for a in np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij"))
  keep = n1 + nh <= n
  n1, nh = n1[keep], nh[keep]
  mean = (nh + 2 * n1) / (2 * n)
  stat = (mean - eps) / np.sqrt(((nh / 4 + n1) / n - mean * mean + 0.25 / n) / n)
  grid = np.full((n + 1, n + 1), np.inf)
  grid[n1, n1 + nh] = stat
  grid = np.minimum.accumulate(np.minimum.accumulate(grid[::-1], 0)[:, ::-1], 1)[::-1, ::-1]
  stat = grid[n1, n1 + nh]
  order = np.argsort(stat, kind="stable")
  n1, nh, stat = n1[order], nh[order], stat[order]
  return n - n1 - nh, nh, n1, np.searchsorted(stat, stat, "right") - 1


def _old_column(n, eps, q_row, ranks):
  """Every term of the row, summed by np.cumsum, read at the ranks."""
  i0, ih, i1, _ = _old_outcomes(n, eps)
  k = np.arange(n + 1)
  lg = np.array([math.lgamma(j + 1.0) for j in range(n + 1)])
  big_k = math.exp(lg[n] + n - n * math.log(n))
  row = np.asarray(q_row, np.float64)
  pois = np.exp(k * exact._log(n * row)[:, None] - n * row[:, None] - lg)
  t = np.take(pois[0], i0)
  t *= np.take(pois[1], ih)
  t *= np.take(pois[2] * big_k, i1)
  csum, lost = np.cumsum(t, out=t), i0.size * big_k * 1e-307
  return np.minimum(np.take(csum, ranks) * (1 + 1e-10) + lost, 1.0)


def _old_pvalue(losses, eps, gamma=1e-4):
  n, k, n1 = exact.counts(losses, eps)
  q, (lo, hi) = exact._boundary(eps)[1], exact._ranges(n, eps, gamma)
  _, ih, i1, last = _old_outcomes(n, eps)
  by_k = np.argsort(ih, kind="stable")
  last, starts = last[by_k], np.searchsorted(ih[by_k], np.arange(n + 2))
  index = np.full((n + 1, n + 1), -1)
  index[ih[by_k], i1[by_k]] = np.arange(ih.size)
  sup, ks, j = np.zeros(ih.size), np.unique(k), np.arange(len(q))[:, None]
  need = ((j >= lo[ks]) & (j <= hi[ks])).any(1)

  def row(r):
    run = np.flatnonzero((lo <= r) & (hi >= r))
    cut = slice(starts[run[0]], starts[run[-1] + 1])
    return cut, _old_column(n, eps, q[r], last[cut])
  with concurrent.futures.ThreadPoolExecutor(exact._threads()) as pool:
    for cut, vals in pool.map(row, np.flatnonzero(need)):
      np.maximum(sup[cut], vals, out=sup[cut])
  return np.minimum(1.0, sup[index[k, n1]] + gamma), int(need.sum())


# ---------------------------------------------------------------- the run


def _losses(n, seed=0):
  rng = np.random.default_rng(seed)
  up = np.linspace(0.005, 0.15, 22)[:, None, None]
  down = np.linspace(0.002, 0.05, 6)[None, :, None]
  u = rng.random((22, 6, n))
  drop = np.where(u < up, 1.0, np.where(u > 1 - down, -1.0, 0.0))
  return ltt.rescale_accuracy_drop(drop, 0.02)


def _cold():
  for f in (exact._outcomes, exact._narrow, exact._table, exact._ranges, exact._lgamma,
            _old_outcomes):
    f.cache_clear()


def _timed(fn):
  _cold()
  t0 = time.perf_counter()
  out = fn()
  return time.perf_counter() - t0, out


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--n", type=int, nargs="+", default=[1200, 2800])
  ap.add_argument("--repeats", type=int, default=2)
  args = ap.parse_args()
  print(f"{cpu_name()}, {os.cpu_count()} CPUs, {exact._threads()} row threads, "
        f"load average {os.getloadavg()[0]:.1f}")
  for n in args.n:
    x, e = _losses(n)
    before, after = [], []
    for rep in range(args.repeats):
      for which in ((0, 1) if rep % 2 == 0 else (1, 0)):   # alternate who runs first
        if which == 0:
          s, (p_old, rows) = _timed(lambda: _old_pvalue(x, e))
          before.append(s)
        else:
          s, p_new = _timed(lambda: exact.exact_pvalue(x, e))
          after.append(s)
      assert np.array_equal(p_old.view(np.int64), p_new.view(np.int64)), "p-values differ"
    b, a = min(before), min(after)
    print(f"n = {n}: {rows} grid rows, {x.shape[0] * x.shape[1]} configurations; "
          f"before {b:.2f} s, after {a:.2f} s (best of {args.repeats}): {b / a:.1f}x, "
          f"p-values bit-identical")
  _cold()


if __name__ == "__main__":
  main()
