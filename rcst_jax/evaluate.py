"""`rcst evaluate`: models and data from a config, the sweep engine, the outputs."""

from __future__ import annotations

import os

import jax

from rcst_jax import config_schema, engine, reporting, tables
from rcst_jax.data.sources import Sources, load_sources, run_transform
from rcst_jax.fileio import atomic_write_text
from rcst_jax.models.loading import Models, load_models, with_dtype


def evaluate_config(config, models: Models | None = None, sources: Sources | None = None,
                    progress: bool | None = None) -> dict:
  """The whole run from a config; returns {"paths", "result"} (process 0)."""
  config_schema.validate(config)  # before any model is loaded or pass is run
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
  paths = reporting.write_outputs(ev, result, int(config.gallery_size),
                                  bool(config.get("per_image", False)))
  if alt is not None:
    path = os.path.join(config.output_dir, "dtype_comparison.md")
    paths["dtype_comparison"] = atomic_write_text(path, tables.dtype_comparison(
        result["points"], alt["points"], config.dtype, other) + "\n")
  return {"paths": paths, "result": result}
