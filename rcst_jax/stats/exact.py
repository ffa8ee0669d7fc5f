"""Exact p-value for a three-valued loss in {0, 1/2, 1} (the rescaled accuracy drop).

H0: E X >= eps for i.i.d. X in {0, 1/2, 1} with unknown P = (p0, ph, p1). The
counts (n0, nh, n1) are multinomial. Statistic: the studentised mean
T = (mean - eps) / sqrt((var + 1/(4n)) / n), made monotone: with a = n1 and
b = nh + n1 (one sample up raises a or b), T*(a, b) = min of T over all
(a', b') >= (a, b). Small T* is evidence against H0. The p-value is

    p = min(1, sup { P_P(T* <= t_obs) : P in H0, ph in C_gamma(nh) } + gamma),

C_gamma the two-sided Clopper-Pearson 1 - gamma set for ph from
nh ~ Bin(n, ph) (Berger and Boos, JASA 1994); gamma = 0 takes the sup over
the whole null. Studentising makes the null law of T* nearly free of ph, so
the sup costs little (the raw mean loses most of its power to it).

Why it is valid. (0) If X <= X' stochastically, i.i.d. samples couple with
(a, b) <= (a', b'), so T* <= T*' and F_P(t) = P_P(T* <= t) can only grow
when P moves down. (1) Within H0 with ph = h fixed, moving mass from 1 to 0
moves P down: the sup at h is attained at Q_h = (1 - h - c(h), h, c(h)),
c(h) = max(0, eps - h/2) (the boundary E X = eps when h <= 2 eps). (2) For h
in a grid interval [a, b], (1 - a - c(a), a + c(a) - c(b), c(b)) lies below
every Q_h, so its F bounds them all on the interval: the max over the grid
is an upper bound on the sup, not an approximation. (3) For the true P,
F_P(T*) is super-uniform and P(ph not in C_gamma) <= gamma, so
P(p <= u) <= P(ph not in C) + P(F_P(T*) <= u - gamma) <= u.

The price of the grid is a mean deficit (b - a)/4 per interval; the grid is
uniform in the boundary's standard deviation sqrt(eps(1-eps) - h/4), so the
deficit is at most sqrt(n)/G standard deviations of the mean everywhere
(0.044 at n = 500, G = 512). Cost: O(n^2) per grid interval (all outcomes),
computed once per (n, eps, gamma) and only for the intervals the observed
counts need; after that a p-value is a table look-up.

The p-value reads counts only: it does not depend on the order of the
samples. It is never below gamma, so gamma must be small against the level
it is compared with (delta, or delta/|grid| under Bonferroni).
"""

from __future__ import annotations

import concurrent.futures
import functools
import math
import os

import numpy as np

__all__ = ["exact_pvalue", "counts"]

_GRID = 512   # boundary intervals
_NEG = -1e4   # log of a zero probability: exp underflows to exactly 0, no nan from 0 * -inf


def counts(losses, eps: float):
  """(n, N_half [...], N_1 [...]) of losses in {0, 1/2, 1} on the last axis."""
  x = np.asarray(losses, np.float64)
  if not 0.0 < eps < 1.0:
    raise ValueError(f"eps must be in (0, 1), got {eps}")
  if x.ndim == 0 or x.shape[-1] == 0:
    raise ValueError("exact_pvalue needs at least one loss on the last axis")
  if not np.all((x == 0.0) | (x == 0.5) | (x == 1.0)):
    raise ValueError("exact_pvalue needs losses in {0, 0.5, 1} (rescale accuracy drop first); "
                     "use wsr_pvalue or hb_pvalue for other losses")
  return x.shape[-1], (x == 0.5).sum(-1), (x == 1.0).sum(-1)


def _log(q):
  q = np.asarray(q, np.float64)
  with np.errstate(divide="ignore"):
    return np.where(q > 0, np.log(np.maximum(q, 1e-300)), _NEG)


@functools.lru_cache(maxsize=8)
def _boundary(eps: float):
  """Interval endpoints h [G + 1 (+1)] and dominating (q0, qh, q1) per interval [G (+1), 3]."""
  v0 = eps * (1 - eps)
  top = min(2 * eps, 2 * (1 - eps))
  w = np.linspace(math.sqrt(v0), math.sqrt(max(v0 - top / 4, 0.0)), _GRID + 1)
  h = np.clip(4 * (v0 - w * w), 0.0, top)
  h[0], h[-1] = 0.0, top
  if eps < 0.5:   # past 2 eps, Q_h = (1 - h, h, 0) only grows with h: one interval
    h = np.append(h, 1.0)
  c = np.maximum(0.0, eps - h / 2)
  a, ca, cb = h[:-1], c[:-1], c[1:]
  q = np.stack([np.maximum(1 - a - ca, 0.0), a + ca - cb, cb], -1)
  return h, q


@functools.lru_cache(maxsize=4)
def _outcomes(n: int, eps: float):
  """Every count (n0, nh, n1) summing to n, sorted by T*; per outcome the rank of its last tie,
  and index[nh, n1] = its rank."""
  n1, nh = (a.ravel() for a in np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij"))
  keep = n1 + nh <= n
  n1, nh = n1[keep], nh[keep]
  mean = (nh + 2 * n1) / (2 * n)
  stat = (mean - eps) / np.sqrt(((nh / 4 + n1) / n - mean * mean + 0.25 / n) / n)
  grid = np.full((n + 1, n + 1), np.inf)   # by (a, b) = (#ones, #(>= 1/2)); a > b stays inf
  grid[n1, n1 + nh] = stat
  grid = np.minimum.accumulate(np.minimum.accumulate(grid[::-1], 0)[:, ::-1], 1)[::-1, ::-1]
  stat = grid[n1, n1 + nh]
  order = np.argsort(stat, kind="stable")
  n1, nh, stat = n1[order], nh[order], stat[order]
  index = np.full((n + 1, n + 1), -1)
  index[nh, n1] = np.arange(nh.size)
  return n - n1 - nh, nh, n1, np.searchsorted(stat, stat, "right") - 1, index


def _cumsum(n: int, eps: float, q_row):
  """Running sum of the pmf of q_row over the outcomes in `_outcomes` order, and its error bound.

  A term is K Pois(n0; n q0) Pois(nh; n qh) Pois(n1; n q1), K = n! e^n / n^n
  < 3 sqrt(n): three factors <= 1 from (n + 1)-long tables, no per-term exp,
  no overflow. Only terms below K * 1e-307 can underflow (their total is the
  bound returned); rounding is covered by the factor (1 + 1e-10) of `_upper`.
  """
  i0, ih, i1, _, _ = _outcomes(n, eps)
  k = np.arange(n + 1)
  lg = np.array([math.lgamma(j + 1.0) for j in range(n + 1)])
  big_k = math.exp(lg[n] + n - n * math.log(n))
  row = np.asarray(q_row, np.float64)
  pois = np.exp(k * _log(n * row)[:, None] - n * row[:, None] - lg)   # [3, n + 1]
  t = np.take(pois[0], i0)
  t *= np.take(pois[1], ih)
  t *= np.take(pois[2] * big_k, i1)
  return np.cumsum(t, out=t), i0.size * big_k * 1e-307


def _upper(csum, lost, ranks):
  """Upper bound on P(T* <= T*(u)) from the running sum at u's last tie (measured error ~1e-13)."""
  return np.minimum(np.take(csum, ranks) * (1 + 1e-10) + lost, 1.0)


@functools.lru_cache(maxsize=8)
def _ranges(n: int, eps: float, gamma: float):
  """Intervals [lo[k], hi[k]] meeting the Clopper-Pearson set for ph given N_half = k."""
  h, q = _boundary(eps)
  m = len(q)
  if gamma <= 0:
    return np.zeros(n + 1, np.int64), np.full(n + 1, m - 1)
  k = np.arange(n + 1)
  lg = np.array([math.lgamma(j + 1.0) for j in range(n + 1)])
  lpmf = lg[n] - lg[k] - lg[n - k] + k * _log(h)[:, None] + (n - k) * _log(1 - h)[:, None]
  below = np.logaddexp.accumulate(lpmf, axis=1)                          # log P_h(N <= k)
  above = np.logaddexp.accumulate(lpmf[:, ::-1], axis=1)[:, ::-1]        # log P_h(N >= k)
  cut = math.log(gamma / 2)
  ok_hi = below[:-1] >= cut    # [m, n + 1]: left end not above the upper bound
  ok_lo = above[1:] >= cut     # right end not below the lower bound
  meets = ok_hi & ok_lo
  lo = np.where(meets.any(0), np.argmax(meets, 0), 1)
  hi = np.where(meets.any(0), m - 1 - np.argmax(meets[::-1], 0), 0)   # empty: lo > hi
  return lo, hi


class _Table:
  """Per (n, eps, gamma): the sup of each outcome, over the grid rows computed so far.

  Row j counts for the outcomes whose N_half = k has j in its confidence
  range, a contiguous run of k (the Clopper-Pearson bounds grow with k), so
  outcomes are kept sorted by k and a row updates one slice. Rows are
  computed on first need; an outcome's sup is final once its range is done.
  """

  def __init__(self, n, eps, gamma):
    self.n, self.eps, self.q = n, eps, _boundary(eps)[1]
    self.lo, self.hi = _ranges(n, eps, gamma)
    _, ih, i1, last, _ = _outcomes(n, eps)
    by_k = np.argsort(ih, kind="stable")
    self.last = last[by_k]
    self.starts = np.searchsorted(ih[by_k], np.arange(n + 2))
    self.index = np.full((n + 1, n + 1), -1)
    self.index[ih[by_k], i1[by_k]] = np.arange(ih.size)
    self.sup = np.zeros(ih.size)
    self.done = np.zeros(len(self.q), bool)

  def get(self, ks):
    j = np.arange(len(self.q))[:, None]
    need = ((j >= self.lo[ks]) & (j <= self.hi[ks])).any(1) & ~self.done

    def row(r):
      run = np.flatnonzero((self.lo <= r) & (self.hi >= r))
      cut = slice(self.starts[run[0]], self.starts[run[-1] + 1])
      return cut, _upper(*_cumsum(self.n, self.eps, self.q[r]), self.last[cut])
    # Rows are independent and numpy releases the GIL in their O(n^2) sums:
    # two at a time on two cores. The max over rows is the same in any order.
    with concurrent.futures.ThreadPoolExecutor(_threads()) as pool:
      for cut, vals in pool.map(row, np.flatnonzero(need)):
        np.maximum(self.sup[cut], vals, out=self.sup[cut])
    self.done |= need
    return self.sup


def _threads() -> int:
  # rcst_jax.core.host.cores(), restated: stats imports nothing from the package.
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return max(1, min(4, cores or 1))


@functools.lru_cache(maxsize=8)
def _table(n: int, eps: float, gamma: float) -> _Table:
  return _Table(n, eps, gamma)


def exact_pvalue(losses, eps: float, gamma: float = 1e-4):
  """Exact (Berger-Boos) p-value for H0: mean loss >= eps, losses in {0, 1/2, 1}; see module."""
  n, k, n1 = counts(losses, eps)
  if not 0.0 <= gamma < 1.0:
    raise ValueError(f"gamma must be in [0, 1), got {gamma}")
  table = _table(n, float(eps), float(gamma))
  return np.minimum(1.0, table.get(np.unique(k))[table.index[k, n1]] + gamma)
