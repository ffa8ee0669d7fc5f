"""Exact three-valued p-value (stats.exact): exactness, validity, power against betting, and
bit-for-bit agreement with the straightforward computation."""

import functools
import math

import numpy as np
import pytest

from rcst_jax.stats import exact, ltt

VALUES = np.array([0.0, 0.5, 1.0])


def _slack(u, draws):
  return 3 * math.sqrt(u * (1 - u) / draws)


def _from_counts(n0, nh, n1):
  return np.repeat(VALUES, [n0, nh, n1])


def _null_point(eps, h):
  """(p0, ph, p1) on the boundary E X = eps with ph = h."""
  p1 = eps - h / 2
  return np.array([1 - h - p1, h, p1])


def _multinomial_pmf(n, q, i0, ih, i1):
  coef = np.array([math.factorial(n) // (math.factorial(a) * math.factorial(b) * math.factorial(c))
                   for a, b, c in zip(i0, ih, i1)], float)
  return coef * np.power(q[0], i0) * np.power(q[1], ih) * np.power(q[2], i1)


def _tail(n, eps, q):
  """P_q(T* <= T*(u)) for every outcome, by brute force over the outcomes."""
  i0, ih, i1, last = exact._outcomes(n, eps)
  pmf = _multinomial_pmf(n, np.asarray(q, float), i0, ih, i1)
  stat_rank = last   # outcomes are sorted by T*; ties share the rank of their last member
  return np.array([pmf[stat_rank <= r].sum() for r in stat_rank])


def test_cdf_matches_brute_force_and_statistic_is_monotone():
  n, eps = 9, 0.51
  i0, ih, i1, last = exact._outcomes(n, eps)
  for q in ([0.3, 0.5, 0.2], [0.6, 0.4, 0.0], [0.1, 0.1, 0.8], [0.0, 0.3, 0.7]):
    got = exact._column(n, eps, np.asarray(q, np.float64), last)
    want = _tail(n, eps, q)
    assert np.all(got >= np.minimum(want, 1.0)) and np.all(got <= want * (1 + 1e-9) + 1e-290)
  rank = np.full((n + 1, n + 1), -1)
  rank[i1, i1 + ih] = last                               # by (#ones, #(>= 1/2))
  for a, b in zip(i1, i1 + ih):                          # one sample up never lowers T*
    if b < n:
      assert rank[a, b + 1] >= rank[a, b]                # 0 -> 1/2
    if a < b:
      assert rank[a + 1, b] >= rank[a, b]                # 1/2 -> 1


# The straightforward computation that stats.exact must match bit for bit: every outcome,
# every term of every grid row summed in rank order (np.cumsum), the max over the rows.


@functools.lru_cache(maxsize=None)
def _reference_outcomes(n, eps):
  n1, nh = (a.ravel() for a in np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij"))
  keep = n1 + nh <= n
  n1, nh = n1[keep], nh[keep]
  mean = (nh + 2 * n1) / (2 * n)
  stat = (mean - eps) / np.sqrt(((nh / 4 + n1) / n - mean * mean + 0.25 / n) / n)
  grid = np.full((n + 1, n + 1), np.inf)   # by (#ones, #(>= 1/2)); min over all (a', b') >= (a, b)
  grid[n1, n1 + nh] = stat
  grid = np.minimum.accumulate(np.minimum.accumulate(grid[::-1], 0)[:, ::-1], 1)[::-1, ::-1]
  stat = grid[n1, n1 + nh]
  order = np.argsort(stat, kind="stable")
  n1, nh, stat = n1[order], nh[order], stat[order]
  return n - n1 - nh, nh, n1, np.searchsorted(stat, stat, "right") - 1


def _reference_bounds(n, eps, q_row):
  """The upper bound at every outcome's last tie, from the full running sum."""
  i0, ih, i1, last = _reference_outcomes(n, eps)
  k, lg = np.arange(n + 1), np.array([math.lgamma(j + 1.0) for j in range(n + 1)])
  big_k = math.exp(lg[n] + n - n * math.log(n))
  row = np.asarray(q_row, np.float64)
  pois = np.exp(k * exact._log(n * row)[:, None] - n * row[:, None] - lg)
  t = pois[0][i0] * pois[1][ih] * (pois[2] * big_k)[i1]
  return np.minimum(np.cumsum(t)[last] * (1 + 1e-10) + i0.size * big_k * 1e-307, 1.0)


def _reference_pvalues(n, eps, gamma):
  """[nh, n1] -> p-value: the max over the grid rows in the range of nh, plus gamma."""
  i0, ih, i1, _ = _reference_outcomes(n, eps)
  lo, hi = exact._ranges(n, eps, gamma)
  sup = np.zeros(ih.size)
  for r, row in enumerate(exact._boundary(eps)[1]):
    mine = (lo[ih] <= r) & (hi[ih] >= r)
    if mine.any():
      sup[mine] = np.maximum(sup[mine], _reference_bounds(n, eps, row)[mine])
  p = np.full((n + 1, n + 1), np.nan)
  p[ih, i1] = np.minimum(1.0, sup + gamma)
  return p


def _same_bits(a, b):
  return a.dtype == b.dtype and np.array_equal(np.asarray(a).view(np.uint8),
                                               np.asarray(b).view(np.uint8))


@pytest.mark.parametrize("n", [1, 2, 9, 60, 233])
def test_outcomes_bit_equal_to_the_straightforward_sort(n):
  for eps in (0.02, 0.3, 0.5, 0.51, 0.8):
    for got, want in zip(exact._outcomes(n, eps), _reference_outcomes(n, eps)):
      assert _same_bits(got, want), (n, eps)


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("n,eps", [(60, 0.02), (60, 0.51), (150, 0.3), (150, 0.51), (150, 0.8),
                                   (150, 0.97)])
def test_pvalues_bit_equal_to_the_full_running_sums(n, eps, skip, monkeypatch):
  """Every outcome's p-value. skip: the sums that skip terms (as for large n), in chunks small
  enough that every skip rule runs many times; else every term (as for small n)."""
  if skip:
    monkeypatch.setattr(exact, "_SMALL", 0)
    monkeypatch.setattr(exact, "_FEW", np.inf)
    monkeypatch.setattr(exact, "_CHUNK", n * 6 + 7)
  exact._table.cache_clear()
  i0, ih, i1, _ = _reference_outcomes(n, eps)
  samples = np.stack([_from_counts(a, b, c) for a, b, c in zip(i0, ih, i1)])
  for gamma in (0.0, 1e-4):
    want = _reference_pvalues(n, eps, gamma)[ih, i1]
    assert _same_bits(exact.exact_pvalue(samples, eps, gamma), want), (gamma,)
  exact._table.cache_clear()


@pytest.mark.parametrize("n,chunk", [(40, 7), (400, 501), (700, 1 << 16)])
def test_bounds_bit_equal_at_any_ranks(n, chunk, monkeypatch):
  """A few ranks, up to any top (the sum may stop short of 1), for boundary and other rows."""
  monkeypatch.setattr(exact, "_SMALL", 0)
  monkeypatch.setattr(exact, "_FEW", np.inf)
  monkeypatch.setattr(exact, "_CHUNK", chunk)
  rng = np.random.default_rng(n)
  for eps in (0.02, 0.51, 0.9):
    last = _reference_outcomes(n, eps)[3]
    q = exact._boundary(eps)[1]
    for trial in range(8):
      row = q[rng.integers(len(q))] if trial % 3 else rng.dirichlet([0.3, 0.3, 0.3])
      top = int(rng.integers(last.size))
      ranks = last[rng.integers(0, top + 1, int(rng.integers(1, 3000)))]
      want = _reference_bounds(n, eps, row)
      assert _same_bits(exact._column(n, eps, row, ranks), want[ranks])   # want[r]: r ends its tie


def test_grid_max_bounds_every_null_point_and_is_tight():
  """gamma = 0: p(u) >= P_P(T* <= T*(u)) for null points off and on the boundary,
  and p is within a small margin of the sup over a fine boundary grid."""
  n, rng = 10, np.random.default_rng(0)
  for eps in (0.3, 0.51, 0.8):
    i0, ih, i1, _ = exact._outcomes(n, eps)
    samples = np.stack([_from_counts(a, b, c) for a, b, c in zip(i0, ih, i1)])
    p = exact.exact_pvalue(samples, eps, gamma=0.0)
    ph = rng.uniform(0, 1, 200)
    p1 = rng.uniform(0, 1 - ph)
    for a, b in zip(ph, p1):                             # interior and boundary points
      if a / 2 + b >= eps:
        assert np.all(_tail(n, eps, [1 - a - b, a, b]) <= p + 1e-12)
    top = min(2 * eps, 2 * (1 - eps))
    sup = np.max([_tail(n, eps, _null_point(eps, h)) for h in np.linspace(0, top, 301)], 0)
    assert np.all(p >= sup - 1e-12) and np.all(p <= sup + 0.01)


@pytest.mark.parametrize("eps,h,n", [(0.3, 0.0, 200), (0.3, 0.3, 200), (0.3, 0.6, 200),
                                     (0.51, 0.1, 200), (0.51, 0.9, 200), (0.51, 0.96, 500)])
def test_valid_on_the_null_boundary(eps, h, n):
  """Few halves (h small) to nearly all halves (the accuracy drop: mostly zeros)."""
  draws, rng = 4000, np.random.default_rng(int(100 * eps + 10 * h))
  x = rng.choice(VALUES, p=_null_point(eps, h), size=(draws, n))
  for gamma in (0.0, 1e-4):
    p = exact.exact_pvalue(x, eps, gamma=gamma)
    for u in (0.05, 0.1):
      assert (p <= u).mean() <= u + _slack(u, draws), (gamma, u, (p <= u).mean())


def test_valid_inside_the_null():
  """Mean above eps: stochastically larger losses, rejections rarer still."""
  draws, rng, eps = 2000, np.random.default_rng(5), 0.51
  x = rng.choice(VALUES, p=[0.03, 0.9, 0.07], size=(draws, 300))  # mean 0.52
  assert (exact.exact_pvalue(x, eps) <= 0.1).mean() <= 0.1 + _slack(0.1, draws)


@pytest.mark.parametrize("p_minus,p_plus", [(0.05, 0.03), (0.10, 0.08), (0.20, 0.15)])
def test_at_least_as_powerful_as_betting_on_accuracy_drop(p_minus, p_plus):
  """Accuracy drop mostly 0 (rescaled: 1/2), R = p_plus - p_minus < eps = 0.02."""
  draws, rng = 2000, np.random.default_rng(7)
  x, e = ltt.rescale_accuracy_drop(
      rng.choice([-1.0, 0.0, 1.0], p=[p_minus, 1 - p_minus - p_plus, p_plus], size=(draws, 500)),
      0.02)
  rej_exact = (exact.exact_pvalue(x, e) <= 0.1).mean()
  rej_wsr = (ltt.wsr_pvalue(x, e, 0.1) <= 0.1).mean()
  assert rej_exact >= rej_wsr and rej_exact > 0.5, (rej_exact, rej_wsr)


def test_binary_losses_recover_the_binomial_test():
  """No 1/2 values: ph's confidence set is near 0 and p is the binomial tail (plus gamma)."""
  rng = np.random.default_rng(3)
  for n, eps in [(200, 0.3), (500, 0.51), (300, 0.1), (100, 0.8)]:
    x = (rng.random((200, n)) < eps * rng.uniform(0.6, 1.1, (200, 1))).astype(float)
    b, p = ltt.binomial_pvalue(x, eps), exact.exact_pvalue(x, eps, gamma=1e-4)
    assert np.all(p >= np.minimum(b + 1e-4, 1.0) - 1e-12)
    small = b <= 0.1
    assert np.all(p[small] <= 1.05 * b[small] + 2e-4)
    assert np.all(p <= b + 0.01)


@pytest.mark.parametrize("bad", [[0.0, 0.25, 1.0], [-1.0, 0.0, 1.0], [0.0, 2.0], [0.0, np.nan],
                                 np.zeros((3, 0))])
def test_refuses_other_losses(bad):
  with pytest.raises(ValueError, match="loss"):
    exact.exact_pvalue(np.asarray(bad, float), 0.3)


def test_refuses_bad_eps_and_gamma():
  with pytest.raises(ValueError, match="eps"):
    exact.exact_pvalue(np.zeros(5), 1.0)
  with pytest.raises(ValueError, match="gamma"):
    exact.exact_pvalue(np.zeros(5), 0.3, gamma=1.0)


def test_vectorised_order_free_and_wired_into_ltt():
  rng = np.random.default_rng(11)
  x, e = ltt.rescale_accuracy_drop(
      rng.choice([-1.0, 0.0, 1.0], p=[0.08, 0.9, 0.02], size=(4, 3, 400)), 0.02)
  p = exact.exact_pvalue(x, e)
  assert p.shape == (4, 3)
  np.testing.assert_array_equal(p[1, 2], exact.exact_pvalue(x[1, 2], e))
  np.testing.assert_array_equal(p, exact.exact_pvalue(x[..., rng.permutation(400)], e))
  np.testing.assert_array_equal(ltt.config_pvalues(x, e, 0.1, test="exact"), p)
  res = ltt.pareto_testing(x, rng.random((4, 3)), e, 0.1, test="exact")
  assert res.certified.any() and res.chosen is not None
  assert np.all(res.pvalues >= 1e-4)


def test_schema_accepts_exact():
  from rcst_jax.settings import schema
  assert schema.SCHEMA["certify.test"]("exact") is None
  assert schema.SCHEMA["certify.test"]("exactly") is not None
