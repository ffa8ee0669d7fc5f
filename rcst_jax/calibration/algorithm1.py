"""Algorithm 1: the CRC edge threshold and the APS quantile, as a calibration artifact.

`calibrate` runs the rules of `stats.conformal` on edge softmax outputs;
`algorithm1` runs the edge over a run's calibration images first and records
what the run used (models, transform, Grad-CAM layer, geometry). `rcst
calibrate` calls it with the edge and only the server's metadata; the sweep
engine with its sharded batches. Both write the same artifact.

The sweep also keeps the softmax rows (`Softmax`): the certificate's fitting
split is a subset of the calibration images, so its rows are taken from them.
"""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from rcst_edge.onnx_edge import OnnxEdge
from rcst_edge.payload.geometry import Geometry
from rcst_jax.calibration.artifact import Calibration, CalibrationError, CalibrationWarning, check_B
from rcst_jax.core import spmd
from rcst_jax.data import batches
from rcst_jax.data.sources import Sources, UnreadableImagesError, transform_record
from rcst_jax.inference.edge import edge_outputs
from rcst_jax.models.checkpoints import Model, variables_digest
from rcst_jax.stats.conformal import (
  aps_q_hat,
  aps_scores,
  check_alpha,
  crc_lambda_hat,
  validate_calibration_inputs,
)


def calibrate(probs, labels, alpha_crc, alpha_aps, *, B: float = 1.0, strict: bool = False,
              **record) -> Calibration:
  """Algorithm 1 on edge softmax outputs: validates, then runs CRC and APS.

  If the CRC rule cannot be met (n < B/alpha - 1) the threshold is inf and a
  CalibrationWarning is issued; strict=True raises. `record`: the metadata
  fields of `Calibration` (models, data, transform, layer, geometry).
  """
  B = check_B(B)
  p, y = validate_calibration_inputs(probs, labels)
  a_crc = float(check_alpha(alpha_crc, "alpha_crc"))
  a_aps = float(check_alpha(alpha_aps, "alpha_aps"))
  p = jnp.asarray(p, jnp.float32)
  y = jnp.asarray(y, jnp.int32)
  n = int(p.shape[0])
  lam, valid = crc_lambda_hat(p.max(-1), jnp.argmax(p, -1) != y, a_crc, B)
  q = aps_q_hat(aps_scores(p, y), a_aps)
  if not bool(valid):
    msg = (f"CRC cannot control the risk at alpha_crc={a_crc} with n={n} calibration samples "
           f"(needs n >= B/alpha - 1 and no wrong sample with p_max == 1); "
           "lambda_hat = inf, the edge will accept nothing")
    if strict:
      raise CalibrationError(msg)
    warnings.warn(msg, CalibrationWarning, stacklevel=2)
  return Calibration(lambda_hat=float(lam), q_hat=float(q), alpha_crc=a_crc, alpha_aps=a_aps,
                     n=n, lambda_valid=bool(valid), B=B, **record)


@dataclasses.dataclass(frozen=True)
class Softmax:
  """The edge's softmax of a run's calibration images, one row per usable image.

  A row does not depend on the images batched with it, so the rows of a
  subset are these rows: the certificate's fitting split takes them here
  instead of running the edge again. ``indices``: each row's source index,
  None when bad items were skipped (the rows then line up with no index list).
  """
  probs: np.ndarray
  labels: np.ndarray
  indices: np.ndarray | None

  def take(self, indices) -> Softmax | None:
    """The rows of ``indices``, in that order; None if one of them has no row."""
    if self.indices is None:
      return None
    row = {int(i): r for r, i in enumerate(self.indices)}
    if any(int(i) not in row for i in indices):
      return None
    pick = np.asarray([row[int(i)] for i in indices], np.int64)
    return Softmax(self.probs[pick], self.labels[pick], np.asarray(indices))


def edge_softmax(config, edge, sources: Sources, *, grid: int = 14, sharding=None,
                 skipped=None, progress: bool = True) -> Softmax:
  """The edge's softmax of every usable calibration image of ``sources``, as
  the edge step computes it when it decides (`edge.edge_outputs`, a Flax
  model or an exported ONNX edge): calibration scores are decision scores."""
  probs, labels = [], []

  def run(b):
    images = b.images if sharding is None else jax.device_put(b.images, sharding)
    out = edge_outputs(edge, images, np.inf, np.inf, layer=config.gradcam_layer, grid=grid,
                       sharding=sharding)
    return np.asarray(out["probs"])[b.valid], b.labels[b.valid]
  for p, lab in spmd.host_map(
      run, batches(sources.cal_source, sources.cal_indices, int(config.batch_size),
                   skipped=skipped, progress=progress, desc="calibration"),
      spmd.host_concurrency(int(config.get("host_concurrency", 0)), sharding)):
    probs.append(p)
    labels.append(lab)
  if not probs or not sum(len(p) for p in probs):
    raise UnreadableImagesError("no usable calibration image (all were skipped as bad items: "
                                f"{dict(skipped or {})})")
  probs, labels = np.concatenate(probs), np.concatenate(labels)
  # Batches keep the order of the indices; with no item skipped, row i is index i.
  whole = len(probs) == len(sources.cal_indices)
  return Softmax(probs, labels, np.asarray(sources.cal_indices) if whole else None)


def algorithm1(config, edge: Model, sources: Sources, transform, *, server_metadata: dict,
               geometry: Geometry, server_digest: str | None, sharding=None, skipped=None,
               progress: bool = True, with_softmax: bool = False):
  """Algorithm 1 on the calibration images of ``sources``: the edge's softmax,
  then `calibrate`. Returns the Calibration, or (Calibration, `Softmax`) with
  ``with_softmax`` (the rows the certificate's fitting split reuses)."""
  soft = edge_softmax(config, edge, sources, grid=geometry.grid, sharding=sharding,
                      skipped=skipped, progress=progress)
  onnx = isinstance(edge, OnnxEdge)
  weights = edge.meta["edge_digest"] if onnx else variables_digest(edge.variables)
  meta = {"timm_name": None} if onnx else edge.metadata
  cal = calibrate(
      soft.probs, soft.labels, config.alpha_crc, config.alpha_aps,
      edge_model=meta.get("timm_name"), server_model=server_metadata.get("timm_name"),
      dataset=sources.name, split=f"calibration:{len(sources.cal_indices)}",
      gradcam_layer=config.gradcam_layer, edge_digest=weights,
      edge_onnx_digest=edge.digest if onnx else None,
      server_digest=server_digest,
      transform=transform_record(transform) if transform else None, geometry=geometry.to_dict())
  return (cal, soft) if with_softmax else cal
