"""A run from a config: `rcst evaluate` (the sweep and its outputs) and `rcst calibrate`.

Models and data come from the config; the sweep engine does the work; the
report writes what it found. Calibration alone needs only the edge (and the
server's metadata), unless the whole-system certificate is asked for.
"""

from __future__ import annotations

import os

import jax

from rcst_jax.calibration import algorithm1, certificate
from rcst_jax.calibration.artifact import Calibration, CalibrationError
from rcst_jax.core.errors import ConfigError, OutputRefusedError
from rcst_jax.core.fileio import OutputDir, atomic_write_text
from rcst_jax.data.sources import Sources, load_sources, run_transform
from rcst_jax.models.checkpoints import load_model, module_from_metadata, read_metadata
from rcst_jax.models.loading import Models, load_models, with_dtype
from rcst_jax.payload.geometry import Geometry
from rcst_jax.report import outputs, tables
from rcst_jax.settings import schema
from rcst_jax.sweep import engine


def check_labels(sources: Sources, named_metadata: dict) -> None:
  """Every image's label must be a class of every model: refused before any model runs."""
  bound = sources.label_bound()
  for name, meta in named_metadata.items():
    n = int(meta["num_classes"])
    if bound > n:
      raise ConfigError(f"the data ({sources.name}) has class indices up to {bound - 1}, but the "
                        f"{name} model has {n} classes; use a label map onto its classes")


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
  check_labels(sources, {name: m.metadata for name, m in models.named().items()})
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
                                bool(config.get("per_image", False)), claimed)
  if alt is not None:
    path = os.path.join(config.output_dir, "dtype_comparison.md")
    paths["dtype_comparison"] = claimed.record(atomic_write_text(path, tables.dtype_comparison(
        result["points"], alt["points"], config.dtype, other) + "\n"))
  return {"paths": paths, "result": result}


def calibrate_config(config, out: str | None = None, overwrite: bool = False
                     ) -> tuple[Calibration, str]:
  """Algorithm 1 on the config's calibration images (and the certificate when
  config.certify.enabled, which needs the server's answers too), written to
  ``out`` (default <output_dir>/calibration.json); returns (artifact, path)."""
  schema.validate(config)
  if out is None or config.certify.enabled:  # the cache lives in output_dir
    OutputDir(config.output_dir).claim(["calibration.json"] if out is None else [], overwrite)
  if out is not None:
    check_calibration_out(out, overwrite)
  cal = _calibrate(config)
  path = out or os.path.join(config.output_dir, "calibration.json")
  cal.to_json(path)
  if out is None:
    OutputDir(config.output_dir).record(path)
  return cal, path


def check_calibration_out(path: str, overwrite: bool) -> None:
  """An explicit --out replaces only an rcst calibration file, and only with --overwrite."""
  if not os.path.lexists(path):
    return
  try:
    Calibration.from_json(path)
  except (CalibrationError, OSError, UnicodeDecodeError) as e:
    raise OutputRefusedError(f"refusing to replace {path}: not an rcst calibration file "
                             f"({str(e).splitlines()[0][:120]})") from None
  if os.path.islink(path) or not overwrite:
    raise OutputRefusedError(f"{path} exists; pass --overwrite to replace it")


def _calibrate(config) -> Calibration:
  if config.certify.enabled:
    models = load_models(config)
    transform = run_transform(models.edge.metadata, {"server": models.server.metadata})
    sources = load_sources(config, transform)
    check_labels(sources, {"edge": models.edge.metadata, "server": models.server.metadata})
    return engine.Evaluation(config, models, sources, config.output_dir, transform,
                             progress=config.progress).calibrate()
  # Algorithm 1 needs the edge; of the server only its patch geometry and digest.
  edge = load_model(os.path.join(config.models_dir, config.edge))
  server_meta = read_metadata(os.path.join(config.models_dir, config.server))
  module = module_from_metadata(server_meta)
  transform = run_transform(edge.metadata, {"server": server_meta})
  sources = load_sources(config, transform)
  check_labels(sources, {"edge": edge.metadata, "server": server_meta})
  return algorithm1.algorithm1(
      config, edge, sources, transform, server_metadata=server_meta,
      geometry=Geometry(int(module.img_size), int(module.patch_size)),
      server_digest=server_meta.get("variables_digest"), progress=config.progress)


# The certificate fields that say what was asked for, and the config keys they came from.
_REQUEST = {"epsilon": "certify.epsilon", "delta": "certify.delta", "test": "certify.test",
            "risks": "certify.risks", "lambda_grid": "certify.lambda_grid",
            "split": "certify.split", "split_seed": "certify.seed", "cost": "certify.cost",
            "multiple_testing": "certify.multiple_testing", "tau_grid": "certify.tau_grid"}


def verify_calibration(config, path: str) -> list[str]:
  """Recomputes the calibration file at ``path`` from the config's data and
  models (the request its certificate records), and lists every field that
  differs (empty: verified)."""
  recorded = Calibration.from_json(path)
  config = config.copy_and_resolve_references()
  cert = recorded.certificate
  with config.unlocked():
    config.certify.enabled = cert is not None
    for field, key in (_REQUEST.items() if cert else ()):
      if field in cert:
        section, _, name = key.rpartition(".")
        target = config[section] if section else config
        value = cert[field]
        target[name] = tuple(value) if isinstance(value, list) else value
  schema.validate(config)
  fresh = _calibrate(config)
  diffs = [f"{k}: recorded {getattr(recorded, k)!r}, recomputed {getattr(fresh, k)!r}"
           for k in ("lambda_hat", "q_hat", "alpha_crc", "alpha_aps", "n", "lambda_valid",
                     "edge_digest", "server_digest", "transform", "geometry", "gradcam_layer")
           if getattr(recorded, k) != getattr(fresh, k)]
  if cert is not None:
    diffs += [f"certificate.{d}" for d in certificate.verify(cert, fresh.certificate)]
  return diffs
