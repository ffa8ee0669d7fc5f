"""Sizing a calibration set: how many testing images a configuration needs.

A rule of thumb from each test's asymptotics, read off a pilot (the fitting
split): `calibration.certificate.sizing` prints it before the long passes.
Not part of any guarantee.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["n_to_certify"]


def n_to_certify(mean, var, eps: float, delta: float, test: str = "exact"):
  """Testing images at which one configuration is certified about half the time.

  For losses in [0, 1] with true mean ``mean`` < eps and variance ``var``
  (arrays broadcast; inf where mean >= eps), the test's p-value crosses delta
  at a margin eps - mean of about sqrt(c var / n): c = z_{1-delta}^2 for the
  exact and binomial tests (asymptotically a z-test on the mean), 2 ln(1/delta)
  for betting (its capital at the bet sqrt(2 ln(1/delta) / (n var)) reaches
  1/delta when n = 2 ln(1/delta) var / margin^2), and ln(1/delta) / 2 over
  margin^2 for Hoeffding-Bentkus (the Hoeffding term, variance bounded by
  1/4). A rule of thumb for sizing, not part of any guarantee: fixed-sequence
  testing also needs the configurations tested before this one to pass.
  """
  if not 0.0 < delta < 1.0:
    raise ValueError(f"delta must be in (0, 1), got {delta}")
  if test in ("exact", "binomial"):
    c = float(_normal_quantile(1.0 - delta)) ** 2
  elif test == "wsr":
    c = 2.0 * math.log(1.0 / delta)
  elif test == "hb":
    c, var = 2.0 * math.log(1.0 / delta), np.full(np.shape(var), 0.25)
  else:
    raise ValueError(f"test must be 'exact', 'binomial', 'wsr' or 'hb', got {test!r}")
  margin = float(eps) - np.asarray(mean, np.float64)
  with np.errstate(divide="ignore", invalid="ignore"):
    n = np.ceil(c * np.asarray(var, np.float64) / margin ** 2)
  return np.where(margin > 0, np.maximum(n, 1.0), np.inf)


def _normal_quantile(p: float) -> float:
  """Standard normal quantile by bisection on erfc (no scipy in the library)."""
  lo, hi = -40.0, 40.0
  for _ in range(200):
    mid = 0.5 * (lo + hi)
    if 0.5 * math.erfc(-mid / math.sqrt(2.0)) < p:
      lo = mid
    else:
      hi = mid
  return 0.5 * (lo + hi)
