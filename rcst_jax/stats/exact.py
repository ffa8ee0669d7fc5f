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
(0.044 at n = 500, G = 512). Cost: a running sum over the O(n^2) outcomes
per grid interval, computed once per (n, eps, gamma) and only for the
intervals the observed counts need; after that a p-value is a table look-up.
The sums skip the terms that cannot change them (`_running_sum`): bit for
bit the full sums, at a fraction of the cost for large n.

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
  """Every count (n0, nh, n1) summing to n, sorted by T*, and per outcome the rank of its last tie.

  Ties keep the order by n1, then nh, so the rank grows with n1 at fixed nh
  (T* does not fall when a 1/2 becomes a 1).
  """
  a = np.arange(n + 1)
  stat = _monotone_stat(n, eps)[a[:, None] <= a]   # row-major: by n1, then nh = b - n1 from 0
  order = np.argsort(stat, kind="stable")
  stat = stat[order]
  width, shift = n + 1 - a, n.bit_length()
  nh = np.arange(stat.size) - np.repeat(np.cumsum(width) - width, width)
  packed = (np.repeat(a << shift, width) | nh)[order]   # one gather instead of two
  n1, nh = packed >> shift, packed & ((1 << shift) - 1)
  return n - n1 - nh, nh, n1, _last_of_ties(stat)


def _last_of_ties(stat):
  """Per position of the sorted `stat`, the last position holding the same value."""
  last = np.arange(stat.size)
  tie = np.flatnonzero(stat[1:] == stat[:-1])   # i ties with i + 1: rare, so fix those only
  if tie.size:
    run_end = np.append(np.flatnonzero(np.diff(tie) != 1), tie.size - 1)
    last[tie] = np.repeat(tie[run_end] + 1, np.diff(run_end, prepend=-1))
  return last


def _monotone_stat(n: int, eps: float):
  """T* by (a, b) = (#ones, #(>= 1/2)), [n + 1, n + 1]; only a <= b is filled."""
  grid = np.full((n + 1, n + 1), np.inf)
  for n1 in range(n + 1):   # row by row: the temporaries stay in cache
    nh = np.arange(n + 1 - n1)
    mean = (nh + 2 * n1) / (2 * n)
    grid[n1, n1:] = (mean - eps) / np.sqrt(((nh / 4 + n1) / n - mean * mean + 0.25 / n) / n)
  # min over a' >= a, then b' >= b (exact in any order): in place, row by row
  for a in range(n - 1, -1, -1):
    np.minimum(grid[a, a:], grid[a + 1, a:], out=grid[a, a:])
  for a in range(n + 1):
    tail = grid[a, a:][::-1]
    np.minimum.accumulate(tail, out=tail)
  return grid


@functools.lru_cache(maxsize=4)
def _lgamma(n: int):
  return np.array([math.lgamma(j + 1.0) for j in range(n + 1)])


@functools.lru_cache(maxsize=4)
def _narrow(n: int, eps: float):
  """(n0, nh, n1) of `_outcomes`, unsigned and narrow: cheap to scan once per grid row."""
  return tuple(x.astype(np.uint16 if n < 2**16 else np.uint32) for x in _outcomes(n, eps)[:3])


def _column(n: int, eps: float, q_row, ranks):
  """`_upper` at `ranks` for the running sum of the pmf of q_row in `_outcomes` order.

  A term is K Pois(n0; n q0) Pois(nh; n qh) Pois(n1; n q1), K = n! e^n / n^n
  < 3 sqrt(n): three factors <= 1 from (n + 1)-long tables, no per-term exp,
  no overflow. Only terms below K * 1e-307 can underflow (their total is
  `lost`); rounding is covered by the factor (1 + 1e-10) of `_upper`.
  """
  k, lg = np.arange(n + 1), _lgamma(n)
  big_k = math.exp(lg[n] + n - n * math.log(n))
  lost = (n + 1) * (n + 2) // 2 * big_k * 1e-307
  row = np.asarray(q_row, np.float64)
  pois = np.exp(k * _log(n * row)[:, None] - n * row[:, None] - lg)   # [3, n + 1]
  factors = (pois[0], pois[1], pois[2] * big_k)
  if (n + 1) * (n + 2) // 2 <= _SMALL or len(ranks) > _FEW * np.max(ranks):
    # Small tables, or ranks all over: every term, one cumsum (fewer calls).
    i0, ih, i1, _ = _outcomes(n, eps)
    t = np.take(factors[0], i0)
    t *= np.take(factors[1], ih)
    t *= np.take(factors[2], i1)
    return _upper(np.take(np.cumsum(t, out=t), ranks), lost)
  return _running_sum(factors, _narrow(n, eps), np.asarray(ranks), lost)


# Skipping terms pays for tables of over _SMALL outcomes, when under a fraction _FEW of the
# ranks up to the largest one asked are asked: looking many up costs more than every term.
_SMALL, _FEW = 1 << 18, 1 / 8
_CHUNK = 1 << 17


def _running_sum(factors, coords, ranks, lost):
  """`_upper` at each rank of the running sum of the terms f0[n0] * fh[nh] * f1[n1]."""
  # Each rank is looked up in its chunk, in order: (rank, where) in one key sorts fastest.
  key = ranks.astype(np.uint64) << np.uint64(32) | np.arange(len(ranks), dtype=np.uint64)
  key.sort()
  needles, where = (key >> np.uint64(32)).astype(np.int64), key & np.uint64(2**32 - 1)
  out, done = np.ones(len(ranks)), 0   # ranks past where the bound reached 1 keep their 1
  for c, e, sel, csum, before in _chunk_sums(factors, coords, int(needles[-1]), lost):
    upto = int(np.searchsorted(needles, e))
    if sel.size:
      at = np.searchsorted(sel, needles[done:upto], "right") - 1   # the last term summed
      sums = np.where(at >= 0, np.take(csum, at), before)
    else:
      sums = np.full(upto - done, before)
    out[where[done:upto].astype(np.int64)] = _upper(sums, lost)
    done = upto
  return out


def _chunk_sums(factors, coords, top, lost):
  """Per chunk [c, e) of ranks up to `top`: (c, e, ranks summed, running sums there, the sum
  before c); it stops once `_upper` of the sum is 1.

  Bit for bit np.cumsum over every term (a sequential sum), but only the
  terms that can change it are summed: adding a term below half an ulp of
  the sum so far, or an exact 0, leaves the sum as it is. The sum only
  grows, so in each chunk a term below 2^-54 times the sum at the chunk's
  start (under half its ulp) is skipped; each factor's range comes from a
  bound on the other two (a box in (n0, nh, n1)), so no skipped term is ever
  computed.
  """
  top_f, total = [float(f.max()) for f in factors], 0.0
  for c in range(0, top + 1, _CHUNK):
    e = min(top + 1, c + _CHUNK)
    sel = _in_box(coords, _box(factors, top_f, total), c, e)
    t = np.take(factors[0], coords[0][sel])
    t *= np.take(factors[1], coords[1][sel])
    t *= np.take(factors[2], coords[2][sel])
    if sel.size:
      t[0] += total   # the sum so far, added first: as in the sequential sum
    csum = np.cumsum(t, out=t)
    yield c, e, sel, csum, total
    total = float(csum[-1]) if csum.size else total
    if _upper(total, lost) >= 1.0:
      return


def _box(factors, top_f, total):
  """Per factor (lo, span): the indices where a term can reach 2^-54 * total (or be nonzero)."""
  box = []
  for j, f in enumerate(factors):
    # t >= y needs f_j >= y / (max of the other two) up to rounding: 0.25 covers it. Near
    # underflow (total <= 1e-280) the bound is not safe, so skip exact zeros only.
    floor = 0.25 * total * 2.0**-54 / (top_f[j - 1] * top_f[j - 2]) if total > 1e-280 else 0.0
    nz = np.flatnonzero(f > floor) if floor == 0.0 else np.flatnonzero(f >= floor)
    box.append((int(nz[0]), int(nz[-1] - nz[0])) if nz.size else (0, -1))
  return box


def _in_box(coords, box, c, e):
  """Ranks in [c, e) whose (n0, nh, n1) lie in the box."""
  keep = None
  for (lo, span), u in zip(box, coords):
    if span < 0:
      return np.zeros(0, np.int64)
    part = (u[c:e] - u.dtype.type(lo)) <= span   # below lo wraps around: one compare
    keep = part if keep is None else np.logical_and(keep, part, out=keep)
  return np.flatnonzero(keep) + c


def _upper(csum, lost):
  """Upper bound on P(T* <= T*(u)) from the running sum at u's last tie (measured error ~1e-13)."""
  return np.minimum(csum * (1 + 1e-10) + lost, 1.0)


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
    _, ih, i1, last = _outcomes(n, eps)
    # By k, then rank; the rank grows with n1 at fixed k, so (k, n1) sits at starts[k] + n1.
    self.starts = np.append(0, np.cumsum(n + 1 - np.arange(n + 1)))
    self.last = np.empty_like(last)
    self.last[self.starts[ih] + i1] = last
    self.sup = np.zeros(last.size)
    if last.size > _SMALL:
      _narrow(n, eps)   # built once here, not by two row threads at a time
    self.done = np.zeros(len(self.q), bool)

  def get(self, ks):
    j = np.arange(len(self.q))[:, None]
    need = ((j >= self.lo[ks]) & (j <= self.hi[ks])).any(1) & ~self.done

    def row(r):
      run = np.flatnonzero((self.lo <= r) & (self.hi >= r))
      cut = slice(self.starts[run[0]], self.starts[run[-1] + 1])
      return cut, _column(self.n, self.eps, self.q[r], self.last[cut])
    # Rows are independent and numpy releases the GIL in their scans and sums:
    # two at a time on two cores. The max over rows is the same in any order.
    with concurrent.futures.ThreadPoolExecutor(_threads()) as pool:
      for cut, vals in pool.map(row, np.flatnonzero(need)):
        np.maximum(self.sup[cut], vals, out=self.sup[cut])
    self.done |= need
    return self.sup


def _threads() -> int:
  # rcst_edge.host.cores(), restated: stats imports nothing from the package.
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
  return np.minimum(1.0, table.get(np.unique(k))[table.starts[k] + n1] + gamma)
