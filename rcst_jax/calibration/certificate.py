"""The whole-system certificate of a run: Learn-then-Test on calibration outcomes.

The engine supplies, for every calibration image, what Algorithm 2 would do
at every tau of the grid (with the APS q_hat fitted on the first split only,
so the second split's losses stay exchangeable with test images): the edge's
prediction and p_max, the server's prediction on the kept patches and on the
full image. A lambda grid only changes acceptance, so it costs no server work.
`certify` turns that into losses, runs Pareto Testing (stats/ltt.py)
and returns the certificate stored in the calibration artifact.
"""

from __future__ import annotations

import math

import numpy as np

from rcst_jax.calibration.artifact import decode_float, encode_float
from rcst_jax.inference import payload
from rcst_jax.stats import ltt


def losses(config, out: dict, lambdas: np.ndarray):
  """{risk: [L, T, n] in [0, 1]} and {risk: epsilon on that scale}."""
  c = config.certify
  args = (out["labels"], out["edge_pred"], out["p_max"])
  xs, eps = {}, {}
  for risk in c.risks:
    if risk == "accuracy_drop":
      x = ltt.accuracy_drop(*args, out["server_only_pred"], out["server_pred"], lambdas)
      xs[risk], eps[risk] = ltt.rescale_accuracy_drop(x, c.epsilon)
    elif risk == "degradation":
      xs[risk] = ltt.degradation(*args, out["server_only_pred"], out["server_pred"], lambdas)
      eps[risk] = c.epsilon
    elif risk == "system_error":
      xs[risk] = ltt.system_error(*args, out["server_pred"], lambdas)
      eps[risk] = c.epsilon
    elif risk == "edge_risk":  # the paper's Eq. 6, kept at its own level alpha_crc
      xs[risk] = ltt.edge_risk(*args, lambdas, len(out["server_pred"]))
      eps[risk] = float(config.alpha_crc)
  return xs, eps


def byte_cost(p_max, kept, lambdas, geometry, per_image: bool = False):
  """Exact payload bytes over raw image bytes of each configuration, the byte
  cost Table 1 reports (sweep/metrics.py): mean [L, T] (or [L, T, n])."""
  nbytes = payload.payload_bytes(np.asarray(kept), geometry).astype(np.float64)
  return ltt.offload_cost(p_max, nbytes / geometry.raw_bytes, lambdas, per_image)


def certify_run(config, out: dict, taus, geometry, q_hat_fit: float,
                n_fit: int) -> tuple[dict, dict]:
  """(certificate for the artifact, grid arrays for the figure).

  `out` holds the calibration outcomes with the fitting split first (n_fit
  images), then the testing split.
  """
  c = config.certify
  lambdas = np.asarray(c.lambda_grid, np.float64)
  xs, eps = losses(config, out, lambdas)
  cost_kind = c.get("cost", "patches")
  if cost_kind == "bytes":
    cost = byte_cost(out["p_max"], out["kept"], lambdas, geometry, per_image=True)
  else:
    cost = ltt.patch_cost(out["p_max"], out["kept"], lambdas, geometry.num_patches,
                              per_image=True)
  n = len(out["labels"])
  mt = c.get("multiple_testing", "pareto")
  res = ltt.pareto_testing(xs, cost, eps, c.delta, test=c.test, multiple_testing=mt,
                               split_indices=(np.arange(n_fit), np.arange(n_fit, n)))
  head = xs[c.risks[0]].mean(-1)  # for the figure: the first risk on its own scale
  if c.risks[0] == "accuracy_drop":
    head = 2 * head - 1
  grid = {"cost": cost.mean(-1), "risk": head, "certified": res.certified,
          "lambda_grid": lambdas, "tau_grid": np.asarray(taus, np.float64)}
  cert = {"risks": list(c.risks), "epsilon": float(c.epsilon), "delta": float(c.delta),
          "test": c.test, "n_fit": int(n_fit), "n_test": int(res.n_test),
          "grid_size": int(res.certified.size), "certified_count": int(res.certified.sum()),
          "q_hat": encode_float(q_hat_fit), "split_seed": int(c.seed), "cost": cost_kind,
          "multiple_testing": mt}
  if res.chosen is None:  # nothing certified: server-only (accept nothing, keep every patch)
    cert.update(certified=False, lambda_hat=encode_float(math.inf), tau=0.0, p_value=None,
                cost_calibration=1.0)
  else:
    l, t = res.chosen
    cert.update(certified=True, lambda_hat=encode_float(float(lambdas[l])), tau=float(taus[t]),
                p_value=float(res.pvalues[l, t]), cost_calibration=float(cost[l, t].mean()))
    grid["chosen"] = (float(cost[l, t].mean()), float(head[l, t]))
  return cert, grid



_COST_WORD = {"patches": "patch", "bytes": "byte"}


def describe(cert: dict) -> str:
  """The certificate in words (printed under Table 1)."""
  risks = ", ".join(cert["risks"])
  if not cert["certified"]:
    return (f"Certified row: no (lambda, tau) was certified for {risks} <= {cert['epsilon']:g} "
            f"at delta = {cert['delta']:g} ({cert['test']} test, {cert['n_test']} testing "
            f"images); the run falls back to server-only.")
  mt = {"pareto": "Pareto Testing", "bonferroni": "Bonferroni"}[
      cert.get("multiple_testing", "pareto")]
  return (f"Certified row: (lambda, tau) = ({decode_float(cert['lambda_hat'], 'lambda_hat'):g}, {cert['tau']:g}), "
          f"chosen before the test set was seen: with probability >= {1 - cert['delta']:g} "
          f"over calibration draws, {risks} <= {cert['epsilon']:g} (Learn-then-Test, {mt}, "
          f"lowest {_COST_WORD[cert.get('cost', 'patches')]} cost, {cert['test']} p-values, "
          f"{cert['n_fit']} fitting + {cert['n_test']} testing calibration images; "
          f"{cert['certified_count']} of {cert['grid_size']} configurations certified, "
          f"p = {cert['p_value']:.3g}).")
