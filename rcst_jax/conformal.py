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
not (coverage is >= 1-alpha but can exceed 1-alpha+1/(n+1)). A randomised
variant (Romano et al.: score = cum mass - U * p_label) is behind a flag.

Cumulative sums run sequentially (one add at a time) so that scores at
calibration and sets at test time round identically on every backend.

Integer budgets (m above, the APS rank k) are exact for a concrete alpha,
read as its shortest decimal (0.05 means 1/20 even as float32); under
jit/vmap a traced alpha uses float arithmetic with a rounding tolerance.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import warnings
from fractions import Fraction
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from rcst_jax.errors import RcstError

__all__ = [
    "sequential_cumsum", "crc_max_errors", "crc_threshold", "crc_lambda_hat", "aps_scores",
    "aps_rank", "aps_order_stat", "aps_q_hat",
    "aps_set", "validate_calibration_inputs", "Calibration", "CalibrationError",
    "CalibrationWarning", "calibrate", "acceptance_risk", "aps_coverage", "mean_set_size",
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

  _, out = jax.lax.scan(step, jnp.zeros(moved.shape[1:], x.dtype), moved)
  return jnp.moveaxis(out, 0, -1)


def _is_traced(*xs) -> bool:
  return any(isinstance(x, jax.core.Tracer) for x in xs)


def _decimal(x) -> Fraction:
  # The shortest decimal that round-trips in x's own dtype: 0.05 as float32 is
  # 0.0500000007..., but the user meant 1/20.
  return Fraction(np.format_float_positional(x, unique=True, trim="-"))


def _exact_int(fn, n: int, alpha, B=1) -> jax.Array:
  a = np.asarray(alpha)
  if not np.all(np.isfinite(a)):
    raise ValueError(f"alpha must be finite, got {a.tolist()}")
  b = _decimal(np.asarray(B))
  out = [fn((n + 1) * _decimal(x), b) for x in a.ravel()]
  return jnp.asarray(np.array(out, np.int64).reshape(a.shape).clip(-2**31, 2**31 - 1), jnp.int32)


def _float_tol(t, alpha, n, B) -> jax.Array:
  # Traced alpha: rounding of alpha itself, of (n+1)*alpha and of the
  # subtraction, each at most half an ulp; exact for 2-digit alphas up to
  # n ~ 1e4 in float32 (enable x64 or pass a concrete alpha for more).
  eps = jnp.finfo(t.dtype).eps
  return 2 * eps * ((n + 1) * jnp.abs(alpha) + jnp.abs(B) + 1)


def _as_float(alpha) -> jax.Array:
  alpha = jnp.asarray(alpha)
  return alpha if jnp.issubdtype(alpha.dtype, jnp.floating) else alpha.astype(jnp.float32)


# ---------------------------------------------------------------------------
# CRC (Eqs. 12-15, Algorithm 1 line "lambda_hat <- ...").


def crc_max_errors(n: int, alpha, B=1.0) -> jax.Array:
  """m = floor((n+1) alpha - B): accepted wrong calibration samples allowed.

  Negative when n < B/alpha - 1 (no threshold can satisfy the rule). A
  concrete alpha is read as its shortest decimal and m is computed exactly;
  a traced alpha (jit/vmap) uses float arithmetic with a rounding tolerance.
  """
  if not _is_traced(alpha, B):
    return _exact_int(lambda t, b: math.floor(t - b), n, alpha, B)
  alpha = _as_float(alpha)
  t = (n + 1) * alpha - B
  return jnp.floor(t + _float_tol(t, alpha, n, B)).astype(jnp.int32)


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
  Jit-able; vmap over alpha with in_axes=(None, None, 0).
  """
  return crc_threshold(p_max, wrong, crc_max_errors(jnp.shape(p_max)[0], alpha, B))


# ---------------------------------------------------------------------------
# APS (Eqs. 2-3, 17-18).


def _sorted_mass(probs: jax.Array):
  """Descending class order (stable: lower class index first on ties), sorted probs, cum mass."""
  order = jnp.argsort(probs, axis=-1, descending=True, stable=True)
  sorted_p = jnp.take_along_axis(probs, order, axis=-1)
  return order, sorted_p, sequential_cumsum(sorted_p)


@functools.partial(jax.jit, static_argnames=("randomized",))
def aps_scores(probs: jax.Array, labels: jax.Array, randomized: bool = False,
               key: Optional[jax.Array] = None) -> jax.Array:
  """APS conformity score per sample: sorted mass up to and including the label.

  probs [n, C], labels [n] int -> [n]. randomized=True subtracts U * p_label,
  U ~ Uniform[0, 1) from `key` (Romano et al.'s randomised APS).
  """
  probs = jnp.asarray(probs)
  order, sorted_p, cum = _sorted_mass(probs)
  rank = jnp.argmax(order == jnp.asarray(labels)[:, None], axis=-1)
  score = jnp.take_along_axis(cum, rank[:, None], axis=-1)[:, 0]
  if randomized:
    if key is None:
      raise ValueError("randomized APS needs a PRNG key")
    u = jax.random.uniform(key, score.shape, score.dtype)
    score = score - u * jnp.take_along_axis(sorted_p, rank[:, None], axis=-1)[:, 0]
  return score


def aps_rank(n: int, alpha) -> jax.Array:
  """k = ceil((n+1)(1-alpha)), exact for a concrete alpha (see crc_max_errors)."""
  if not _is_traced(alpha):
    return _exact_int(lambda t, b: math.ceil((n + 1) - t), n, alpha)
  alpha = _as_float(alpha)
  t = (n + 1) - (n + 1) * alpha
  return jnp.ceil(t - _float_tol(t, alpha, n, 0.0)).astype(jnp.int32)


def aps_order_stat(scores: jax.Array, k) -> jax.Array:
  """The k-th smallest score (1-based), +inf when k > n. vmap over k."""
  scores = jnp.asarray(scores)
  n = scores.shape[0]
  kth = jnp.sort(scores)[jnp.clip(k - 1, 0, n - 1)]
  return jnp.where(k > n, jnp.inf, kth).astype(scores.dtype)


def aps_q_hat(scores: jax.Array, alpha) -> jax.Array:
  """The ceil((n+1)(1-alpha))-th smallest score; +inf when that rank exceeds n.

  Jit-able; vmap over alpha with in_axes=(None, 0).
  """
  return aps_order_stat(scores, aps_rank(jnp.shape(scores)[0], alpha))


@functools.partial(jax.jit, static_argnames=("randomized", "allow_empty"))
def aps_set(probs: jax.Array, q_hat, randomized: bool = False,
            key: Optional[jax.Array] = None, allow_empty: bool = False):
  """APS candidate set S(x) (Eqs. 17-18) as a mask in original class order.

  probs [B, C]; q_hat scalar or [B]. Returns (mask [B, C] bool, k [B] int32):
  k = the smallest k with cumulative sorted mass > q_hat (crossing class
  included), C if none (q_hat = inf or >= the total mass).
  randomized=True keeps the ranks r with cum_r - U p_(r) <= q_hat (one U per
  image, from `key`); such sets may be empty, so unless allow_empty they are
  padded to the top-1 class (Grad-CAM weights need a non-empty set).
  """
  probs = jnp.asarray(probs)
  b, c = probs.shape
  order, sorted_p, cum = _sorted_mass(probs)
  q = jnp.broadcast_to(jnp.asarray(q_hat, probs.dtype), (b,))[:, None]
  if randomized:
    if key is None:
      raise ValueError("randomized APS needs a PRNG key")
    u = jax.random.uniform(key, (b, 1), probs.dtype)
    inside = cum - u * sorted_p <= q
    extra = 0
  else:
    inside = cum <= q  # ranks before the crossing one
    extra = 1
  # Leading run of True, robust to any non-monotone rounding.
  lead = jnp.cumprod(inside.astype(jnp.int32), axis=-1).sum(-1)
  k = jnp.minimum(lead + extra, c)
  if randomized and not allow_empty:
    k = jnp.maximum(k, 1)
  sorted_mask = jnp.arange(c)[None, :] < k[:, None]
  mask = jnp.zeros((b, c), bool).at[jnp.arange(b)[:, None], order].set(sorted_mask)
  return mask, k.astype(jnp.int32)


# ---------------------------------------------------------------------------
# Empirical helpers for evaluation.


def acceptance_risk(p_max: jax.Array, wrong: jax.Array, lambda_hat) -> jax.Array:
  """Mean of l(lambda_hat) = 1{p_max >= lambda_hat and wrong} (Eq. 6's empirical risk)."""
  return jnp.mean((jnp.asarray(p_max) >= lambda_hat) & jnp.asarray(wrong))


def aps_coverage(mask: jax.Array, labels: jax.Array) -> jax.Array:
  """Fraction of samples whose label is in the set."""
  return jnp.mean(jnp.take_along_axis(mask, jnp.asarray(labels)[:, None], axis=-1))


def mean_set_size(mask: jax.Array) -> jax.Array:
  return jnp.mean(jnp.sum(mask, axis=-1))


# ---------------------------------------------------------------------------
# Input validation (host side, not jitted).


def _check_alpha(alpha, name: str) -> np.ndarray:
  a = np.asarray(alpha)
  if not np.issubdtype(a.dtype, np.floating):  # keep float32 alphas as given: 0.05f means 1/20
    a = a.astype(np.float64)
  if a.ndim > 1 or a.size == 0:
    raise ValueError(f"{name} must be a number or a 1-D array of numbers, got shape {a.shape}")
  if not np.all((a > 0) & (a < 1)):  # also rejects NaN
    raise ValueError(f"{name} must lie in the open interval (0, 1), got {a.tolist()}")
  return a


def validate_calibration_inputs(probs, labels, alpha=None, *, tol: float = 1e-3):
  """Checks calibration data before any rule runs; raises ValueError naming the problem.

  probs [n, C] softmax probabilities (finite, >= 0, rows sum to 1 within tol),
  labels [n] integers in [0, C), alpha (scalar or 1-D) in (0, 1).
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
    _check_alpha(alpha, "alpha")
  return p, y


# ---------------------------------------------------------------------------
# Calibration artifact.


class CalibrationError(RcstError):
  """Invalid calibration artifact or a CRC rule that cannot be satisfied (strict mode)."""


class CalibrationWarning(UserWarning):
  """CRC could not be satisfied: the stored lambda_hat is inf (the edge accepts nothing)."""


_META = ("edge_model", "server_model", "dataset", "split", "edge_digest", "server_digest")
_SWEEP = ("alphas_crc", "lambda_hats", "lambda_valids", "alphas_aps", "q_hats")
_FORMAT, _VERSION = "rcst_calibration", 1


def _enc(x: float):
  return "inf" if math.isinf(x) and x > 0 else x


def _dec(x, name: str) -> float:
  if x == "inf":
    return math.inf
  if isinstance(x, bool) or not isinstance(x, (int, float)):
    raise CalibrationError(f"{name} must be a number or the string 'inf', got {x!r}")
  return float(x)


def _check_threshold(lam: float, valid: bool, name: str):
  if valid and not 0.0 <= lam <= 1.0:
    raise CalibrationError(f"{name}={lam} must lie in [0, 1] when valid")
  if not valid and not math.isinf(lam):
    raise CalibrationError(f"{name}={lam} must be inf when the CRC rule is not satisfiable")


@dataclasses.dataclass(frozen=True)
class Calibration:
  """Output of Algorithm 1 at one operating point, plus optional per-alpha sweeps.

  lambda_hat: edge accepts when p_max >= lambda_hat, with p_max in float32
  as calibrated (inf: accepts nothing, lambda_valid False). q_hat: APS quantile (inf: every class is a candidate).
  The sweep tuples (alphas_crc, lambda_hats, lambda_valids) and
  (alphas_aps, q_hats) hold the per-alpha results when calibrate got arrays;
  `select` moves the operating point to one of their entries.
  """
  lambda_hat: float
  q_hat: float
  alpha_crc: float
  alpha_aps: float
  n: int
  lambda_valid: bool
  edge_model: Optional[str] = None
  server_model: Optional[str] = None
  dataset: Optional[str] = None
  split: Optional[str] = None
  B: float = 1.0
  # variables_digest of the models calibrated with (checkpoints.variables_digest), so a
  # calibration is not silently applied to other weights than it was computed for.
  edge_digest: Optional[str] = None
  server_digest: Optional[str] = None
  alphas_crc: Optional[tuple] = None
  lambda_hats: Optional[tuple] = None
  lambda_valids: Optional[tuple] = None
  alphas_aps: Optional[tuple] = None
  q_hats: Optional[tuple] = None

  def __post_init__(self):
    if isinstance(self.n, bool) or not isinstance(self.n, (int, np.integer)) or self.n < 1:
      raise CalibrationError(f"n must be a positive integer, got {self.n!r}")
    _check_B(self.B)
    if not isinstance(self.lambda_valid, (bool, np.bool_)):
      raise CalibrationError(f"lambda_valid must be a bool, got {self.lambda_valid!r}")
    for name in ("alpha_crc", "alpha_aps"):
      a = getattr(self, name)
      if not isinstance(a, (int, float, np.floating)) or not 0 < a < 1:
        raise CalibrationError(f"{name} must lie in (0, 1), got {a!r}")
    _check_threshold(self.lambda_hat, bool(self.lambda_valid), "lambda_hat")
    if math.isnan(self.q_hat) or self.q_hat < 0:
      raise CalibrationError(f"q_hat must be >= 0 or inf, got {self.q_hat}")
    for name in _META:
      v = getattr(self, name)
      if v is not None and not isinstance(v, str):
        raise CalibrationError(f"{name} must be a string or null, got {v!r}")
    crc = [getattr(self, k) for k in _SWEEP[:3]]
    aps = [getattr(self, k) for k in _SWEEP[3:]]
    for group, names in ((crc, _SWEEP[:3]), (aps, _SWEEP[3:])):
      if any(g is None for g in group) and not all(g is None for g in group):
        raise CalibrationError(f"sweep fields {names} must be given together")
      if group[0] is not None and len({len(g) for g in group}) != 1:
        raise CalibrationError(f"sweep fields {names} must have equal lengths")
    if crc[0] is not None:
      for lam, ok in zip(crc[1], crc[2]):
        _check_threshold(lam, ok, "lambda_hats entry")

  def select(self, alpha_crc: Optional[float] = None, alpha_aps: Optional[float] = None):
    """Copy whose operating point is the sweep entry for the given alpha(s)."""
    out = {}
    if alpha_crc is not None:
      i = _find(self.alphas_crc, alpha_crc, "alpha_crc")
      out.update(alpha_crc=self.alphas_crc[i], lambda_hat=self.lambda_hats[i],
                 lambda_valid=self.lambda_valids[i])
    if alpha_aps is not None:
      i = _find(self.alphas_aps, alpha_aps, "alpha_aps")
      out.update(alpha_aps=self.alphas_aps[i], q_hat=self.q_hats[i])
    return dataclasses.replace(self, **out)

  def to_dict(self) -> dict:
    d = {"format": _FORMAT, "version": _VERSION}
    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      if f.name in ("lambda_hat", "q_hat"):
        v = _enc(float(v))
      elif f.name in ("lambda_hats", "q_hats") and v is not None:
        v = [_enc(float(x)) for x in v]
      elif isinstance(v, tuple):
        v = list(v)
      d[f.name] = v
    return d

  def to_json(self, path) -> None:
    with open(path, "w") as f:
      json.dump(self.to_dict(), f, indent=2, allow_nan=False)
      f.write("\n")

  @classmethod
  def from_dict(cls, d: Any) -> "Calibration":
    if not isinstance(d, dict):
      raise CalibrationError(f"expected a JSON object, got {type(d).__name__}")
    if d.get("format") != _FORMAT or d.get("version") != _VERSION:
      raise CalibrationError(
          f"not an {_FORMAT} v{_VERSION} file (format={d.get('format')!r}, version={d.get('version')!r})")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    body = {k: v for k, v in d.items() if k not in ("format", "version")}
    unknown = sorted(set(body) - set(fields))
    if unknown:
      raise CalibrationError(f"unknown field(s) {unknown}")
    required = [k for k, f in fields.items() if f.default is dataclasses.MISSING]
    missing = [k for k in required if k not in body]
    if missing:
      raise CalibrationError(f"missing field(s) {missing}")
    kw = dict(body)
    kw["lambda_hat"] = _dec(kw["lambda_hat"], "lambda_hat")
    kw["q_hat"] = _dec(kw["q_hat"], "q_hat")
    for k in ("alpha_crc", "alpha_aps", "B"):
      if k in kw:
        kw[k] = _dec(kw[k], k)
    for k in _SWEEP:
      v = kw.get(k)
      if v is None:
        continue
      if not isinstance(v, list):
        raise CalibrationError(f"{k} must be a list, got {v!r}")
      if k == "lambda_valids":
        if not all(isinstance(x, bool) for x in v):
          raise CalibrationError(f"{k} must be a list of booleans")
        kw[k] = tuple(v)
      else:
        kw[k] = tuple(_dec(x, k) for x in v)
    return cls(**kw)

  @classmethod
  def from_json(cls, path) -> "Calibration":
    try:
      with open(path) as f:
        d = json.load(f)
    except json.JSONDecodeError as e:
      raise CalibrationError(f"{path}: not valid JSON ({e})") from e
    try:
      return cls.from_dict(d)
    except CalibrationError as e:
      raise CalibrationError(f"{path}: malformed calibration file: {e}") from e


def _check_B(B) -> float:
  """B bounds the 0-1 loss in the CRC rule: finite and >= 1 (B < 1 would understate it)."""
  if isinstance(B, bool) or not isinstance(B, (int, float, np.integer, np.floating)):
    raise CalibrationError(f"B (the loss bound) must be a number >= 1, got {B!r}")
  if not math.isfinite(B) or B < 1:
    raise CalibrationError(f"B (the loss bound) must be finite and >= 1, got {B!r}")
  return float(B)


def _find(values, alpha, name) -> int:
  if values is None:
    raise CalibrationError(f"no {name} sweep stored in this calibration")
  hits = [i for i, a in enumerate(values) if math.isclose(a, alpha, rel_tol=1e-6)]
  if not hits:
    raise CalibrationError(f"{name}={alpha} not in the stored sweep {list(values)}")
  return hits[0]


_lambda_sweep = jax.jit(jax.vmap(crc_threshold, in_axes=(None, None, 0)))
_q_sweep = jax.jit(jax.vmap(aps_order_stat, in_axes=(None, 0)))


def calibrate(probs, labels, alpha_crc, alpha_aps, *, B: float = 1.0, strict: bool = False,
              operating_index: int = 0, edge_model: Optional[str] = None,
              server_model: Optional[str] = None, dataset: Optional[str] = None,
              split: Optional[str] = None, edge_digest: Optional[str] = None,
              server_digest: Optional[str] = None) -> Calibration:
  """Algorithm 1 on edge softmax outputs: validates, then runs CRC and APS.

  alpha_crc / alpha_aps may be scalars or 1-D arrays (one vmapped call); with
  arrays the sweep fields are filled and the operating point is entry
  `operating_index`. If the CRC rule cannot be met (n < B/alpha - 1) the
  threshold is inf and a CalibrationWarning is issued; strict=True raises.
  """
  B = _check_B(B)
  p, y = validate_calibration_inputs(probs, labels)
  a_crc = _check_alpha(alpha_crc, "alpha_crc")
  a_aps = _check_alpha(alpha_aps, "alpha_aps")
  p = jnp.asarray(p, jnp.float32)
  y = jnp.asarray(y, jnp.int32)
  p_max = p.max(-1)
  wrong = jnp.argmax(p, -1) != y
  n = int(p.shape[0])
  # Integer budgets on the host, exactly; then one vmapped call per rule.
  lams, valids = _lambda_sweep(p_max, wrong, jnp.atleast_1d(crc_max_errors(n, a_crc, B)))
  qs = _q_sweep(aps_scores(p, y), jnp.atleast_1d(aps_rank(n, a_aps)))
  lams, valids, qs = np.asarray(lams), np.asarray(valids), np.asarray(qs)
  if not valids.all():
    bad = np.atleast_1d(a_crc)[~valids].tolist()
    msg = (f"CRC cannot control the risk at alpha_crc={bad} with n={n} calibration samples "
           f"(needs n >= B/alpha - 1 and no wrong sample with p_max == 1); "
           "lambda_hat = inf, the edge will accept nothing")
    if strict:
      raise CalibrationError(msg)
    warnings.warn(msg, CalibrationWarning, stacklevel=2)
  i_crc = operating_index if a_crc.ndim else 0
  i_aps = operating_index if a_aps.ndim else 0
  sweep = {}
  if a_crc.ndim:
    sweep.update(alphas_crc=tuple(float(a) for a in a_crc), lambda_hats=tuple(float(v) for v in lams),
                 lambda_valids=tuple(bool(v) for v in valids))
  if a_aps.ndim:
    sweep.update(alphas_aps=tuple(float(a) for a in a_aps), q_hats=tuple(float(v) for v in qs))
  return Calibration(
      lambda_hat=float(lams[i_crc]), q_hat=float(qs[i_aps]),
      alpha_crc=float(np.atleast_1d(a_crc)[i_crc]), alpha_aps=float(np.atleast_1d(a_aps)[i_aps]),
      n=n, lambda_valid=bool(valids[i_crc]), edge_model=edge_model, server_model=server_model,
      dataset=dataset, split=split, B=B, edge_digest=edge_digest, server_digest=server_digest,
      **sweep)
