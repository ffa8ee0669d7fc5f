"""`rcst calibrate` from a config: the calibration file alone, or checked against it.

Algorithm 1 needs only the edge (and the server's metadata); the
whole-system certificate, when asked for, also runs the server, through the
sweep engine so that its passes are cached with the sweep's. `--verify`
recomputes a file from the request its certificate records; `--reseal`
vouches for a file edited on purpose (a new seal, and a record of what changed).
"""

from __future__ import annotations

import dataclasses
import datetime
import os

from rcst_edge import seal as seal_lib
from rcst_edge.errors import OutputRefusedError
from rcst_edge.payload.geometry import Geometry
from rcst_jax.calibration import algorithm1, certificate
from rcst_jax.calibration.artifact import Calibration, CalibrationError, read_strict_json
from rcst_jax.core.fileio import OutputDir
from rcst_jax.data.sources import load_sources, run_transform
from rcst_jax.models.checkpoints import load_model, module_from_metadata, read_metadata
from rcst_jax.models.loading import load_models, load_onnx_edge
from rcst_jax.settings import schema
from rcst_jax.sweep import engine


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
  """An explicit --out replaces only an rcst calibration file (sealed or not: an older or
  edited one is still ours to replace), and only with --overwrite."""
  if not os.path.lexists(path):
    return
  try:
    Calibration.unsealed(read_strict_json(path))
  except (CalibrationError, OSError, UnicodeDecodeError) as e:
    raise OutputRefusedError(f"refusing to replace {path}: not an rcst calibration file "
                             f"({str(e).splitlines()[0][:120]})") from None
  if os.path.islink(path) or not overwrite:
    raise OutputRefusedError(f"{path} exists; pass --overwrite to replace it")


def _calibrate(config) -> Calibration:
  """Algorithm 1 on the config's calibration images, with the certificate
  (by the sweep engine, which caches its passes) when it is asked for."""
  if config.certify.enabled:
    models = load_models(config)
    transform = run_transform(models.edge.metadata, {"server": models.server.metadata})
    sources = load_sources(config, transform)
    sources.check_labels({"edge": models.edge.metadata, "server": models.server.metadata})
    return engine.Sweep(config, models, sources, config.output_dir, transform,
                        progress=config.progress).calibrate()
  # Algorithm 1 needs the edge; of the server only its patch geometry and digest.
  edge = load_model(os.path.join(config.models_dir, config.edge))
  server_meta = read_metadata(os.path.join(config.models_dir, config.server))
  module = module_from_metadata(server_meta)
  transform = run_transform(edge.metadata, {"server": server_meta})
  sources = load_sources(config, transform)
  sources.check_labels({"edge": edge.metadata, "server": server_meta})
  deciding = load_onnx_edge(config.edge_onnx, edge, config.gradcam_layer) \
      if config.get("edge_onnx") else edge
  return algorithm1.algorithm1(
      config, deciding, sources, transform, server_metadata=server_meta,
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


def reseal_calibration(path: str) -> dict:
  """`rcst calibrate --reseal FILE`: seals the file anew as it is, after every load-time
  check but the seal, and records which fields differ from the old seal (None when it
  had none) with the UTC time in its `resealed` history. A file that matches its seal
  is left untouched. The certificate keeps its own digest: an edited certificate stays
  refused (it is a claim about what Learn-then-Test found, not a setting)."""
  if os.path.islink(path) or not os.path.isfile(path):
    raise OutputRefusedError(f"refusing to reseal {path}: not a regular file (a symbolic link, "
                             "a directory or missing)")
  d = read_strict_json(path)
  try:
    cal = Calibration.unsealed(d)
  except CalibrationError as e:
    raise CalibrationError(f"{path}: refusing to reseal a malformed calibration file: {e}") \
        from e
  diffs = seal_lib.changed(d, d.get(seal_lib.KEY))
  if diffs == []:
    return {"calibration": path, "resealed": False, "fields": []}
  fields = None if diffs is None else seal_lib.names(diffs)
  at = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
  record = {"at": at, "fields": fields}
  dataclasses.replace(cal, resealed=[*(cal.resealed or []), record]).to_json(path)
  return {"calibration": path, "resealed": True, **record}
