"""The whole-system certificate of a run: Learn-then-Test on calibration outcomes.

No model runs here: `pick_certified_pair` reads the outcomes the sweep's passes
recorded (sweep/certification.py), for every calibration image what Algorithm
2 would do at every tau (the edge's prediction and p_max, the server's on the
kept patches and on the full image; q_hat fitted on the first split only, so
the second split's losses stay exchangeable with test images), runs Pareto
Testing on their losses (stats/ltt.py) and returns the certified (lambda, tau,
codec) as the certificate stored in the calibration artifact, sealed with a
digest of its fields; `check` is what loading it verifies, `verify` compares
it with one recomputed from the same outcomes, `describe` says it in words.
"""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np

from rcst_edge.payload import codecs
from rcst_jax.stats import ltt
from rcst_jax.stats import sizing as sizing_rule


def tau_grid(config) -> tuple:
  """The taus the certificate searches: certify.tau_grid, or the sweep's tau_grid."""
  return tuple(float(t) for t in (config.certify.get("tau_grid") or config.tau_grid))


def codec_grid(config) -> tuple[str, ...]:
  """The codecs the certificate searches (its third axis): certify.codec_grid, or raw."""
  return tuple(str(codecs.parse(c)) for c in (config.certify.get("codec_grid") or ("raw",)))


def levels(config) -> dict:
  """{risk: the level it is certified at, on the risk's own scale}."""
  c = config.certify
  return {r: float(config.alpha_crc) if r == "edge_risk" else float(c.epsilon) for r in c.risks}


def losses(config, out: dict, lambdas: np.ndarray):
  """{risk: [L, T, n] in [0, 1]} and {risk: its level on that [0, 1] scale}."""
  args = (out["labels"], out["edge_pred"], out["p_max"])
  xs, eps = {}, dict(levels(config))
  for risk in config.certify.risks:
    if risk == "accuracy_drop":  # {-1, 0, 1} mapped to [0, 1], its level with it
      x = ltt.accuracy_drop(*args, out["server_only_pred"], out["server_pred"], lambdas)
      xs[risk], eps[risk] = ltt.rescale_accuracy_drop(x, eps[risk])
    elif risk == "degradation":
      xs[risk] = ltt.degradation(*args, out["server_only_pred"], out["server_pred"], lambdas)
    elif risk == "system_error":
      xs[risk] = ltt.system_error(*args, out["server_pred"], lambdas)
    elif risk == "edge_risk":  # the paper's Eq. 6, kept at its own level alpha_crc
      xs[risk] = ltt.edge_risk(*args, lambdas, len(out["server_pred"]))
  return xs, eps


def byte_cost(p_max, nbytes, lambdas, geometry, per_image: bool = False):
  """Exact payload bytes (``nbytes`` [T, n], as encoded) over raw image bytes
  of each configuration, the byte cost Table 1 reports (sweep/metrics.py):
  mean [L, T] (or [L, T, n])."""
  return ltt.offload_cost(p_max, np.asarray(nbytes, np.float64) / geometry.raw_bytes, lambdas,
                          per_image)


def order_seed(split_seed: int) -> int:
  """The testing order's seed: a stream of certify.seed apart from the split's
  (fixed with the config, never drawn from the data)."""
  return int(np.random.SeedSequence([int(split_seed) % 2**32, 1]).generate_state(1)[0])


def encode_float(x: float):
  """A threshold as JSON: +inf as the string 'inf' (strict JSON has no inf)."""
  x = float(x)
  return "inf" if x == math.inf else x


def pick_certified_pair(config, out: dict, taus, geometry, q_hat_fit: float,
                        n_fit: int, codec_specs=("raw",)) -> tuple[dict, dict]:
  """Learn-then-Test on calibration outcomes (no model runs): the cheapest
  (lambda, tau, codec) certified, or server-only when none is, as (sealed
  certificate for the artifact, grid arrays for the figure).

  `out` holds the calibration outcomes with the fitting split first (n_fit
  images), then the testing split; its per-configuration arrays
  (server_pred, kept, bytes) are [C * T, n], codec-major over
  ``codec_specs`` x ``taus``, so the grid's second axis is (codec, tau).
  """
  c = config.certify
  lambdas = np.asarray(c.lambda_grid, np.float64)
  xs, eps = losses(config, out, lambdas)
  cost_kind = c.get("cost", "patches")
  if cost_kind == "bytes":
    cost = byte_cost(out["p_max"], out["bytes"], lambdas, geometry, per_image=True)
  else:
    cost = ltt.patch_cost(out["p_max"], out["kept"], lambdas, geometry.num_patches,
                          per_image=True)
  n, mt, seed = len(out["labels"]), c.get("multiple_testing", "pareto"), order_seed(c.seed)
  res = ltt.pareto_testing(xs, cost, eps, c.delta, test=c.test, multiple_testing=mt,
                           split_indices=(np.arange(n_fit), np.arange(n_fit, n)),
                           order_seed=seed)
  head = xs[c.risks[0]].mean(-1)  # for the figure: the first risk on its own scale
  if c.risks[0] == "accuracy_drop":
    head = 2 * head - 1
  grid = {"cost": cost.mean(-1), "risk": head, "certified": res.certified,
          "lambda_grid": lambdas, "tau_grid": np.asarray(taus, np.float64)}
  # The empirical oracle: the cheapest pair within every level on all these
  # images, what a certificate that knew them would pick (no guarantee).
  within = np.all([x.mean(-1) <= eps[r] for r, x in xs.items()], axis=0)
  if within.any():
    o = np.unravel_index(np.argmin(np.where(within, grid["cost"], np.inf)), within.shape)
    grid["oracle"] = (float(grid["cost"][o]), float(head[o]))
  cert = {"risks": list(c.risks), "levels": levels(config), "epsilon": float(c.epsilon),
          "delta": float(c.delta), "test": c.test, "n_fit": int(n_fit), "n_test": int(res.n_test),
          "grid_size": int(res.certified.size), "certified_count": int(res.certified.sum()),
          "q_hat": encode_float(q_hat_fit), "split": float(c.split), "split_seed": int(c.seed),
          "order_seed": seed,
          "cost": cost_kind, "multiple_testing": mt,
          "lambda_grid": [float(x) for x in lambdas], "tau_grid": [float(t) for t in taus],
          "codec_grid": [str(s) for s in codec_specs]}
  if res.chosen is None:  # nothing certified: server-only (accept nothing, keep every patch)
    cert.update(certified=False, lambda_hat="inf", tau=0.0, codec="raw", p_value=None,
                cost_calibration=1.0)
  else:
    l, t = res.chosen
    cert.update(certified=True, lambda_hat=encode_float(lambdas[l]),
                tau=float(taus[t % len(taus)]), codec=str(codec_specs[t // len(taus)]),
                p_value=float(res.adjusted[l, t]), cost_calibration=float(cost[l, t].mean()))
    grid["chosen"] = (float(cost[l, t].mean()), float(head[l, t]))
  return seal(cert), grid


SIZING_COSTS = (0.1, 0.15, 0.2, 0.3, 0.5)


def sizing(config, fit: dict, geometry, n_test: int) -> str:
  """How many testing images the cheap configurations need, read off the
  fitting split's outcomes (a pilot; printed before the testing passes).

  For each (lambda, tau), each risk's mean and variance on the fitting split
  give `stats.sizing.n_to_certify` (the largest over risks); for each patch cost in
  SIZING_COSTS the line gives the fewest testing images any pair at most that
  cost needs, then the cheapest pair that this run's ``n_test`` reach.
  """
  c = config.certify
  lambdas = np.asarray(c.lambda_grid, np.float64)
  xs, eps = losses(config, fit, lambdas)
  need = np.max(np.stack([sizing_rule.n_to_certify(x.mean(-1), x.var(-1), eps[r], c.delta, c.test)
                          for r, x in xs.items()]), 0)
  cost = ltt.patch_cost(fit["p_max"], fit["kept"], lambdas, geometry.num_patches)
  head = (f"certification pilot ({len(fit['labels']):,} fitting images, {c.test} test, "
          f"epsilon = {c.epsilon:g}, delta = {c.delta:g})")
  if not np.isfinite(need).any():
    return f"{head}: no (lambda, tau) is estimated within its levels; expect server-only"
  by_cost = [f"<= {b:g}: {int(need[cost <= b].min()):,}" for b in SIZING_COSTS
             if np.isfinite(need[cost <= b]).any()]
  words = [f"{head}: testing images needed to certify a pair about half the time, by patch "
           f"cost: " + ("; ".join(by_cost) if by_cost else f"none at cost <= {SIZING_COSTS[-1]}")]
  reach = need <= n_test
  words.append(f"this run tests on {n_test:,}, " + (
      f"enough for cost {cost[reach].min():.3f}" if reach.any() else "enough for no pair: expect "
      "server-only") + " (a rule of thumb: fixed-sequence testing must also pass the pairs "
      "before it; raise data.n_cal for cheaper pairs)")
  return "; ".join(words)


# ---------------------------------------------------------------------------
# The digest, and what loading a certificate checks (artifact._check_certificate).


_RISKS = ("accuracy_drop", "degradation", "system_error", "edge_risk")
_WORDS = {"test": ("wsr", "hb", "binomial", "exact"),
          "multiple_testing": ("pareto", "bonferroni"),
          "cost": ("patches", "bytes")}
KEYS = ("certified", "lambda_hat", "tau", "codec", "q_hat", "risks", "levels", "epsilon",
        "delta", "test", "multiple_testing", "cost", "n_fit", "n_test", "split", "split_seed",
        "order_seed", "lambda_grid", "tau_grid", "codec_grid", "grid_size", "certified_count",
        "p_value", "cost_calibration", "digest")


def digest(cert: dict) -> str:
  """sha256 hex of the canonical JSON (sorted keys, compact) of every field but the digest."""
  body = {k: v for k, v in cert.items() if k != "digest"}
  try:
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
  except (TypeError, ValueError) as e:
    raise ValueError(f"certificate is not plain JSON ({e})") from e
  return hashlib.sha256(text.encode("utf-8")).hexdigest()


def seal(cert: dict) -> dict:
  """The certificate with its digest (catches edits, not a deliberate forgery)."""
  return {**{k: v for k, v in cert.items() if k != "digest"}, "digest": digest(cert)}


def _num(v, lo=-math.inf, hi=math.inf) -> bool:
  return (not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
          and lo <= v <= hi)


def _int(v, lo=None) -> bool:
  return not isinstance(v, bool) and isinstance(v, int) and (lo is None or v >= lo)


def _codec_name(v) -> bool:
  """A codec's canonical name ("jpeg:90", not "jpeg: 90")."""
  try:
    return isinstance(v, str) and str(codecs.parse(v)) == v
  except codecs.CodecError:
    return False


def _need(ok, c: dict, k: str, want: str):
  if not ok:
    raise ValueError(f"certificate.{k}={c[k]!r} {want}")


def check(c, n: int) -> None:
  """ValueError naming the field and its value unless ``c`` is a sealed, consistent
  certificate of a calibration with ``n`` images."""
  if not isinstance(c, dict) or set(c) != set(KEYS):
    got = sorted(c) if isinstance(c, dict) else type(c).__name__
    raise ValueError(f"certificate must be an object with keys {list(KEYS)}, got {got}; "
                     "rerun `rcst calibrate`")
  if c["digest"] != digest(c):
    raise ValueError("certificate fields were edited (digest mismatch); rerun `rcst calibrate`")
  _check_values(c, n)
  _check_grid(c)
  if c["certified"]:  # what Learn-then-Test must have found to certify this pair
    _need(c["p_value"] is not None and c["p_value"] <= c["delta"], c, "p_value",
          f"exceeds delta={c['delta']}: that pair is not certified")
    _need(c["lambda_hat"] in c["lambda_grid"], c, "lambda_hat", "is not in lambda_grid")
    _need(c["tau"] in c["tau_grid"], c, "tau", "is not in tau_grid")
    _need(c["codec"] in c["codec_grid"], c, "codec", "is not in codec_grid")
    _need(c["certified_count"] >= 1, c, "certified_count", "must be >= 1 when certified")
  else:
    _need(c["codec"] == "raw", c, "codec", "must be 'raw' when nothing is certified")


def _check_values(c: dict, n: int):
  _need(isinstance(c["certified"], bool), c, "certified", "must be a boolean")
  for k in ("lambda_hat", "q_hat"):
    _need(c[k] == "inf" or _num(c[k], 0), c, k, "must be a number >= 0 or 'inf'")
  for k in ("epsilon", "delta"):
    _need(_num(c[k]) and 0 < c[k] < 1, c, k, "must lie in (0, 1)")
  _need(_num(c["tau"], 0, 1), c, "tau", "must be a number in [0, 1]")
  for k, allowed in _WORDS.items():
    _need(c[k] in allowed, c, k, f"must be one of {list(allowed)}")
  risks = c["risks"]
  _need(isinstance(risks, list) and risks and all(r in _RISKS for r in risks)
        and len(set(risks)) == len(risks), c, "risks", f"must be distinct names from {_RISKS}")
  _need(isinstance(c["levels"], dict) and set(c["levels"]) == set(risks)
        and all(_num(v) and 0 < v < 1 for v in c["levels"].values()), c, "levels",
        "must give each risk a level in (0, 1)")
  for k in ("n_fit", "n_test"):
    _need(_int(c[k], 1), c, k, "must be an integer >= 1")
  _need(c["n_fit"] + c["n_test"] <= n, c, "n_test",
        f"plus n_fit={c['n_fit']} exceeds the calibration's n={n}")
  _need(_num(c["split"]) and 0 < c["split"] < 1, c, "split", "must lie in (0, 1)")
  _need(_int(c["split_seed"]), c, "split_seed", "must be an integer")
  _need(_int(c["order_seed"], 0), c, "order_seed", "must be an integer >= 0")
  _need(c["p_value"] is None or _num(c["p_value"], 0, 1), c, "p_value",
        "must be null or a number in [0, 1]")
  _need(_num(c["cost_calibration"], 0), c, "cost_calibration", "must be a number >= 0")


def _check_grid(c: dict):
  for k, hi in (("lambda_grid", math.inf), ("tau_grid", 1.0)):
    _need(isinstance(c[k], list) and c[k] and all(_num(v, 0, hi) for v in c[k]), c, k,
          f"must be a non-empty list of numbers in [0, {hi:g}]")
  _need(isinstance(c["codec_grid"], list) and c["codec_grid"]
        and all(_codec_name(v) for v in c["codec_grid"])
        and len(set(c["codec_grid"])) == len(c["codec_grid"]), c, "codec_grid",
        "must be a non-empty list of distinct codec names (raw, zstd, jpeg:Q, ...)")
  _need(_codec_name(c["codec"]), c, "codec", "must be a codec name")
  size = len(c["lambda_grid"]) * len(c["tau_grid"]) * len(c["codec_grid"])
  _need(_int(c["grid_size"]) and c["grid_size"] == size, c, "grid_size",
        f"must equal len(lambda_grid) * len(tau_grid) * len(codec_grid) = {size}")
  _need(_int(c["certified_count"], 0) and c["certified_count"] <= size, c, "certified_count",
        f"must be an integer in [0, grid_size={size}]")


# ---------------------------------------------------------------------------
# Recomputation (`rcst calibrate --verify`) and the certificate in words.


_CLOSE = ("p_value", "cost_calibration")  # sums whose last bits may follow the summation order
_MISSING = "<missing>"


def _same(a, b, close: bool) -> bool:
  if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
    return len(a) == len(b) and all(_same(x, y, close) for x, y in zip(a, b))
  if isinstance(a, dict) and isinstance(b, dict):
    return a.keys() == b.keys() and all(_same(a[k], b[k], close) for k in a)
  if _num(a) and _num(b):
    return a == b or (close and math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0))
  return type(a) is type(b) and a == b


def verify(recorded: dict, recomputed: dict) -> list[str]:
  """Each field in which a recorded certificate differs from the one recomputed
  from the same calibration outcomes, with both values ([] when they agree).
  Exact, except 1e-12 relative on p_value and cost_calibration; the digest is
  not compared (a function of the rest, checked on load)."""
  diffs = []
  for k in sorted((set(recorded) | set(recomputed)) - {"digest"}):
    a, b = recorded.get(k, _MISSING), recomputed.get(k, _MISSING)
    if not _same(a, b, k in _CLOSE):
      diffs.append(f"{k}: recorded {a!r}, recomputed {b!r}")
  return diffs


_RISK_WORDS = {"accuracy_drop": "expected accuracy drop", "degradation": "expected degradation",
               "system_error": "expected system error", "edge_risk": "edge risk"}
_MT_WORDS = {"pareto": ("Pareto Testing", "fixed-sequence"),
             "bonferroni": ("Bonferroni", "Bonferroni-adjusted")}
_COST_WORD = {"patches": "patch", "bytes": "byte"}


def _bounds(cert: dict) -> str:
  """Each risk at its own level, e.g. "expected accuracy drop <= 0.02 and edge risk
  <= 0.05 (alpha_crc)"."""
  lv = cert["levels"]
  return " and ".join(f"{_RISK_WORDS[r]} <= {lv[r]:g}" + (" (alpha_crc)" if r == "edge_risk"
                                                          else "") for r in cert["risks"])


def describe(cert: dict) -> str:
  """The certificate in words (printed under Table 1): what is bounded, at which
  level, by which adjusted p-value, and over what the probability is taken."""
  mt, adj = _MT_WORDS[cert["multiple_testing"]]
  order = (f"{cert['n_test']} testing calibration images in a random order (seed "
           f"{cert['order_seed']}), after {cert['n_fit']} fitting images ordered the grid")
  if not cert["certified"]:
    return (f"Certified row: no (lambda, tau) of {cert['grid_size']} was certified for "
            f"{_bounds(cert)} at delta = {cert['delta']:g} (Learn-then-Test, {mt}, "
            f"{cert['test']} p-values on {order}); the row is server-only (accept nothing, "
            f"send every patch), which carries no certificate.")
  codec = "" if cert["codec_grid"] == ["raw"] else f", patches coded {cert['codec']}"
  return (f"Certified row: (lambda, tau) = ({float(cert['lambda_hat']):g}, {cert['tau']:g}){codec}, the "
          f"lowest {_COST_WORD[cert['cost']]} cost of the {cert['certified_count']} of "
          f"{cert['grid_size']} configurations certified by Learn-then-Test ({mt}, "
          f"{cert['test']} p-values, {adj} p = {cert['p_value']:.3g} <= delta = "
          f"{cert['delta']:g}). If calibration and test images are i.i.d., then with "
          f"probability >= {1 - cert['delta']:g} over draws of the calibration set, "
          f"{_bounds(cert)} for a new image; tested on {order}.")
