"""A run from a config: `rcst evaluate` (the sweep and its outputs) and `rcst calibrate`.

Models and data come from the config; the sweep engine does the work; the
report writes what it found. Calibration alone needs only the edge (and the
server's metadata), unless the whole-system certificate is asked for.
"""

from __future__ import annotations

import os

import jax

from rcst_jax.calibration import algorithm1
from rcst_jax.calibration.artifact import Calibration
from rcst_jax.config import schema
from rcst_jax.data.sources import Sources, load_sources, run_transform
from rcst_jax.fileio import atomic_write_text
from rcst_jax.geometry import Geometry
from rcst_jax.models.checkpoints import load_model, module_from_metadata, read_metadata
from rcst_jax.models.loading import Models, load_models, with_dtype
from rcst_jax.report import outputs, tables
from rcst_jax.sweep import engine


def evaluate_config(config, models: Models | None = None, sources: Sources | None = None,
                    progress: bool | None = None) -> dict:
  """The whole run from a config; returns {"paths", "result"} (process 0)."""
  schema.validate(config)  # before any model is loaded or pass is run
  if config.get("multihost", False):
    jax.distributed.initialize()
  models = with_dtype(models, config.dtype) if models else load_models(config)
  transform = run_transform(models.edge.metadata, {"server": models.server.metadata,
                                                   "baseline_edge": models.baseline_edge.metadata})
  sources = sources or load_sources(config, transform)
  progress = config.progress if progress is None else progress
  ev = engine.Evaluation(config, models, sources, config.output_dir, transform, progress)
  result = ev.run()
  other = config.get("compare_dtype")
  alt = None
  if other and other != config.dtype:
    # The same sweep in the other dtype (its own cache): the accuracy change
    # is measured, not assumed.
    alt_config = config.copy_and_resolve_references()
    with alt_config.unlocked():
      alt_config.dtype = other
    alt = engine.Evaluation(alt_config, with_dtype(models, other), sources, config.output_dir,
                            transform, progress).run()
  if jax.process_index() != 0:
    return {}
  paths = outputs.write_outputs(ev, result, int(config.gallery_size),
                                  bool(config.get("per_image", False)))
  if alt is not None:
    path = os.path.join(config.output_dir, "dtype_comparison.md")
    paths["dtype_comparison"] = atomic_write_text(path, tables.dtype_comparison(
        result["points"], alt["points"], config.dtype, other) + "\n")
  return {"paths": paths, "result": result}


def calibrate_config(config) -> Calibration:
  """Algorithm 1 on the config's calibration images (and the certificate when
  config.certify.enabled, which needs the server's answers too)."""
  schema.validate(config)
  if config.certify.enabled:
    models = load_models(config)
    transform = run_transform(models.edge.metadata, {"server": models.server.metadata})
    return engine.Evaluation(config, models, load_sources(config, transform),
                             config.output_dir, transform, progress=config.progress).calibrate()
  # Algorithm 1 needs the edge; of the server only its patch geometry and digest.
  edge = load_model(os.path.join(config.models_dir, config.edge))
  server_meta = read_metadata(os.path.join(config.models_dir, config.server))
  module = module_from_metadata(server_meta)
  transform = run_transform(edge.metadata, {"server": server_meta})
  return algorithm1.algorithm1(
      config, edge, load_sources(config, transform), transform, server_metadata=server_meta,
      geometry=Geometry(int(module.img_size), int(module.patch_size)),
      server_digest=server_meta.get("variables_digest"), progress=config.progress)
