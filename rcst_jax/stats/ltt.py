"""Learn-then-Test for the whole system: certify (lambda, tau) pairs, pick the cheapest.

A configuration theta = (lambda, tau) runs Algorithm 2: an image is accepted on
the edge iff p_max >= lambda, otherwise the server sees the patches kept at tau.
Its risk R(theta) is the population mean of a loss in [0, 1] (accuracy drop,
degradation, system error or edge risk, below). For each grid point we test
H_theta: R(theta) > eps with a valid p-value (P(p <= u) <= u under H_theta), and
control the family-wise error rate at delta over the whole grid (fixed-sequence
testing along a Pareto order fitted on a separate split, or Bonferroni).

What is guaranteed. Assume the n calibration images and the test image are
i.i.d. from one distribution, and the split (or the caller's split_indices) and
the grid do not depend on the calibration losses. The betting p-value reads
its samples in order and is valid only when that order is exchangeable; the
caller's order may not be (sorted indices, a folder listed class by class), so
`pareto_testing` permutes both splits with a permutation seeded by
`order_seed`, chosen in advance and never from the data. Each p-value is then
valid (P(p <= u) <= u when R(theta) > eps), fixed-sequence testing along an
order fitted on the first split (or Bonferroni) controls the family-wise
error, and over the draw of the calibration set (and of the split, and of
the permutation: a seed fixed in advance is one draw of it)
    P( R(theta) <= eps for every certified theta simultaneously ) >= 1 - delta,
hence P( R(theta_hat) <= eps ) >= 1 - delta for the cheapest certified
theta_hat, or for any other rule that picks among the certified ones. Here R is
the expected loss of a new test image. With several risks, a configuration is
certified only if every risk is <= its eps (its p-value is the max over risks).

What is not guaranteed. The bound is on the population risk, not on the
empirical risk of one test set (that fluctuates around R(theta_hat)); it is
marginal over calibration draws, not conditional on a given calibration set or
on a class or image; nothing holds under distribution shift; costs are
estimates, not controlled quantities. When nothing is certified the caller
falls back to server-only (cost 1): zero accuracy drop and degradation by
definition, but no certificate at all for system error or other risks.

Accuracy drop lives in {-1, 0, 1}; tests need [0, 1]: use x' = (x + 1) / 2 and
eps' = (eps + 1) / 2 (`rescale_accuracy_drop`), since R <= eps <=> R' <= eps'.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Mapping, Optional, Tuple

import numpy as np

from rcst_jax.stats.conformal import accepts
from rcst_jax.stats.exact import exact_pvalue

__all__ = [
    "decisions", "accuracy_drop", "degradation", "system_error", "edge_risk", "offload_cost",
    "patch_cost",
    "rescale_accuracy_drop", "binomial_pvalue", "hb_pvalue", "wsr_pvalue", "config_pvalues",
    "fixed_sequence_adjusted", "bonferroni_adjusted",
    "pareto_order", "LTTResult", "pareto_testing",
]


# ---------------------------------------------------------------------------
# Losses and cost on a (lambda, tau) grid: arrays [L, T, n] and [L, T].


def decisions(p_max, edge_pred, server_pred, lambdas):
  """Algorithm 2 on the grid: (accepted [L, n], system prediction [L, T, n])."""
  if np.ndim(server_pred) != 2 or np.shape(server_pred)[1] != np.size(p_max):
    raise ValueError(f"server_pred must be [T, n], got {np.shape(server_pred)}")
  accepted = accepts(np.asarray(p_max)[None, :], np.asarray(lambdas)[:, None])
  pred = np.where(accepted[:, None, :], np.asarray(edge_pred)[None, None, :],
                  np.asarray(server_pred)[None, :, :])
  return accepted, pred


def system_error(labels, edge_pred, p_max, server_pred, lambdas):
  """1{system wrong}, [L, T, n]."""
  _, pred = decisions(p_max, edge_pred, server_pred, lambdas)
  return (pred != np.asarray(labels)).astype(np.float64)


def accuracy_drop(labels, edge_pred, p_max, server_only_pred, server_pred, lambdas):
  """1{system wrong} - 1{server-only wrong} in {-1, 0, 1}, [L, T, n]."""
  ref = (np.asarray(server_only_pred) != np.asarray(labels)).astype(np.float64)
  return system_error(labels, edge_pred, p_max, server_pred, lambdas) - ref


def degradation(labels, edge_pred, p_max, server_only_pred, server_pred, lambdas):
  """1{system wrong and server-only right}, [L, T, n]."""
  ref_right = np.asarray(server_only_pred) == np.asarray(labels)
  return system_error(labels, edge_pred, p_max, server_pred, lambdas) * ref_right


def edge_risk(labels, edge_pred, p_max, lambdas, num_taus: int):
  """1{accepted and edge wrong} (the CRC loss), broadcast over tau: [L, T, n]."""
  accepted = accepts(np.asarray(p_max)[None, :], np.asarray(lambdas)[:, None])
  loss = (accepted & (np.asarray(edge_pred) != np.asarray(labels))).astype(np.float64)
  return np.broadcast_to(loss[:, None, :], (loss.shape[0], num_taus, loss.shape[1]))


def offload_cost(p_max, cost, lambdas, per_image: bool = False):
  """What the grid pays: an image costs ``cost`` [T, n] (at each tau) when it is
  offloaded (not accepted at lambda), else 0: mean [L, T] (or [L, T, n])."""
  offload = ~accepts(np.asarray(p_max)[None, :], np.asarray(lambdas)[:, None])
  total = offload[:, None, :] * np.asarray(cost, np.float64)[None, :, :]
  return total if per_image else total.mean(-1)


def patch_cost(p_max, kept, lambdas, num_patches: int, per_image: bool = False):
  """Transmitted fraction of patches, (not accepted) * kept / N: mean [L, T] (or [L, T, n])."""
  return offload_cost(p_max, np.asarray(kept, np.float64) / num_patches, lambdas, per_image)


def rescale_accuracy_drop(losses, eps):
  """Maps losses in [-1, 1] and eps to [0, 1]: R <= eps <=> R' <= (eps + 1) / 2."""
  return (np.asarray(losses) + 1.0) / 2.0, (eps + 1.0) / 2.0


# ---------------------------------------------------------------------------
# p-values for H0: mean loss > eps (losses in [0, 1] on the last axis).


def _check(losses, eps):
  x = np.asarray(losses, np.float64)
  if not 0.0 < eps < 1.0:
    raise ValueError(f"eps must be in (0, 1), got {eps}")
  if x.size and (x.min() < 0.0 or x.max() > 1.0):
    raise ValueError("losses must lie in [0, 1] (rescale accuracy drop first)")
  return x


@functools.lru_cache(maxsize=64)
def _binom_cdf_table(n: int, eps: float) -> np.ndarray:
  """P(Binom(n, eps) <= k) for k = 0..n, summed in log space (lgamma)."""
  lg = np.array([math.lgamma(k + 1.0) for k in range(n + 1)])
  k = np.arange(n + 1)
  logpmf = lg[n] - lg[k] - lg[n - k] + k * math.log(eps) + (n - k) * math.log1p(-eps)
  return np.minimum(np.exp(np.logaddexp.accumulate(logpmf)), 1.0)


def _binom_cdf(k, n: int, eps: float):
  k = np.asarray(k)
  table = _binom_cdf_table(int(n), float(eps))
  return np.where(k < 0, 0.0, table[np.clip(k, 0, n).astype(np.int64)])


def binomial_pvalue(losses, eps: float):
  """Exact test for binary losses: P(Binom(n, eps) <= sum of losses)."""
  x = _check(losses, eps)
  if np.any((x != 0.0) & (x != 1.0)):
    raise ValueError("binomial_pvalue needs binary losses; use hb_pvalue or wsr_pvalue")
  return _binom_cdf(np.rint(x.sum(-1)), x.shape[-1], eps)


def hb_pvalue(losses, eps: float):
  """Hoeffding-Bentkus (LTT): min(exp(-n h1(mean ^ eps, eps)), e P(Bin(n, eps) <= ceil(n mean)))."""
  x = _check(losses, eps)
  n = x.shape[-1]
  a = np.minimum(x.mean(-1), eps)
  with np.errstate(divide="ignore", invalid="ignore"):
    h1 = (np.where(a > 0, a * np.log(a / eps), 0.0)
          + np.where(a < 1, (1 - a) * np.log((1 - a) / (1 - eps)), 0.0))
  bentkus = math.e * _binom_cdf(np.ceil(x.sum(-1)), n, eps)  # ceil of the sum: conservative
  return np.minimum(np.minimum(np.exp(-n * h1), bentkus), 1.0)


def wsr_pvalue(losses, eps: float, delta: float, c: float = 0.75):
  """Betting test (Waudby-Smith & Ramdas 2024, predictable plug-in), Ville p-value.

  Capital K_t = prod_{i<=t} (1 + b_i (eps - X_i)) is a nonnegative
  supermartingale under H0 (E X >= eps) for predictable b_i in [0, 1/(1-eps)):
  1 + b (eps - X) >= 1 - b (1 - eps) > 0 for X <= 1. (Betting *against* a large
  mean bounds b by 1/(1-eps); 1/eps is the bound for the opposite direction.)
  b_t = min(c/(1-eps), sqrt(2 log(1/delta) / (n sigma2_{t-1}))) with the
  regularised running mean and variance of X_1..X_{t-1} (as in RCPS).
  p = min(1, 1 / max_t K_t); the samples are taken in the order given, so the
  p-value is valid only if that order is exchangeable (i.i.d. samples in an
  order that does not depend on their values, or randomly permuted).
  """
  x = _check(losses, eps)
  n = x.shape[-1]
  t = np.arange(1, n + 1)
  mu = (0.5 + np.cumsum(x, -1)) / (t + 1)                     # mu_hat_t uses X_1..X_t
  mu_prev = np.concatenate([np.full(x.shape[:-1] + (1,), 0.5), mu[..., :-1]], -1)
  sigma2 = (0.25 + np.cumsum((x - mu_prev) ** 2, -1)) / (t + 1)
  sigma2_prev = np.concatenate([np.full(x.shape[:-1] + (1,), 0.25), sigma2[..., :-1]], -1)
  bet = np.minimum(c / (1 - eps), np.sqrt(2 * math.log(1 / delta) / (n * sigma2_prev)))
  log_k = np.cumsum(np.log1p(bet * (eps - x)), -1)
  return np.minimum(1.0, np.exp(-np.max(log_k, -1, initial=0.0)))


def _as_risks(losses, eps) -> Tuple[list, list]:
  if isinstance(losses, Mapping):
    names = list(losses)
    eps_map = eps if isinstance(eps, Mapping) else {k: eps for k in names}
    return [np.asarray(losses[k]) for k in names], [float(eps_map[k]) for k in names]
  return [np.asarray(losses)], [float(eps)]


def config_pvalues(losses, eps, delta: float, test: str = "wsr"):
  """p-values [...] over configurations; several risks (a mapping) take the max.

  test: "wsr" (betting), "hb" (Hoeffding-Bentkus), "binomial" (binary losses) or
  "exact" (losses in {0, 1/2, 1}, e.g. the rescaled accuracy drop: the
  Berger-Boos exact p-value of `stats.exact`, never below its gamma = 1e-4).
  """
  fn = {"binomial": lambda x, e: binomial_pvalue(x, e), "hb": hb_pvalue,
        "wsr": lambda x, e: wsr_pvalue(x, e, delta), "exact": lambda x, e: exact_pvalue(x, e)}[test]
  xs, es = _as_risks(losses, eps)
  return np.max(np.stack([fn(x, e) for x, e in zip(xs, es)]), 0)


# ---------------------------------------------------------------------------
# Family-wise error control.


def pareto_order(cost, margin):
  """Flat order: the (cost, margin) Pareto front by margin, then the rest by margin."""
  cost, margin = np.ravel(cost), np.ravel(margin)
  by_cost = np.lexsort((margin, cost))
  best = np.minimum.accumulate(np.concatenate([[np.inf], margin[by_cost][:-1]]))
  front = np.zeros(cost.size, bool)
  front[by_cost] = margin[by_cost] < best   # strictly better than every cheaper point
  rank = np.lexsort((cost, margin, ~front))  # front first; by margin, then cost
  return rank, front


def fixed_sequence_adjusted(pvals_in_order):
  """Adjusted p-values of fixed-sequence testing: max_{i<=j} p_(i) at position j.

  The j-th hypothesis is rejected iff its adjusted p-value is <= delta, i.e.
  iff it and every one before it has p <= delta: testing stops at the first p > delta.
  """
  p = np.asarray(pvals_in_order, np.float64)
  return np.maximum.accumulate(p) if p.size else p


def bonferroni_adjusted(pvals):
  """Adjusted p-values of Bonferroni over m hypotheses: min(1, m p)."""
  p = np.asarray(pvals, np.float64)
  return np.minimum(1.0, max(p.size, 1) * p)


@dataclasses.dataclass
class LTTResult:
  certified: np.ndarray           # [L, T] bool: adjusted <= delta
  chosen: Optional[Tuple[int, int]]  # cheapest certified (l, t); None -> server-only, cost 1
  pvalues: np.ndarray             # [L, T] on the testing split, read in permuted order
  order: np.ndarray               # flat indices in testing order
  n_test: int
  n_opt: int
  adjusted: np.ndarray            # [L, T] multiplicity-adjusted p-values (what the FWER controls)
  order_seed: int                 # seed of the permutation applied before any p-value


def _split(n: int, split: float, seed, split_indices, order_seed: int):
  """(fitting, testing) indices, each permuted by a data-independent seeded permutation.

  The betting p-value reads its samples in order, and callers' indices may
  be sorted (by index, hence by class for a folder source). Each set is
  sorted, then permuted: the order depends on the seed and the set only, not
  on the order the indices came in, and is exchangeable for i.i.d. images.
  """
  if split_indices is None:
    perm = np.random.default_rng(seed).permutation(n)
    n_opt = int(round(split * n))
    split_indices = (perm[:n_opt], perm[n_opt:])
  opt_idx, test_idx = (np.sort(np.asarray(i, np.int64)) for i in split_indices)
  fit_rng, test_rng = (np.random.default_rng(s)
                       for s in np.random.SeedSequence(int(order_seed)).spawn(2))
  return fit_rng.permutation(opt_idx), test_rng.permutation(test_idx)


def _order_key(xs, es, opt_idx, delta, test, order_by):
  if order_by == "pvalue":
    return config_pvalues({i: x[..., opt_idx] for i, x in enumerate(xs)}, dict(enumerate(es)),
                          delta, test)
  if order_by == "margin":
    return np.max(np.stack([x[..., opt_idx].mean(-1) - e for x, e in zip(xs, es)]), 0)
  raise ValueError(f"order_by must be 'pvalue' or 'margin', got {order_by!r}")


def _adjust(pvals, order, multiple_testing: str):
  """Adjusted p-values [L, T] of the chosen multiple-testing procedure."""
  if multiple_testing == "pareto":
    adjusted = np.empty(pvals.size)
    adjusted[order] = fixed_sequence_adjusted(pvals.ravel()[order])
    return adjusted.reshape(pvals.shape)
  if multiple_testing == "bonferroni":
    return bonferroni_adjusted(pvals)
  raise ValueError(f"multiple_testing must be 'pareto' or 'bonferroni', got {multiple_testing!r}")


def pareto_testing(losses, costs, eps, delta: float, split: float = 0.5, test: str = "wsr",
                   seed=0, split_indices=None, order_by: str = "pvalue",
                   multiple_testing: str = "pareto", order_seed: int = 0) -> LTTResult:
  """Pareto Testing (Laufer-Goldshtein et al., ICLR 2023) over a [L, T] grid.

  losses: [L, T, n] in [0, 1], or a mapping name -> [L, T, n] with eps a float
  or a mapping name -> eps. costs: [L, T] (known) or [L, T, n] (per image).
  The first split orders configurations (Pareto front of estimated cost and
  risk margin max_k(R_hat_k - eps_k)); the second tests them in that order.
  split_indices = (opt_idx, test_idx) overrides the random split. order_by:
  "pvalue" (default) sorts the front by the configurations' p-values on the
  first split, which accounts for each loss's variance as the test does;
  "margin" by the estimated risk margin. multiple_testing="bonferroni" tests
  every configuration at delta / |grid| on the same second split instead
  (the first split still fits what the caller fitted on it).

  Assumes i.i.d. calibration images. The betting ("wsr") p-value is valid
  only for samples in exchangeable order, so both splits are permuted with
  a permutation seeded by ``order_seed`` (fixed in advance, never from the
  data) before any p-value, whatever order the indices came in; binomial
  and hb p-values do not depend on the order. A configuration is certified
  iff its adjusted p-value (``LTTResult.adjusted``) is <= delta.
  """
  xs, es = _as_risks(losses, eps)
  opt_idx, test_idx = _split(xs[0].shape[-1], split, seed, split_indices, order_seed)
  costs = np.asarray(costs, np.float64)
  cost_opt = costs[..., opt_idx].mean(-1) if costs.ndim == 3 else costs
  cost_all = costs.mean(-1) if costs.ndim == 3 else costs
  order, _ = pareto_order(cost_opt, _order_key(xs, es, opt_idx, delta, test, order_by))
  test_losses = {i: x[..., test_idx] for i, x in enumerate(xs)}
  pvals = config_pvalues(test_losses, dict(enumerate(es)), delta, test)
  adjusted = _adjust(pvals, order, multiple_testing)
  certified = adjusted <= delta
  chosen = None
  if certified.any():
    flat = np.flatnonzero(certified.ravel())
    chosen = tuple(int(i) for i in np.unravel_index(flat[np.argmin(cost_all.ravel()[flat])],
                                                     pvals.shape))
  return LTTResult(certified, chosen, pvals, order, int(test_idx.size), int(opt_idx.size),
                   adjusted, int(order_seed))
