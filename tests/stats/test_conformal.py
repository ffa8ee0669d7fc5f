"""CRC / APS calibration (paper Algorithm 1) against independent transcriptions."""

import json
import math
import warnings
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import paper_rules
import pytest

from rcst_jax.calibration import certificate
from rcst_jax.calibration.algorithm1 import calibrate
from rcst_jax.calibration.artifact import Calibration, CalibrationError, CalibrationWarning
from rcst_jax.inference.methods import OperatingPoint
from rcst_jax.stats import conformal as cf
from rcst_jax.stats import ltt


def _softmax(z):
  return np.array(jax.nn.softmax(jnp.asarray(z, jnp.float32), axis=-1))


def _synthetic(rng, n, C=10, mu=2.0, T=1.0):
  """Gaussian logits with a mean shift on the true class: ~68% top-1 at C=10."""
  y = rng.integers(0, C, n)
  z = rng.normal(size=(n, C))
  z[np.arange(n), y] += mu
  return _softmax(z / T), y.astype(np.int32)


# ---------------------------------------------------------------------------
# APS quantile and scores.


def _exact_k(n, alpha):
  return math.ceil((n + 1) * (1 - Fraction(str(alpha))))


@pytest.mark.parametrize("n", [1, 7, 50, 199, 1000])
@pytest.mark.parametrize("alpha", [0.001, 0.05, 0.1, 0.29, 0.5, 0.9])
def test_q_hat_is_order_statistic(rng, n, alpha):
  scores = rng.random(n).astype(np.float32)
  scores[: n // 3] = np.round(scores[: n // 3], 1)  # ties
  k = _exact_k(n, alpha)
  want = np.inf if k > n else np.partition(scores, k - 1)[k - 1]
  assert float(cf.aps_q_hat(scores, alpha)) == want


def test_q_hat_matches_torch_kthvalue(rng):
  """TorchCP's rule: torch.kthvalue(scores, ceil((n+1)(1-alpha)))."""
  torch = pytest.importorskip("torch")
  for n, alpha in [(10, 0.1), (500, 0.05), (1000, 0.2), (37, 0.33)]:
    scores = np.round(rng.random(n), 2).astype(np.float32)
    k = _exact_k(n, alpha)
    want = torch.kthvalue(torch.from_numpy(scores), k).values.item()
    assert float(cf.aps_q_hat(scores, alpha)) == want


def test_q_hat_inf_iff_rank_past_n():
  s = np.linspace(0, 1, 99, dtype=np.float32)  # n = 99: k > n iff alpha < 1/100
  assert float(cf.aps_q_hat(s, 0.0099)) == np.inf
  assert float(cf.aps_q_hat(s, 0.01)) == s[-1]


def test_aps_scores_match_loop(rng):
  probs, y = _synthetic(rng, 200, C=6)
  probs[:20] = _softmax(np.round(rng.normal(size=(20, 6)), 0))  # tied probabilities
  got = np.asarray(cf.aps_scores(probs, y))
  for i in range(len(y)):
    order = np.argsort(-probs[i], kind="stable")
    acc = np.float32(0)
    for c in order:
      acc = np.float32(acc + probs[i, c])
      if c == y[i]:
        break
    assert got[i] == acc


def test_aps_set_equals_the_hand_written_aps_rule(rng):
  probs, _ = _synthetic(rng, 300, C=8)
  probs[:30] = _softmax(np.round(rng.normal(size=(30, 8)), 0))
  qs = np.concatenate([rng.random(290), [0.0, 1.0, np.inf, 0.5, 0.9, 0.99, 1.5, 0.3, 0.7, 0.8]])
  mask, k = cf.aps_set(probs, jnp.asarray(qs, jnp.float32))
  want_mask, want_k = paper_rules.aps_set(probs, qs)
  np.testing.assert_array_equal(np.asarray(mask), want_mask)
  np.testing.assert_array_equal(np.asarray(k), want_k)
  assert np.all(np.asarray(k)[qs == np.inf] == 8)
  assert np.all(np.asarray(k)[qs == 0.0] == 1)


def test_label_in_set_iff_previous_mass_at_most_q(rng):
  """The paper's set includes the crossing class: score <= q_hat implies coverage."""
  probs, y = _synthetic(rng, 500)
  scores = np.asarray(cf.aps_scores(probs, y))
  q = np.float32(np.quantile(scores, 0.6))
  mask, _ = cf.aps_set(probs, q)
  covered = np.asarray(mask)[np.arange(len(y)), y]
  assert np.all(covered[scores <= q])
  for i in range(len(y)):
    order = np.argsort(-probs[i], kind="stable")
    before = np.float32(0)
    for c in order[:list(order).index(y[i])]:
      before = np.float32(before + probs[i, c])
    assert covered[i] == (before <= q)
  assert covered.mean() > (scores <= q).mean()


# ---------------------------------------------------------------------------
# CRC threshold.


def _exact_m(n, alpha, B=1):
  return math.floor((n + 1) * Fraction(str(alpha)) - B)


_NS = [1, 18, 19, 20, 99, 100, 199, 999, 1000, 2999, 9999, 10000]


@pytest.mark.parametrize("alpha", [0.01, 0.05, 0.07, 0.1, 0.2, 0.29, 0.3, 0.33, 0.57, 0.99,
                                   0.001, 0.123, 0.999, 0.0125])
def test_integer_budgets_exact_at_boundaries(alpha):
  """Concrete alphas (as used by calibrate) are read as decimals: exact m and k."""
  for dtype in (np.float64, np.float32):
    for n in _NS:
      assert int(cf.crc_max_errors(n, dtype(alpha))) == _exact_m(n, alpha), (n, alpha)
      assert int(cf.aps_rank(n, dtype(alpha))) == _exact_k(n, alpha), (n, alpha)


def _ref_get_lhat(calib_loss_table, lambdas, alpha, B=1):
  """aangelopoulos/conformal-risk core/get_lhat.py, transcribed (columns: small -> large loss)."""
  n = calib_loss_table.shape[0]
  rhat = calib_loss_table.mean(axis=0)
  lhat_idx = max(np.argmax(((n / (n + 1)) * rhat + B / (n + 1)) > alpha) - 1, 0)
  return lambdas[lhat_idx], lhat_idx


def _ref_accept(p_max, wrong, alpha):
  """Reference rule on the grid {2} + unique scores (descending); returns accept decisions."""
  lambdas = np.concatenate([[2.0], np.unique(p_max)[::-1]])
  table = (p_max[:, None] >= lambdas[None, :]) & wrong[:, None]
  n = len(p_max)
  risk = (n / (n + 1)) * table.mean(0) + 1 / (n + 1)
  if not np.any(risk > alpha):
    # get_lhat's argmax of an all-False row is 0, returning the largest grid
    # point; the rule itself (inf over the grid) accepts everything.
    return np.ones(n, bool)
  lam, _ = _ref_get_lhat(table.astype(np.float64), lambdas, alpha)
  return p_max >= lam


def test_lambda_hat_matches_reference_decisions(rng):
  checked = 0
  for trial in range(300):
    n = int(rng.choice([5, 20, 40, 100, 333, 1000]))
    alpha = float(rng.uniform(0.01, 0.4))
    t = (n + 1) * alpha - 1
    if abs(t - round(t)) < 1e-6:
      continue  # exact-integer boundaries are tested against Fraction above
    acc = rng.uniform(0.3, 1.0)
    wrong = rng.random(n) > acc
    p_max = rng.uniform(0.1, 1.0, n).astype(np.float32)
    if trial % 3 == 0:
      p_max = np.round(p_max, 1).astype(np.float32)  # heavy ties
    lam, valid = cf.crc_lambda_hat(p_max, wrong, alpha)
    ours = p_max >= np.float32(lam)
    np.testing.assert_array_equal(ours, _ref_accept(p_max.astype(np.float64), wrong, alpha),
                                  err_msg=f"n={n} alpha={alpha}")
    # Invalid iff the budget is negative or a wrong sample at p_max == 1 must go.
    assert bool(valid) == (t >= 0 and np.sort(p_max[wrong])[::-1][int(np.floor(t)):][:1].max(
        initial=0) < 1)
    assert bool(valid) or not ours.any()
    checked += 1
  assert checked > 250


def test_lambda_hat_is_exact_infimum(rng):
  n, alpha = 200, 0.1  # m = floor(201 * 0.1 - 1) = 19
  p_max = np.round(rng.uniform(0.2, 1.0, n), 2).astype(np.float32)
  wrong = rng.random(n) < 0.4
  lam, valid = cf.crc_lambda_hat(p_max, wrong, alpha)
  lam = np.float32(lam)
  risk = lambda l: np.sum((p_max >= l) & wrong) / n
  assert bool(valid)
  assert risk(lam) <= alpha - (1 - alpha) / n
  below = np.nextafter(lam, np.float32(-np.inf))
  assert risk(below) > alpha - (1 - alpha) / n  # one float lower violates the rule
  assert np.sum((p_max >= lam) & wrong) <= 19


def test_lambda_hat_boundaries():
  p = np.linspace(0.3, 0.99, 50).astype(np.float32)
  # All correct: accept everything.
  lam, valid = cf.crc_lambda_hat(p, np.zeros(50, bool), 0.05)
  assert float(lam) == 0.0 and bool(valid)
  # n too small: n=18 < 1/0.05 - 1 = 19 -> invalid, inf; n=19 -> m = 0 -> valid.
  lam, valid = cf.crc_lambda_hat(p[:18], np.zeros(18, bool), 0.05)
  assert float(lam) == np.inf and not bool(valid)
  lam, valid = cf.crc_lambda_hat(p[:19], np.ones(19, bool), 0.05)
  assert bool(valid) and float(lam) == np.nextafter(p[18], np.float32(np.inf))
  # Exactly m wrong samples: accept all.  n=99, alpha=0.05: m = 4.
  w = np.zeros(99, bool)
  w[[3, 10, 20, 40]] = True
  assert float(cf.crc_lambda_hat(np.linspace(0.1, 1, 99, dtype=np.float32), w, 0.05)[0]) == 0.0
  w[50] = True  # 5 wrong: threshold just above the smallest wrong score
  pp = np.linspace(0.1, 0.9, 99, dtype=np.float32)
  lam, _ = cf.crc_lambda_hat(pp, w, 0.05)
  assert float(lam) == np.nextafter(pp[3], np.float32(np.inf))
  # Ties at the boundary: 6 wrong at 0.8 and m = 4 -> all of them rejected.
  pt = np.full(99, 0.5, np.float32)
  pt[:6] = 0.8
  wt = np.zeros(99, bool)
  wt[:6] = True
  lam, _ = cf.crc_lambda_hat(pt, wt, 0.05)
  assert float(lam) == np.nextafter(np.float32(0.8), np.float32(np.inf))
  assert not np.any(pt >= lam) or np.all(pt[pt >= lam] < 0.8)
  # A wrong sample at p_max == 1 that must be rejected: no lambda in [0, 1].
  pt[:6] = 1.0
  lam, valid = cf.crc_lambda_hat(pt, wt, 0.05)
  assert float(lam) == np.inf and not bool(valid)


# ---------------------------------------------------------------------------
# Statistical validity over 1000 random calibration/test splits (CRC paper protocol).


def test_validity_over_random_splits():
  rng = np.random.default_rng(1)
  n_cal, n_test, splits, alpha_crc, alpha_aps = 1000, 4000, 1000, 0.05, 0.1
  probs, y = _synthetic(rng, n_cal + n_test)
  probs, y = jnp.asarray(probs), jnp.asarray(y)
  p_max, wrong = probs.max(1), probs.argmax(1) != y
  scores = cf.aps_scores(probs, y)

  def one(key):
    perm = jax.random.permutation(key, n_cal + n_test)
    cal, test = perm[:n_cal], perm[n_cal:]
    lam, _ = cf.crc_lambda_hat(p_max[cal], wrong[cal], alpha_crc)
    risk = jnp.mean((p_max[test] >= lam) & wrong[test])  # Eq. 6, held out
    q = cf.aps_q_hat(scores[cal], alpha_aps)
    mask, _ = cf.aps_set(probs[test], q)
    covered = jnp.take_along_axis(mask, y[test][:, None], axis=-1)
    return jnp.stack([risk, jnp.mean(scores[test] <= q), jnp.mean(covered),
                      jnp.mean(mask.sum(-1)), jnp.mean(p_max[test] >= lam)])

  keys = jax.random.split(jax.random.PRNGKey(0), splits)
  out = np.asarray(jax.jit(lambda k: jax.lax.map(one, k, batch_size=50))(keys), np.float64)
  mean, se = out.mean(0), out.std(0, ddof=1) / np.sqrt(splits)
  risk, event, cov, size, accept = mean
  print(f"\nCRC risk {risk:.4f} (se {se[0]:.4f}, alpha {alpha_crc}), accept rate {accept:.3f}; "
        f"APS score<=q {event:.4f} (se {se[1]:.4f}), set coverage {cov:.4f}, "
        f"mean set size {size:.2f}")
  assert risk <= alpha_crc + 3 * se[0]
  assert risk >= alpha_crc - 2 / (n_cal + 1) - 3 * se[0]  # CRC is tight for continuous scores
  lo, hi = 1 - alpha_aps, 1 - alpha_aps + 1 / (n_cal + 1)
  assert lo - 3 * se[1] <= event <= hi + 3 * se[1]
  assert cov >= event  # the paper's set adds the crossing class: conservative


# ---------------------------------------------------------------------------
# Input validation.


def _with(a, idx, v):
  a = a.copy()
  a[idx] = v
  return a


def _good(rng, n=50, C=5):
  p, y = _synthetic(rng, n, C)
  return p, y


@pytest.mark.parametrize("mutate, msg", [
    (lambda p, y: (_with(p, (0, 0), np.nan), y), "NaN or inf"),
    (lambda p, y: (np.where(np.arange(p.shape[1]) == 0, np.inf, p), y), "NaN or inf"),
    (lambda p, y: (p * 1.01, y), "sum to 1"),
    (lambda p, y: (np.concatenate([p[:, :1] * 0 - 0.1, p[:, 1:] + 0.1 / (p.shape[1] - 1)], 1), y),
     "negative"),
    (lambda p, y: (p, y.astype(np.float32)), "integer dtype"),
    (lambda p, y: (p, np.where(np.arange(len(y)) == 3, p.shape[1], y)), r"labels must lie in"),
    (lambda p, y: (p, np.where(np.arange(len(y)) == 3, -1, y)), r"labels must lie in"),
    (lambda p, y: (p, y[:-1]), "labels has"),
    (lambda p, y: (p[:0], y[:0]), "empty"),
    (lambda p, y: (p[0], y), "2-D"),
    (lambda p, y: (p, y[:, None]), "1-D"),
])
def test_validation_rejects(rng, mutate, msg):
  p, y = _good(rng)
  p, y = mutate(p.copy(), y.copy())
  with pytest.raises(ValueError, match=msg):
    cf.validate_calibration_inputs(p, y, 0.1)


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, 1.5, float("nan"), [0.1, 0.2], "0.1"])
def test_validation_rejects_alpha(rng, alpha):
  p, y = _good(rng)
  with pytest.raises(ValueError, match=r"\(0, 1\)|one number|must be a number"):
    cf.validate_calibration_inputs(p, y, alpha)
  with pytest.raises(ValueError, match="alpha_crc"):
    calibrate(p, y, alpha, 0.1)


# ---------------------------------------------------------------------------
# Calibration artifact.


def _lambda_hat_by_hand(p_max, wrong, alpha, B=1):
  """Eqs. 12-14 by scanning: the smallest float32 lambda in [0, 1] with
  (accepted wrong samples + B) / (n + 1) <= alpha. Acceptance only changes just
  above a score, so the candidates are 0 and the next float32 above each score."""
  p_max = np.asarray(p_max, np.float32)
  n, a = len(p_max), Fraction(str(alpha))
  cands = sorted({np.float32(0)} | {np.nextafter(v, np.float32(np.inf)) for v in p_max})
  for lam in cands:
    if lam <= 1 and (int(np.sum((p_max >= lam) & wrong)) + B) <= a * (n + 1):
      return float(lam), True
  return math.inf, False


def _aps_q_hat_by_hand(probs, labels, alpha):
  """Eqs. 2-3: each score is the float32 mass of the classes ranked at or above
  the label (ties: lower index first); q_hat the ceil((n+1)(1-alpha))-th smallest."""
  scores = []
  for row, y in zip(np.asarray(probs, np.float32), labels):
    acc = np.float32(0)
    for c in sorted(range(len(row)), key=lambda j: (-float(row[j]), j)):
      acc = np.float32(acc + row[c])
      if c == y:
        break
    scores.append(float(acc))
  k = _exact_k(len(scores), alpha)
  return math.inf if k > len(scores) else sorted(scores)[k - 1]


def test_calibrate_and_json_round_trip(rng, tmp_path):
  p, y = _synthetic(rng, 400)
  cal = calibrate(p, y, 0.05, 0.1, edge_model="efficientnet_b0", server_model="deit_base",
                     dataset="synthetic", split="cal", gradcam_layer="features",
                     transform={"resize_size": 256, "crop_size": 224, "interpolation": "bicubic"},
                     geometry={"image_size": 224, "patch": 16, "channels": 3})
  lam, ok = _lambda_hat_by_hand(p.max(1), p.argmax(1) != y, 0.05)
  assert ok and cal.lambda_hat == lam and cal.lambda_valid
  assert cal.q_hat == _aps_q_hat_by_hand(p, y, 0.1)
  assert cal.n == 400
  path = tmp_path / "cal.json"
  cal.to_json(path)
  assert Calibration.from_json(path) == cal

  # An unsatisfiable CRC rule (inf) survives JSON as the string "inf".
  with pytest.warns(CalibrationWarning, match="accept nothing"):
    never = calibrate(p, y, 0.001, 0.001)
  assert never.lambda_hat == math.inf and not never.lambda_valid and never.q_hat == math.inf
  never.to_json(path)
  text = path.read_text()
  assert '"inf"' in text and "Infinity" not in text
  assert Calibration.from_json(path) == never


def test_calibrate_strict_raises(rng):
  p, y = _synthetic(rng, 10)
  with pytest.raises(CalibrationError, match="cannot control"):
    calibrate(p, y, 0.05, 0.1, strict=True)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", CalibrationWarning)
    assert calibrate(p, y, 0.05, 0.1).lambda_hat == math.inf


@pytest.mark.parametrize("edit, msg", [
    (lambda d: "{not json", "not valid JSON"),
    (lambda d: json.dumps([1, 2]), "JSON object"),
    (lambda d: json.dumps({**d, "version": 2}), "v3"),
    (lambda d: json.dumps({k: v for k, v in d.items() if k != "q_hat"}), "missing"),
    (lambda d: json.dumps({**d, "lamda_hat": 0.5}), "unknown"),
    (lambda d: json.dumps({**d, "lambda_hat": "0.5"}), "number or the string 'inf'"),
    (lambda d: json.dumps({**d, "lambda_hat": 1.5}), r"\[0, 1\]"),
    (lambda d: json.dumps({**d, "lambda_hat": "inf"}), "must be inf|lie in"),
    (lambda d: json.dumps({**d, "alpha_crc": 0}), r"\(0, 1\)"),
    (lambda d: json.dumps({**d, "n": 0}), "positive integer"),
    (lambda d: json.dumps({**d, "n": 12.0}), "positive integer"),
    (lambda d: json.dumps({**d, "q_hat": -1}), "q_hat"),
    (lambda d: json.dumps({**d, "lambda_valid": "yes"}), "bool"),
    (lambda d: json.dumps({**d, "alphas_crc": [0.1]}), "unknown"),
    (lambda d: json.dumps({**d, "geometry": {"image_size": 224}}), "geometry"),
    (lambda d: json.dumps({**d, "transform": {"resize_size": 0, "crop_size": 224,
                                               "interpolation": "bicubic"}}), "resize_size"),
    (lambda d: json.dumps({**d, "dataset": 3}), "string"),
    (lambda d: json.dumps({**d, "certificate": {"certified": True}}), "certificate must be"),
])
def test_from_json_rejects_malformed(tmp_path, edit, msg):
  good = Calibration(lambda_hat=0.9, q_hat=0.95, alpha_crc=0.05, alpha_aps=0.05, n=100,
                        lambda_valid=True).to_dict()
  path = tmp_path / "bad.json"
  path.write_text(edit(good))
  with pytest.raises(CalibrationError, match=msg) as e:
    Calibration.from_json(path)
  assert str(path) in str(e.value)


# ---------------------------------------------------------------------------
# The one acceptance rule (Eq. 15) at the float32 boundary.


LAM = 0.7  # not a float32: float32(0.7) = 0.699999988... < 0.7


def _every_acceptance_path(p):
  """Whether p_max = p is accepted at lambda = LAM by each path that decides it:
  numpy (metrics), jnp inside jit as the edge step calls it (with x64 on too,
  where a float64 lambda would otherwise win), and Learn-then-Test's grid
  (decisions, edge_risk, patch_cost, offload_cost)."""
  p32 = np.float32(p)
  got = {"numpy": bool(cf.accepts(p32, LAM)),
         "numpy, p_max as float64": bool(cf.accepts(np.float64(p32), np.float64(LAM)))}
  edge_style = jax.jit(lambda p_max, lam: cf.accepts(p_max, lam))
  got["jnp under jit"] = bool(edge_style(jnp.float32(p32), jnp.float32(LAM)))
  with jax.enable_x64(True):
    got["jnp under jit, x64"] = bool(jax.jit(lambda p_max: cf.accepts(p_max, np.float64(LAM)))(
        jnp.asarray(p32, jnp.float32)))
  # One image, wrong on the edge, 10 of 20 patches kept at the one tau.
  p_max, lambdas = np.asarray([p32], np.float64), np.asarray([LAM])
  accepted, pred = ltt.decisions(p_max, np.asarray([1]), np.asarray([[2]]), lambdas)
  got["ltt.decisions"] = bool(accepted[0, 0])
  assert pred[0, 0, 0] == (1 if accepted[0, 0] else 2)
  risk = ltt.edge_risk(np.asarray([0]), np.asarray([1]), p_max, lambdas, num_taus=1)
  got["ltt.edge_risk"] = bool(risk[0, 0, 0] == 1.0)
  cost = ltt.patch_cost(p_max, np.asarray([[10]]), lambdas, num_patches=20)
  got["ltt.patch_cost"] = bool(cost[0, 0] == 0.0)
  assert cost[0, 0] in (0.0, 0.5)
  got["ltt.offload_cost"] = bool(ltt.offload_cost(p_max, np.asarray([[1.0]]), lambdas)[0, 0] == 0)
  return got


def test_accepts_is_a_float32_comparison_on_every_path():
  """p_max == float32(lambda) is accepted everywhere (a float64 lambda of 0.7 would
  reject it), and the next float32 below it is rejected everywhere."""
  at = np.float32(LAM)
  assert np.float64(at) < LAM  # the case a float64 comparison gets wrong
  below = np.nextafter(at, np.float32(0))
  assert all(_every_acceptance_path(at).values()), _every_acceptance_path(at)
  assert not any(_every_acceptance_path(below).values()), _every_acceptance_path(below)
  assert bool(paper_rules.accepts(at, LAM)) and not bool(paper_rules.accepts(below, LAM))
  # Broadcasting, and jnp in -> jnp out.
  np.testing.assert_array_equal(cf.accepts(np.asarray([below, at, 1.0], np.float32), LAM),
                                [False, True, True])
  assert isinstance(cf.accepts(jnp.float32(at), LAM), jax.Array)


def test_the_hand_written_aps_rule_on_a_hand_example():
  """The transcription the APS tests compare against, checked by hand: ties go to
  the lower class index, the crossing class is included, inf keeps every class."""
  p = np.asarray([[0.1, 0.4, 0.4, 0.1]], np.float32)
  for q, want in [(0.0, [False, True, False, False]), (0.39, [False, True, False, False]),
                  (0.4, [False, True, True, False]), (0.85, [True, True, True, False]),
                  (np.inf, [True, True, True, True])]:
    mask, k = paper_rules.aps_set(p, q)
    assert mask[0].tolist() == want and k[0] == sum(want), q
    got, gk = cf.aps_set(p, q)
    assert np.asarray(got)[0].tolist() == want and int(gk[0]) == sum(want), q


# ---------------------------------------------------------------------------
# Where Algorithm 2 runs: the calibration's operating point.


def test_operating_point_is_the_certified_pair_or_the_crc_lambda_at_a_tau():
  base = dict(lambda_hat=0.9, q_hat=0.95, alpha_crc=0.05, alpha_aps=0.05, n=100,
              lambda_valid=True)
  cert = certificate.seal({
      "certified": True, "lambda_hat": 0.6, "tau": 0.4, "q_hat": 0.8,
      "risks": ["accuracy_drop"], "levels": {"accuracy_drop": 0.02}, "epsilon": 0.02,
      "delta": 0.1, "test": "wsr", "multiple_testing": "pareto", "cost": "patches",
      "n_fit": 50, "n_test": 50, "split": 0.5, "split_seed": 0, "order_seed": 1, "p_value": 0.01,
      "lambda_grid": [0.6, 1.01], "tau_grid": [0.0, 0.4], "grid_size": 4, "certified_count": 2,
      "cost_calibration": 0.5, "codec": "raw", "codec_grid": ["raw"]})
  cal = Calibration(**base, certificate=cert)
  assert cal.operating_point() == OperatingPoint(0.6, 0.8, 0.4, certified=True)
  assert cal.operating_point(0.3) == OperatingPoint(0.9, 0.95, 0.3, certified=False)
  # Nothing certified: server-only's pair (accept nothing, keep every patch).
  none = Calibration(**base, certificate=certificate.seal(
      {**cert, "certified": False, "lambda_hat": "inf", "tau": 0.0}))
  assert none.operating_point() == OperatingPoint(math.inf, 0.8, 0.0, certified=False)
  # A grid lambda above 1 accepts nothing, as inf does.
  above = Calibration(**base, certificate=certificate.seal({**cert, "lambda_hat": 1.01}))
  assert above.operating_point().lambda_hat == math.inf
  with pytest.raises(CalibrationError, match="no certified"):
    Calibration(**base).operating_point()
  assert Calibration(**base).operating_point(0.5) == OperatingPoint(0.9, 0.95, 0.5)
  # The codec is the certificate's third axis: its own codec is certified, another is not.
  coded = Calibration(**base, certificate=certificate.seal(
      {**cert, "codec": "jpeg:75", "codec_grid": ["raw", "jpeg:75"], "grid_size": 8}))
  assert coded.operating_point() == OperatingPoint(0.6, 0.8, 0.4, certified=True,
                                                   codec="jpeg:75")
  assert coded.operating_point(codec="raw") == OperatingPoint(0.6, 0.8, 0.4, certified=False)
  assert coded.operating_point(0.5).codec == "raw"
