"""Learn-then-Test core: losses, p-values (exactness and validity), FWER control, Pareto testing."""

import math
from fractions import Fraction

import numpy as np
import pytest

from rcst_jax.stats import ltt, sizing


def _slack(delta, draws):
  return 3 * math.sqrt(delta * (1 - delta) / draws)


# ---------------------------------------------------------------------------
# Losses and cost.


def test_losses_follow_algorithm2_by_hand():
  labels = np.array([0, 1, 2, 3])
  edge_pred = np.array([0, 0, 2, 0])        # right, wrong, right, wrong
  p_max = np.array([0.9, 0.8, 0.3, 0.2])
  server_only = np.array([0, 1, 0, 3])      # right, right, wrong, right
  server_pred = np.array([[0, 1, 2, 3],     # tau 0: all right
                          [0, 2, 0, 0]])    # tau 1: only image 0 right
  kept = np.array([[10, 10, 10, 10], [5, 5, 5, 5]])
  lambdas = np.array([0.0, 0.5, 1.1])       # accept all / images 0,1 / none
  args = (labels, edge_pred, p_max, server_only, server_pred, lambdas)
  err = ltt.system_error(labels, edge_pred, p_max, server_pred, lambdas)
  np.testing.assert_array_equal(err[0], [[0, 1, 0, 1]] * 2)
  np.testing.assert_array_equal(err[1], [[0, 1, 0, 0], [0, 1, 1, 1]])
  np.testing.assert_array_equal(err[2], [[0, 0, 0, 0], [0, 1, 1, 1]])
  drop = ltt.accuracy_drop(*args)
  np.testing.assert_array_equal(drop[1], [[0, 1, -1, 0], [0, 1, 0, 1]])
  deg = ltt.degradation(*args)
  np.testing.assert_array_equal(deg[1], [[0, 1, 0, 0], [0, 1, 0, 1]])
  assert set(np.unique(drop)) <= {-1, 0, 1} and set(np.unique(deg)) <= {0, 1}
  edge = ltt.edge_risk(labels, edge_pred, p_max, lambdas, num_taus=2)
  assert edge.shape == (3, 2, 4)
  np.testing.assert_array_equal(edge[:, 0], [[0, 1, 0, 1], [0, 1, 0, 0], [0, 0, 0, 0]])
  np.testing.assert_array_equal(edge[:, 0], edge[:, 1])
  cost = ltt.patch_cost(p_max, kept, lambdas, num_patches=10)
  np.testing.assert_allclose(cost, [[0, 0], [0.5, 0.25], [1.0, 0.5]])
  assert ltt.patch_cost(p_max, kept, lambdas, 10, per_image=True).shape == (3, 2, 4)
  x, e = ltt.rescale_accuracy_drop(drop, 0.02)
  assert x.min() >= 0 and x.max() <= 1 and e == pytest.approx(0.51)
  assert np.all((drop.mean(-1) <= 0.02) == (x.mean(-1) <= e))


# ---------------------------------------------------------------------------
# p-values: exactness.


def _exact_binom_cdf(k, n, eps):
  p = Fraction(str(eps))
  return float(sum(math.comb(n, j) * p**j * (1 - p)**(n - j) for j in range(k + 1)))


def test_binomial_pvalue_is_exact_binomial_tail():
  rng = np.random.default_rng(0)
  for n, eps in [(1, 0.3), (50, 0.1), (400, 0.05), (3000, 0.2)]:
    x = (rng.random((6, n)) < eps * rng.uniform(0.5, 1.5, (6, 1))).astype(float)
    p = ltt.binomial_pvalue(x, eps)
    want = [_exact_binom_cdf(int(s), n, eps) for s in x.sum(-1)]
    np.testing.assert_allclose(p, want, rtol=1e-9, atol=1e-300)


def test_binomial_pvalue_matches_scipy_and_rejects_nonbinary():
  stats = pytest.importorskip("scipy.stats")
  rng = np.random.default_rng(1)
  x = (rng.random((20, 5000)) < 0.04).astype(float)
  np.testing.assert_allclose(ltt.binomial_pvalue(x, 0.05),
                             stats.binom.cdf(x.sum(-1), 5000, 0.05), rtol=1e-9, atol=1e-300)
  with pytest.raises(ValueError):
    ltt.binomial_pvalue(np.full(10, 0.5), 0.1)
  with pytest.raises(ValueError):
    ltt.hb_pvalue(np.full(10, -0.5), 0.1)
  with pytest.raises(ValueError):
    ltt.system_error(np.zeros(3), np.zeros(3), np.ones(3), np.zeros(3), np.array([0.5]))


def test_hb_pvalue_formula():
  stats = pytest.importorskip("scipy.stats")
  rng = np.random.default_rng(2)
  x = rng.beta(1, 9, (10, 300))
  n, eps = 300, 0.1
  mu = np.minimum(x.mean(-1), eps)
  h1 = mu * np.log(mu / eps) + (1 - mu) * np.log((1 - mu) / (1 - eps))
  want = np.minimum(np.exp(-n * h1), math.e * stats.binom.cdf(np.ceil(n * x.mean(-1)), n, eps))
  np.testing.assert_allclose(ltt.hb_pvalue(x, eps), np.minimum(want, 1), rtol=1e-7)
  # Zero losses: Hoeffding gives 0.9**100, Bentkus e * 0.9**100; the min is Hoeffding.
  assert ltt.hb_pvalue(np.zeros(100), 0.1) == pytest.approx(0.9**100, rel=1e-9)


# ---------------------------------------------------------------------------
# p-values: validity under the null (mean exactly eps), >= 500 draws.


NULLS = {
    "bernoulli": lambda rng, s, eps: (rng.random(s) < eps).astype(float),
    "beta": lambda rng, s, eps: rng.beta(0.5, 0.5 * (1 - eps) / eps, s),
    "three_point": lambda rng, s, eps: _three_point(rng, s, eps),
}


def _three_point(rng, s, eps):
  # Values {0, 0.5, 1} with P(1) = eps/2 and P(0.5) = eps: mean eps, not Bernoulli.
  u = rng.random(s)
  return np.where(u < eps / 2, 1.0, np.where(u < 1.5 * eps, 0.5, 0.0))


@pytest.mark.parametrize("null,test", [("bernoulli", "binomial")] + [
    (null, test) for null in NULLS for test in ("hb", "wsr")])   # binomial: binary only
def test_pvalues_are_valid_under_the_null(null, test):
  rng = np.random.default_rng([list(NULLS).index(null), len(test)])  # fixed, not hash()
  draws, n, eps, delta = 2000, 200, 0.1, 0.1
  x = NULLS[null](rng, (draws, n), eps)
  assert abs(x.mean() - eps) < 0.01
  p = ltt.config_pvalues(x, eps, delta, test)
  assert p.shape == (draws,) and np.all((p >= 0) & (p <= 1))
  for level in (delta, 0.05, 0.2):
    assert np.mean(p <= level) <= level + _slack(level, draws)


# ---------------------------------------------------------------------------
# Multiple testing.


def test_fixed_sequence_adjusted_stops_at_first_failure():
  # Adjusted p = running max, so adjusted <= delta rejects up to the first p > delta.
  for p, want in [([0.01, 0.02, 0.2, 0.01], [0.01, 0.02, 0.2, 0.2]),
                  ([0.06, 0.0, 0.0], [0.06, 0.06, 0.06]),
                  ([0.05, 0.05], [0.05, 0.05]),          # p <= delta rejects: 2
                  ([], []),
                  (np.zeros(7), np.zeros(7))]:
    np.testing.assert_array_equal(ltt.fixed_sequence_adjusted(p), want)
  assert (ltt.fixed_sequence_adjusted([0.01, 0.02, 0.2, 0.01]) <= 0.05).sum() == 2


def test_bonferroni_adjusted():
  # min(1, m p) with m = 4: rejected at delta = 0.05 iff p <= 0.05 / 4.
  p = np.array([[0.001, 0.02], [0.0125, 0.3]])
  np.testing.assert_allclose(ltt.bonferroni_adjusted(p), [[0.004, 0.08], [0.05, 1.0]],
                             rtol=1e-15)
  np.testing.assert_array_equal(ltt.bonferroni_adjusted(p) <= 0.05,
                                [[True, False], [True, False]])
  assert (ltt.bonferroni_adjusted(np.full(100, 0.0005)) <= 0.05).all()
  assert not (ltt.bonferroni_adjusted(np.full(100, 0.0006)) <= 0.05).any()


def test_pareto_order_front_first():
  order, front = ltt.pareto_order(np.array([1, 2, 3, 4.0]), np.array([0.5, 0.1, 0.2, -0.1]))
  np.testing.assert_array_equal(front, [True, True, False, True])
  np.testing.assert_array_equal(order, [3, 1, 0, 2])


def test_betting_certifies_at_least_as_often_as_hb_on_low_variance_losses():
  # Accuracy-drop-like losses: -1 w.p. 0.03, +1 w.p. 0.01, else 0; true drop -0.02,
  # tested against eps = 0.02, i.e. rescaled mean 0.49 against eps' = 0.51.
  rng = np.random.default_rng(3)
  draws, n, delta = 300, 1000, 0.1
  u = rng.random((draws, n))
  drop = np.where(u < 0.03, -1.0, np.where(u < 0.04, 1.0, 0.0))
  x, e = ltt.rescale_accuracy_drop(drop, 0.02)
  rate = {t: np.mean(ltt.config_pvalues(x, e, delta, t) <= delta) for t in ("hb", "wsr")}
  print("certification rates", rate)
  assert rate["wsr"] >= rate["hb"]
  assert rate["wsr"] > 0.5


# ---------------------------------------------------------------------------
# End-to-end LTT validity on a synthetic edge/server population.


def _population(num=20000, seed=0, num_patches=196):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 10, num)
  p_max = rng.beta(4, 1.5, num)
  edge_pred = np.where(rng.random(num) < p_max, labels, (labels + 1) % 10)
  server_ok = rng.random(num) < 0.75 + 0.2 * p_max
  server_only = np.where(server_ok, labels, (labels + 2) % 10)
  fracs = np.array([0.1, 0.2, 0.35, 0.5, 0.75, 1.0])
  hard = rng.random(num)                    # images that need many patches fail first
  ok_at_tau = server_ok[None] & (hard[None] < fracs[:, None] ** 0.15)
  server_pred = np.where(ok_at_tau, labels[None], (labels[None] + 3) % 10)
  spread = rng.uniform(0.7, 1.3, num)
  kept = np.clip(np.rint(fracs[:, None] * spread[None] * num_patches), 1, num_patches)
  lambdas = np.linspace(0.5, 1.0, 11)
  return dict(labels=labels, edge_pred=edge_pred, p_max=p_max, server_only_pred=server_only,
              server_pred=server_pred, kept=kept, lambdas=lambdas, num_patches=num_patches)


def _losses(pop, idx, kind, eps):
  args = (pop["labels"][idx], pop["edge_pred"][idx], pop["p_max"][idx],
          pop["server_only_pred"][idx], pop["server_pred"][:, idx], pop["lambdas"])
  if kind == "degradation":
    return ltt.degradation(*args), eps
  if kind == "system_error":
    return ltt.system_error(*args[:3], *args[4:]), eps
  return ltt.rescale_accuracy_drop(ltt.accuracy_drop(*args), eps)


SETTINGS = [("degradation", 0.05, 0.1, "binomial"), ("accuracy_drop", 0.03, 0.2, "wsr"),
            ("system_error", 0.15, 0.1, "hb")]


@pytest.mark.parametrize("kind,eps,delta,test", SETTINGS)
def test_ltt_end_to_end_validity_and_cost(kind, eps, delta, test):
  pop = _population()
  num, n, draws = pop["labels"].size, 500, 200
  full, e = _losses(pop, np.arange(num), kind, eps)
  risk = full.mean(-1)                      # exact population risk per (lambda, tau)
  cost_pop = ltt.patch_cost(pop["p_max"], pop["kept"], pop["lambdas"], pop["num_patches"])
  assert (risk <= e).any() and (risk > e).any()   # the grid straddles eps
  rng = np.random.default_rng(42)
  bad, any_bad, naive_bad, chosen_any, cost_pt, cost_bf = 0, 0, 0, 0, [], []
  for d in range(draws):
    idx = rng.integers(0, num, n)           # i.i.d. calibration set
    losses, _ = _losses(pop, idx, kind, eps)
    costs = ltt.patch_cost(pop["p_max"][idx], pop["kept"][:, idx], pop["lambdas"],
                               pop["num_patches"], per_image=True)
    res = ltt.pareto_testing(losses, costs, e, delta, test=test, seed=d)
    assert res.certified.shape == risk.shape and res.n_test + res.n_opt == n
    any_bad += (risk[res.certified] > e).any()   # the FWER event, stronger than "chosen bad"
    if res.chosen is not None:
      chosen_any += 1
      bad += risk[res.chosen] > e
      assert res.certified[res.chosen]
    cost_pt.append(cost_pop[res.chosen] if res.chosen is not None else 1.0)
    # The check has teeth: "cheapest config with empirical risk <= eps" is not valid.
    ok = losses.mean(-1) <= e
    naive_bad += ok.any() and risk.ravel()[np.flatnonzero(ok)[np.argmin(cost_pop[ok])]] > e
    pv = ltt.config_pvalues(losses, e, delta, test)
    mask = pv <= delta / pv.size              # Bonferroni over the whole grid, by hand
    cost_bf.append(cost_pop[mask].min() if mask.any() else 1.0)
  rate, fwer = bad / draws, any_bad / draws
  print(f"{kind}: chose a config in {chosen_any}/{draws}, violation rate {rate:.3f} "
        f"(any certified bad {fwer:.3f}, naive {naive_bad / draws:.3f}), "
        f"mean cost pareto {np.mean(cost_pt):.3f} bonferroni {np.mean(cost_bf):.3f}, "
        f"best feasible {cost_pop[risk <= e].min():.3f}")
  assert chosen_any > draws // 2
  assert rate <= fwer <= delta + _slack(delta, draws)
  assert naive_bad / draws > delta + _slack(delta, draws)
  assert np.mean(cost_pt) <= np.mean(cost_bf) + 1e-12


def test_pareto_testing_split_indices_and_nothing_certified():
  rng = np.random.default_rng(5)
  losses = (rng.random((3, 2, 100)) < 0.5).astype(float)   # far above eps
  costs = rng.random((3, 2))
  res = ltt.pareto_testing(losses, costs, 0.1, 0.1, test="binomial",
                               split_indices=(np.arange(40), np.arange(40, 100)))
  assert res.chosen is None and not res.certified.any()
  assert (res.n_opt, res.n_test) == (40, 60) and sorted(res.order) == list(range(6))
  # Two risks: a configuration needs both; the max p-value decides.
  good = np.zeros((3, 2, 100))
  res = ltt.pareto_testing({"a": good, "b": losses}, costs, {"a": 0.1, "b": 0.1}, 0.1,
                               test="hb", seed=0)
  assert res.chosen is None
  res = ltt.pareto_testing({"a": good, "b": good}, costs, 0.1, 0.1, test="hb", seed=0)
  assert res.certified.all() and res.chosen == np.unravel_index(np.argmin(costs), (3, 2))


def test_bonferroni_mode_tests_every_configuration_at_delta_over_m():
  rng = np.random.default_rng(7)
  # Risk rising with the cost index: some configurations clearly below eps.
  rates = np.linspace(0.0, 0.3, 12).reshape(3, 4)
  losses = (rng.random((3, 4, 400)) < rates[..., None]).astype(float)
  costs = rng.random((3, 4))
  split = (np.arange(100), np.arange(100, 400))
  res = ltt.pareto_testing(losses, costs, 0.1, 0.1, test="binomial", split_indices=split,
                               multiple_testing="bonferroni")
  # By hand: exact binomial tails on the testing split, each against delta / 12.
  want = np.array([[_exact_binom_cdf(int(losses[l, t, 100:].sum()), 300, Fraction(1, 10))
                    for t in range(4)] for l in range(3)])
  assert np.array_equal(res.certified, want <= 0.1 / 12) and res.certified.any()
  flat = np.flatnonzero(res.certified.ravel())
  assert res.chosen == np.unravel_index(flat[np.argmin(costs.ravel()[flat])], (3, 4))
  with pytest.raises(ValueError, match="multiple_testing"):
    ltt.pareto_testing(losses, costs, 0.1, 0.1, split_indices=split, multiple_testing="x")


def test_byte_cost_is_the_reported_byte_cost():
  """The byte cost LTT minimises is Table 1's: the payload bytes of the images
  the edge offloads (p_max < lambda in float32, Eq. 15) over n raw images."""
  from rcst_edge.payload.geometry import Geometry
  from rcst_jax.calibration import certificate
  rng = np.random.default_rng(3)
  p_max, nbytes = rng.random(50), rng.integers(13, 150566, (4, 50))
  lambdas = np.array([0.0, 0.3, 0.8, 1.01])
  got = certificate.byte_cost(p_max, nbytes, lambdas, Geometry())
  for l, lam in enumerate(lambdas):
    for t in range(4):
      off = ~(p_max.astype(np.float32) >= np.float32(lam))
      want = nbytes[t][off].sum() / (50 * 224 * 224 * 3)
      assert abs(got[l, t] - want) < 1e-12


# ---------------------------------------------------------------------------
# Order: the betting test needs exchangeable order; pareto_testing supplies it.


def _class_sorted_draws(draws, n, seed=0):
  """Calibration sets listed class by class (as a folder source lists them), H0 true.

  10 classes; the 3 listed last carry most of the loss: mean 0.12 > eps = 0.1.
  Each half of a sorted-index split then arrives sorted by label.
  """
  rng = np.random.default_rng(seed)
  rates = np.array([0.02] * 7 + [(0.12 - 0.7 * 0.02) / 0.3] * 3)
  labels = np.sort(rng.integers(0, 10, (draws, n)), -1)
  x = (rng.random((draws, n)) < rates[labels]).astype(float)
  fit = np.sort(rng.permuted(np.tile(np.arange(n), (draws, 1)), axis=1)[:, :n // 2], -1)
  test = np.array([np.setdiff1d(np.arange(n), f) for f in fit])   # sorted, like certification.split
  return x, fit, test, float(rates[labels].mean())


def _sorted_order_violations(x, test, eps, delta):
  """The betting test on the testing half in the caller's (label-sorted) order."""
  return np.mean(ltt.wsr_pvalue(np.take_along_axis(x, test, -1), eps, delta) <= delta)


def test_betting_test_in_sorted_order_is_invalid_and_pareto_testing_permutes():
  draws, n, eps, delta = 600, 400, 0.1, 0.1
  x, fit, test, mean = _class_sorted_draws(draws, n)
  assert abs(mean - 0.12) < 0.005   # every "within eps" claim is false
  slack = _slack(delta, draws)
  # Without the permutation the test has no validity: it rejects a false H0 most of the time.
  unpermuted = _sorted_order_violations(x, test, eps, delta)
  shuffled = np.mean(ltt.wsr_pvalue(np.random.default_rng(1).permuted(
      np.take_along_axis(x, test, -1), axis=1), eps, delta) <= delta)
  cost = np.zeros((1, 1))
  fixed = [ltt.pareto_testing(x[d][None, None], cost, eps, delta, split_indices=(fit[d], test[d]))
           for d in range(draws)]
  seeded = [ltt.pareto_testing(x[d][None, None], cost, eps, delta,
                               split_indices=(fit[d], test[d]), order_seed=d) for d in range(draws)]
  got = {k: np.mean([r.certified.any() for r in v]) for k, v in (("fixed", fixed),
                                                                   ("seeded", seeded))}
  print(f"violations: sorted {unpermuted:.3f}, shuffled {shuffled:.3f}, pareto_testing "
        f"order_seed=0 {got['fixed']:.3f}, order_seed=draw {got['seeded']:.3f}")
  assert unpermuted > 0.5 > delta + slack
  assert shuffled <= delta + slack
  assert got["seeded"] <= delta + slack and got["fixed"] <= delta + slack
  assert all(r.order_seed == d for d, r in enumerate(seeded))


def test_order_depends_on_the_index_sets_and_seed_only():
  x, fit, test, _ = _class_sorted_draws(1, 400, seed=3)
  losses, cost = np.broadcast_to(x[0], (2, 3, 400)), np.arange(6.0).reshape(2, 3)
  rng = np.random.default_rng(4)
  kw = dict(test="wsr", order_by="pvalue")
  a = ltt.pareto_testing(losses, cost, 0.1, 0.1, split_indices=(fit[0], test[0]), **kw)
  b = ltt.pareto_testing(losses, cost, 0.1, 0.1, split_indices=(rng.permutation(fit[0]),
                                                                test[0][::-1]), **kw)
  np.testing.assert_array_equal(a.pvalues, b.pvalues)
  c = ltt.pareto_testing(losses, cost, 0.1, 0.1, split_indices=(fit[0], test[0]), order_seed=5,
                         **kw)
  assert not np.array_equal(a.pvalues, c.pvalues)   # the seed does reorder the betting test
  assert (a.order_seed, c.order_seed) == (0, 5)


@pytest.mark.parametrize("test", ["binomial", "hb"])
def test_order_seed_changes_nothing_for_order_invariant_pvalues(test):
  rng = np.random.default_rng(8)
  rates = np.linspace(0.0, 0.3, 12).reshape(3, 4)
  losses = (rng.random((3, 4, 300)) < rates[..., None]).astype(float)
  costs = rng.random((3, 4))
  split = (np.arange(100), np.arange(100, 300))
  res = [ltt.pareto_testing(losses, costs, 0.1, 0.1, test=test, split_indices=split,
                            order_seed=s) for s in (0, 1, 12345)]
  for r in res[1:]:
    np.testing.assert_allclose(r.pvalues, res[0].pvalues, rtol=1e-12, atol=0)
    np.testing.assert_array_equal(r.certified, res[0].certified)
    np.testing.assert_array_equal(r.order, res[0].order)
    assert r.chosen == res[0].chosen
  assert [r.order_seed for r in res] == [0, 1, 12345]


def test_adjusted_pvalues_by_hand():
  # Binary losses on a 2 x 2 grid, testing split of 20: exact binomial p-values.
  ones = np.array([[6, 1], [0, 3]])           # losses among the 20 testing images
  losses = np.zeros((2, 2, 30))
  for (l, t), k in np.ndenumerate(ones):
    losses[l, t, 10:10 + k] = 1.0
  costs = np.array([[0.9, 0.1], [0.4, 0.6]])
  split = (np.arange(10), np.arange(10, 30))    # fitting split all zeros: order = by cost
  res = ltt.pareto_testing(losses, costs, 0.2, 0.1, test="binomial", split_indices=split)
  p = np.array([[_exact_binom_cdf(int(k), 20, Fraction(1, 5)) for k in row] for row in ones])
  np.testing.assert_allclose(res.pvalues, p, rtol=1e-9)
  np.testing.assert_array_equal(res.order, [1, 2, 3, 0])  # costs 0.1, 0.4, 0.6, 0.9
  # Fixed sequence: running max along the order (0,1) -> (1,0) -> (1,1) -> (0,0).
  want = np.empty(4)
  running = 0.0
  for flat in res.order:
    running = max(running, p.ravel()[flat])
    want[flat] = running
  np.testing.assert_allclose(res.adjusted.ravel(), want, rtol=1e-9)
  assert res.adjusted[1, 0] == pytest.approx(p[0, 1]) and p[1, 0] < p[0, 1]  # earlier max
  np.testing.assert_array_equal(res.certified, [[False, True], [True, False]])
  np.testing.assert_array_equal(res.certified, res.adjusted <= 0.1)
  ordered = list(p.ravel()[res.order])      # rejected: the run before the first p > delta
  assert res.certified.sum() == next(
      (i for i, v in enumerate(ordered) if v > 0.1), len(ordered))
  bf = ltt.pareto_testing(losses, costs, 0.2, 0.1, test="binomial", split_indices=split,
                          multiple_testing="bonferroni")
  np.testing.assert_allclose(bf.adjusted, np.minimum(1.0, 4 * p), rtol=1e-9)
  np.testing.assert_array_equal(bf.certified, [[False, False], [True, False]])
  np.testing.assert_array_equal(bf.certified, bf.adjusted <= 0.1)


# ---------------------------------------------------------------------------
# Sizing a calibration set (sizing.n_to_certify) and the pilot line it prints.


def test_normal_quantile_matches_tables():
  assert abs(sizing._normal_quantile(0.9) - 1.2815515655446004) < 1e-12
  assert abs(sizing._normal_quantile(0.975) - 1.959963984540054) < 1e-12
  assert abs(sizing._normal_quantile(0.5)) < 1e-12


def _drop_draws(rng, n, draws, p_minus=0.05, p_plus=0.05, eps=0.05):
  d = rng.choice([-1.0, 0.0, 1.0], p=[p_minus, 1 - p_minus - p_plus, p_plus], size=(draws, n))
  return ltt.rescale_accuracy_drop(d, eps)


@pytest.mark.parametrize("test", ["exact", "wsr", "hb"])
def test_n_to_certify_is_where_one_pair_passes_about_half_the_time(test):
  """Accuracy drop R = 0, sd 0.32 (10 % of images disagree), eps = 0.05, delta = 0.1:
  at the estimated n the p-value is <= delta in roughly half of the draws,
  rarely at a quarter of it, nearly always at four times it."""
  rng, draws, delta = np.random.default_rng(11), 300, 0.1
  mean, var = 0.5, 0.1 / 4                     # of the rescaled loss (d + 1) / 2
  eps = (0.05 + 1) / 2
  n = int(sizing.n_to_certify(mean, var, eps, delta, test))
  by_hand = {"exact": 1.2815515655446004 ** 2 * var, "wsr": 2 * math.log(10) * var,
             "hb": 2 * math.log(10) / 4}[test] / (eps - mean) ** 2
  assert n == math.ceil(by_hand)
  rate = {}
  for f in (0.25, 1.0, 4.0):
    x, e = _drop_draws(rng, max(2, int(f * n)), draws)
    rate[f] = float((ltt.config_pvalues(x, e, delta, test) <= delta).mean())
  print(test, n, rate)
  assert rate[0.25] < 0.35 and rate[4.0] > 0.85, rate
  lo = 0.2 if test == "hb" else 0.25        # Hoeffding's variance bound 1/4 is loose here
  assert lo <= rate[1.0] <= 0.85, rate
  # A pair whose risk is at or above its level is never worth sizing for.
  assert np.isinf(sizing.n_to_certify(np.array([eps, eps + 0.1]), 0.01, eps, delta, test)).all()
  with pytest.raises(ValueError, match="delta"):
    sizing.n_to_certify(mean, var, eps, 1.0, test)
  with pytest.raises(ValueError, match="test"):
    sizing.n_to_certify(mean, var, eps, delta, "bonferroni")


def test_the_pilot_line_names_the_images_each_cost_needs():
  """certificate.sizing on fitting outcomes built so that each tau's cost and
  drop are known: its counts are the z-test rule computed here by hand."""
  import ml_collections

  from rcst_edge.payload.geometry import Geometry
  from rcst_jax.calibration import certificate
  rng, n = np.random.default_rng(5), 2000
  labels = rng.integers(0, 10, n)
  server_only = labels.copy()
  # tau 0 keeps 150 patches and agrees with server-only; tau 1 keeps 30 and is
  # wrong on 3 % of images; the edge accepts nothing below lambda = 1.01.
  wrong = rng.uniform(size=n) < 0.03
  server_pred = np.stack([server_only, np.where(wrong, (labels + 1) % 10, labels)])
  fit = {"labels": labels, "edge_pred": (labels + 1) % 10, "p_max": np.full(n, 0.5, np.float32),
         "server_only_pred": server_only, "server_pred": server_pred,
         "kept": np.stack([np.full(n, 150), np.full(n, 30)])}
  config = ml_collections.ConfigDict({"alpha_crc": 0.1, "certify": {
      "epsilon": 0.05, "delta": 0.1, "risks": ("accuracy_drop",), "test": "exact",
      "lambda_grid": (0.0, 1.01)}})
  line = certificate.sizing(config, fit, Geometry(), 100)
  # lambda = 1.01 offloads everything: tau 1 costs 30/196, its drop is `wrong`.
  m = wrong.mean()
  need = math.ceil(1.2815515655446004 ** 2 * (m - m * m) / (0.05 - m) ** 2)
  assert f"<= 0.2: {need:,}" in line, line
  assert "1,200" not in line and "(2,000 fitting images, exact test" in line
  assert "this run tests on 100, " in line
  assert ("enough for cost 0.153" in line) == (need <= 100), line
  # lambda = 0 accepts every image: the edge is always wrong, a drop of 1 per image.
  assert "<= 0.1:" not in line
