"""Exact three-valued p-value (stats.exact): exactness, validity, power against betting."""

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
  i0, ih, i1, last, _ = exact._outcomes(n, eps)
  pmf = _multinomial_pmf(n, np.asarray(q, float), i0, ih, i1)
  stat_rank = last   # outcomes are sorted by T*; ties share the rank of their last member
  return np.array([pmf[stat_rank <= r].sum() for r in stat_rank])


def test_cdf_matches_brute_force_and_statistic_is_monotone():
  n, eps = 9, 0.51
  i0, ih, i1, last, index = exact._outcomes(n, eps)
  for q in ([0.3, 0.5, 0.2], [0.6, 0.4, 0.0], [0.1, 0.1, 0.8], [0.0, 0.3, 0.7]):
    got = exact._upper(*exact._cumsum(n, eps, np.asarray(q, np.float64)), last)
    want = _tail(n, eps, q)
    assert np.all(got >= np.minimum(want, 1.0)) and np.all(got <= want * (1 + 1e-9) + 1e-290)
  rank = np.full((n + 1, n + 1), -1)
  rank[i1, i1 + ih] = last                               # by (#ones, #(>= 1/2))
  for a, b in zip(i1, i1 + ih):                          # one sample up never lowers T*
    if b < n:
      assert rank[a, b + 1] >= rank[a, b]                # 0 -> 1/2
    if a < b:
      assert rank[a + 1, b] >= rank[a, b]                # 1/2 -> 1


def test_grid_max_bounds_every_null_point_and_is_tight():
  """gamma = 0: p(u) >= P_P(T* <= T*(u)) for null points off and on the boundary,
  and p is within a small margin of the sup over a fine boundary grid."""
  n, rng = 10, np.random.default_rng(0)
  for eps in (0.3, 0.51, 0.8):
    i0, ih, i1, _, _ = exact._outcomes(n, eps)
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
