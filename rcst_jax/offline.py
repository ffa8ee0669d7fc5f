"""Algorithm 1 on a run's calibration images: the edge alone, plus what the run records.

`rcst calibrate` calls this with the edge model and only the server's
metadata (its patch geometry and weight digest, no weights); the sweep
engine calls it with its sharded batches. Both write the same artifact.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rcst_jax import conformal, spmd
from rcst_jax.checkpoints import Model, variables_digest
from rcst_jax.data import batches, normalize
from rcst_jax.data.sources import Sources, transform_record
from rcst_jax.geometry import Geometry


def probs_fn(model: Model, sharding=None):
  """Jitted softmax of the model's inference form (the one edge_step runs);
  ``sharding`` splits the batch: each device runs its own rows (rcst_jax.spmd)."""
  model = model.inference()
  mean, std = tuple(model.metadata["mean"]), tuple(model.metadata["std"])
  module = model.module

  def rows(variables, images):
    return jax.nn.softmax(module.apply(variables, normalize(images, mean, std))[0]
                          .astype(jnp.float32), -1)
  fn = jax.jit(spmd.per_device(rows, sharding))
  return lambda images: fn(model.variables, images)


def algorithm1(config, edge: Model, sources: Sources, transform, *, server_metadata: dict,
               geometry: Geometry, server_digest: str | None, sharding=None, skipped=None,
               progress: bool = True) -> conformal.Calibration:
  probs, labels = [], []
  fn = probs_fn(edge, sharding)
  for b in batches(sources.cal_source, sources.cal_indices, int(config.batch_size),
                   skipped=skipped, progress=progress, desc="calibration"):
    images = b.images if sharding is None else jax.device_put(b.images, sharding)
    probs.append(np.asarray(fn(images))[b.valid])
    labels.append(b.labels[b.valid])
  if not probs or not sum(len(p) for p in probs):
    raise ValueError("no usable calibration image (all were skipped as bad items)")
  return conformal.calibrate(
      np.concatenate(probs), np.concatenate(labels), config.alpha_crc, config.alpha_aps,
      edge_model=edge.metadata.get("timm_name"), server_model=server_metadata.get("timm_name"),
      dataset=sources.name, split=f"calibration:{len(sources.cal_indices)}",
      gradcam_layer=config.gradcam_layer, edge_digest=variables_digest(edge.variables),
      server_digest=server_digest,
      transform=transform_record(transform) if transform else None, geometry=geometry.to_dict())
