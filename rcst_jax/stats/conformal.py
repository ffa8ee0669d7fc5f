"""Offline calibration (paper Algorithm 1): CRC edge threshold and APS quantile.

CRC (Eqs. 12-15). The loss l(lambda) = 1{p_max >= lambda and edge wrong} counts
wrong calibration samples at or above lambda, so the rule
R_n(lambda) <= alpha - (B - alpha)/n is "at most m accepted wrong samples" with
m = floor((n+1) alpha - B). The infimum is therefore exact from the sorted
wrong scores, no grid: lambda_hat is the next float above the (m+1)-th largest
wrong score (0 if there are at most m wrong samples). Acceptance is
p_max >= lambda_hat, compared in the dtype of the calibration scores.
When no lambda in [0, 1] qualifies (m < 0, i.e. n < B/alpha - 1, or a wrong
sample with p_max == 1) we return (inf, valid=False): the edge then accepts
nothing, which keeps the risk at 0. The reference code instead silently returns
a grid point; `calibrate` warns (or raises with strict=True).

APS (Eqs. 2-3, 17-18), non-randomised as in the paper: score = cumulative sorted
mass up to and including the true class (ties in probs broken by class index);
q_hat = the ceil((n+1)(1-alpha))-th smallest score, +inf past n. The set takes
the smallest k with cumulative mass > q_hat, so the crossing class is included:
the label is covered whenever its score is <= q_hat, and sometimes also when
not (coverage is >= 1-alpha but can exceed 1-alpha+1/(n+1)).

Cumulative sums run sequentially (one add at a time) so that scores at
calibration and sets at test time round identically on every backend.

Integer budgets (m above, the APS rank k) are exact: alpha is read as its
shortest decimal (0.05 means 1/20 even as float32).
"""

from __future__ import annotations

import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "sequential_cumsum", "accepts", "crc_max_errors", "crc_threshold", "crc_lambda_hat", "aps_scores",
    "aps_rank", "aps_order_stat", "aps_q_hat",
    "aps_set", "check_alpha", "validate_calibration_inputs", "acceptance_risk", "aps_coverage",
    "mean_set_size",
]


# ---------------------------------------------------------------------------
# Small numeric helpers.


def sequential_cumsum(x: jax.Array) -> jax.Array:
  """Left-to-right cumulative sum over the last axis, one add at a time.

  XLA lowers jnp.cumsum to a window reduction or a parallel scan whose rounding
  differs by backend; a scan gives the exact float result of a Python loop.
  """
  x = jnp.asarray(x)
  moved = jnp.moveaxis(x, -1, 0)

  def step(acc, v):
    acc = acc + v
    return acc, acc

  # zeros_like: the carry varies over a shard_map axis exactly as x does.
  _, out = jax.lax.scan(step, jnp.zeros_like(moved[0]), moved)
  return jnp.moveaxis(out, 0, -1)


def _decimal(x) -> Fraction:
  # The shortest decimal that round-trips in x's own dtype: 0.05 as float32 is
  # 0.0500000007..., but the user meant 1/20.
  return Fraction(np.format_float_positional(x, unique=True, trim="-"))


def _exact_int(fn, n: int, alpha, B=1) -> int:
  a = np.asarray(alpha)
  if a.ndim or not np.isfinite(a):
    raise ValueError(f"alpha must be one finite number, got {a.tolist()}")
  return int(np.clip(fn((n + 1) * _decimal(a[()]), _decimal(np.asarray(B)[()])), -2**31, 2**31 - 1))


# ---------------------------------------------------------------------------
# CRC (Eqs. 12-15, Algorithm 1 line "lambda_hat <- ...").


def crc_max_errors(n: int, alpha, B=1.0) -> int:
  """m = floor((n+1) alpha - B): accepted wrong calibration samples allowed.

  Negative when n < B/alpha - 1 (no threshold can satisfy the rule). alpha
  is read as its shortest decimal and m is computed exactly.
  """
  return _exact_int(lambda t, b: math.floor(t - b), n, alpha, B)


def crc_threshold(p_max: jax.Array, wrong: jax.Array, m):
  """lambda_hat for at most m accepted wrong samples; (inf, False) if m < 0 or none in [0, 1].

  Jit-able; vmap over m with in_axes=(None, None, 0).
  """
  p_max = jnp.asarray(p_max)
  if not jnp.issubdtype(p_max.dtype, jnp.floating):
    p_max = p_max.astype(jnp.float32)
  n = p_max.shape[0]
  # Wrong scores, largest first; correct samples never contribute loss.
  desc = -jnp.sort(-jnp.where(wrong, p_max, -jnp.inf))
  s = desc[jnp.clip(m, 0, n - 1)]  # the (m+1)-th largest wrong score
  few_wrong = (m >= n) | (s == -jnp.inf)  # at most m wrong: accept everything
  lam = jnp.where(few_wrong, 0.0, jnp.nextafter(s, jnp.asarray(jnp.inf, p_max.dtype)))
  lam = jnp.maximum(lam, 0.0).astype(p_max.dtype)
  valid = (m >= 0) & (lam <= 1.0)
  return jnp.where(valid, lam, jnp.inf).astype(p_max.dtype), valid


def crc_lambda_hat(p_max: jax.Array, wrong: jax.Array, alpha, B=1.0):
  """Exact CRC threshold for l(lambda) = 1{p_max >= lambda and wrong}.

  p_max: [n] float edge confidences; wrong: [n] bool (edge top-1 != label).
  Returns (lambda_hat, valid): the smallest lambda in [0, 1] (as a float of
  p_max's dtype) with R_n(lambda) <= alpha - (B - alpha)/n; (inf, False) if none.
  """
  return crc_threshold(p_max, wrong, crc_max_errors(jnp.shape(p_max)[0], alpha, B))


def accepts(p_max, lambda_hat):
  """Eq. 15, the one acceptance rule: the edge answers iff p_max >= lambda_hat.

  Both sides are compared as float32, the dtype the edge computes p_max in,
  so the edge step, the Learn-then-Test grid and every metric decide alike
  (a float64 lambda of 0.7 would otherwise reject p_max == float32(0.7)).
  jnp in (under jit too), jnp out; numpy in, numpy out; broadcasts.
  """
  if isinstance(p_max, jax.Array) or isinstance(lambda_hat, jax.Array):
    return jnp.asarray(p_max, jnp.float32) >= jnp.asarray(lambda_hat, jnp.float32)
  return np.asarray(p_max, np.float32) >= np.asarray(lambda_hat, np.float32)


# ---------------------------------------------------------------------------
# APS (Eqs. 2-3, 17-18).


def _sorted_mass(probs: jax.Array):
  """Descending class order (stable: lower class index first on ties), sorted probs, cum mass."""
  order = jnp.argsort(probs, axis=-1, descending=True, stable=True)
  sorted_p = jnp.take_along_axis(probs, order, axis=-1)
  return order, sorted_p, sequential_cumsum(sorted_p)


@jax.jit
def aps_scores(probs: jax.Array, labels: jax.Array) -> jax.Array:
  """APS conformity score per sample: sorted mass up to and including the label.

  probs [n, C], labels [n] int -> [n].
  """
  probs = jnp.asarray(probs)
  order, _, cum = _sorted_mass(probs)
  rank = jnp.argmax(order == jnp.asarray(labels)[:, None], axis=-1)
  return jnp.take_along_axis(cum, rank[:, None], axis=-1)[:, 0]


def aps_rank(n: int, alpha) -> int:
  """k = ceil((n+1)(1-alpha)), exact (see crc_max_errors)."""
  return _exact_int(lambda t, b: math.ceil((n + 1) - t), n, alpha)


def aps_order_stat(scores: jax.Array, k) -> jax.Array:
  """The k-th smallest score (1-based), +inf when k > n."""
  scores = jnp.asarray(scores)
  n = scores.shape[0]
  kth = jnp.sort(scores)[jnp.clip(k - 1, 0, n - 1)]
  return jnp.where(k > n, jnp.inf, kth).astype(scores.dtype)


def aps_q_hat(scores: jax.Array, alpha) -> jax.Array:
  """The ceil((n+1)(1-alpha))-th smallest score; +inf when that rank exceeds n."""
  return aps_order_stat(scores, aps_rank(jnp.shape(scores)[0], alpha))


@jax.jit
def aps_set(probs: jax.Array, q_hat):
  """APS candidate set S(x) (Eqs. 17-18) as a mask in original class order.

  probs [B, C]; q_hat scalar or [B]. Returns (mask [B, C] bool, k [B] int32):
  k = the smallest k with cumulative sorted mass > q_hat (crossing class
  included), C if none (q_hat = inf or >= the total mass).
  """
  probs = jnp.asarray(probs)
  b, c = probs.shape
  order, _, cum = _sorted_mass(probs)
  q = jnp.broadcast_to(jnp.asarray(q_hat, probs.dtype), (b,))[:, None]
  inside = cum <= q  # ranks before the crossing one
  # Leading run of True, robust to any non-monotone rounding (integer counts:
  # exact; a cumulative sum rather than a product, which ONNX lacks).
  lead = (jnp.cumsum((~inside).astype(jnp.int32), axis=-1) == 0).sum(-1)
  k = jnp.minimum(lead + 1, c)
  sorted_mask = jnp.arange(c)[None, :] < k[:, None]
  mask = jnp.zeros((b, c), bool).at[jnp.arange(b)[:, None], order].set(sorted_mask)
  return mask, k.astype(jnp.int32)


# ---------------------------------------------------------------------------
# Empirical helpers for evaluation.


def acceptance_risk(accepted, wrong) -> float:
  """Eq. 12's empirical risk: mean of 1{accepted on the edge and edge wrong}.

  For the proposed edge `accepted` is p_max >= lambda_hat (Eq. 15); the same
  definition serves the baselines' min-entropy acceptance.
  """
  return float(np.mean(np.asarray(accepted, bool) & np.asarray(wrong, bool)))


def aps_coverage(covered) -> float:
  """Fraction of samples whose label is in the APS set (`covered` [n] bool)."""
  return float(np.mean(np.asarray(covered, bool)))


def mean_set_size(sizes) -> float:
  return float(np.mean(np.asarray(sizes)))


# ---------------------------------------------------------------------------
# Input validation (host side, not jitted).


def check_alpha(alpha, name: str) -> np.ndarray:
  a = np.asarray(alpha)
  if a.dtype == object or a.dtype.kind not in "biuf":
    raise ValueError(f"{name} must be a number, got {alpha!r}")
  if not np.issubdtype(a.dtype, np.floating):  # keep float32 alphas as given: 0.05f means 1/20
    a = a.astype(np.float64)
  if a.ndim != 0:
    raise ValueError(f"{name} must be one number, got shape {a.shape}")
  if not np.all((a > 0) & (a < 1)):  # also rejects NaN
    raise ValueError(f"{name} must lie in the open interval (0, 1), got {a.tolist()}")
  return a


def validate_calibration_inputs(probs, labels, alpha=None, *, tol: float = 1e-3):
  """Checks calibration data before any rule runs; raises ValueError naming the problem.

  probs [n, C] softmax probabilities (finite, >= 0, rows sum to 1 within tol),
  labels [n] integers in [0, C), alpha (a number) in (0, 1).
  Returns (probs, labels) as numpy arrays.
  """
  p = np.asarray(probs)
  y = np.asarray(labels)
  if p.ndim != 2:
    raise ValueError(f"probs must be a 2-D array [n, C], got shape {p.shape}")
  if p.shape[0] == 0:
    raise ValueError("calibration set is empty (probs has 0 rows)")
  if p.shape[1] < 2:
    raise ValueError(f"probs needs at least 2 classes, got {p.shape[1]}")
  if not np.issubdtype(p.dtype, np.floating):
    raise ValueError(f"probs must be floating point, got dtype {p.dtype}")
  if not np.all(np.isfinite(p)):
    bad = int(np.sum(~np.all(np.isfinite(p), axis=1)))
    raise ValueError(f"probs contains NaN or inf in {bad} row(s)")
  if np.any(p < 0):
    raise ValueError(f"probs contains negative values (min {float(p.min())})")
  dev = np.abs(p.astype(np.float64).sum(axis=1) - 1.0)
  if np.any(dev > tol):
    i = int(np.argmax(dev))
    raise ValueError(
        f"probs rows must sum to 1 within {tol} (pass softmax outputs, not logits); "
        f"row {i} sums to {float(p[i].astype(np.float64).sum())}")
  if y.ndim != 1:
    raise ValueError(f"labels must be a 1-D array [n], got shape {y.shape}")
  if y.shape[0] != p.shape[0]:
    raise ValueError(f"probs has {p.shape[0]} rows but labels has {y.shape[0]} entries")
  if not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"labels must have an integer dtype, got {y.dtype} "
                     "(cast with .astype(int) if the values are whole numbers)")
  if np.any((y < 0) | (y >= p.shape[1])):
    raise ValueError(f"labels must lie in [0, {p.shape[1]}), got min {int(y.min())} max {int(y.max())}")
  if alpha is not None:
    check_alpha(alpha, "alpha")
  return p, y
