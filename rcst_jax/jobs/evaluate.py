"""`rcst evaluate` from a config: the sweep and everything it writes.

Models and data come from the config; the sweep engine (sweep/engine.py)
does the work; the report writes what it found. `rcst calibrate`, the
calibration file alone, is jobs/calibrate.py.
"""

from __future__ import annotations

import os

import jax

from rcst_jax.core.fileio import OutputDir, atomic_write_text
from rcst_jax.data.sources import Sources, load_sources, run_transform
from rcst_jax.models.loading import Models, load_models, with_dtype
from rcst_jax.report import outputs, tables
from rcst_jax.settings import schema
from rcst_jax.sweep import engine


def evaluate_config(config, models: Models | None = None, sources: Sources | None = None,
                    progress: bool | None = None, overwrite: bool = False) -> dict:
  """The whole run from a config; returns {"paths", "result"} (process 0).
  ``overwrite``: replace outputs rcst wrote even if they changed since (never
  files rcst did not write)."""
  schema.validate(config)  # before any model is loaded or pass is run
  if config.get("multihost", False):
    jax.distributed.initialize()
  claimed = None
  if jax.process_index() == 0:
    claimed = OutputDir(config.output_dir).claim(outputs.OUTPUT_NAMES, overwrite)
  models = with_dtype(models, config.dtype) if models else load_models(config)
  transform = run_transform(models.edge.metadata, {"server": models.server.metadata,
                                                   "baseline_edge": models.baseline_edge.metadata})
  sources = sources or load_sources(config, transform)
  sources.check_labels({name: m.metadata for name, m in models.named().items()})
  progress = config.progress if progress is None else progress
  sweep = engine.Sweep(config, models, sources, config.output_dir, transform, progress)
  result = sweep.run()
  other = config.get("compare_dtype")
  alt = None
  if other and other != config.dtype:
    # The same sweep in the other dtype (its own cache): the accuracy change
    # is measured, not assumed.
    alt_config = config.copy_and_resolve_references()
    with alt_config.unlocked():
      alt_config.dtype = other
    alt = engine.Sweep(alt_config, with_dtype(models, other), sources, config.output_dir,
                       transform, progress).run()
  if jax.process_index() != 0:
    return {}
  paths = outputs.write_outputs(sweep, result, int(config.gallery_size),
                                bool(config.get("per_image", False)), claimed)
  if alt is not None:
    path = os.path.join(config.output_dir, "dtype_comparison.md")
    paths["dtype_comparison"] = claimed.record(atomic_write_text(path, tables.dtype_comparison(
        result["points"], alt["points"], config.dtype, other) + "\n"))
  return {"paths": paths, "result": result}
