"""What a sweep keeps on disk, and the identity that keys it.

A run's finished work lives under ``<output_dir>/cache/<fingerprint>/``: the
calibration artifact, one npz per chunk of test images, and the Certified
row per certified point (``certified_<id>/``). The fingerprint hashes the
whole resolved config except `NOT_RESULTS` and `certify`, each model's
weights and preprocessing metadata, the data's identity and `CACHE_VERSION`,
so a stale cache is never reused. Calibration outcomes for the certificate
are keyed apart (`outcome_id`), by what they depend on only, so a new
certificate request reruns no model.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings

import numpy as np

from rcst_jax.calibration.artifact import Calibration, CalibrationError
from rcst_jax.fileio import atomic_savez, plain
from rcst_jax.models.checkpoints import variables_digest

CACHE_VERSION = 4
# Config keys that cannot change any cached number: where outputs go, how
# much is printed or drawn, how models are found (they are identified by
# content below), how many devices share the work. Everything else is hashed.
NOT_RESULTS = ("output_dir", "progress", "gallery_size", "per_image", "models_dir", "edge",
               "server", "baseline_edge", "devices", "multihost", "compare_dtype")
# Keyed apart: changing the certificate request never invalidates chunks.
CERTIFY_KEY = "certify"
MODEL_META = ("timm_name", "num_classes", "input_size", "crop_pct", "interpolation", "mean",
              "std", "arch_overrides")
CHUNK_KEYS = ("labels", "keys", "offloaded", "kept", "server_pred", "pred", "edge_pred",
              "edge_p_max", "edge_accept", "edge_aps_size", "edge_aps_cover", "base_pred",
              "base_p_max", "base_accept")
POINT_KEYS = ("offloaded", "kept", "server_pred", "pred")  # [points, n] arrays
# What the certification outcomes depend on (not the test itself).
OUTCOME_KEYS = ("data", "alpha_aps", "gradcam_layer", "tau_grid", "dtype", "matmul_precision",
                "batch_size", "server_batch", "server_min_batch", "buckets")


def _digest(ident) -> str:
  return hashlib.sha1(json.dumps(plain(ident), sort_keys=True).encode()).hexdigest()[:16]


def fingerprint(config, models, sources) -> str:
  """The identity of a sweep's results (see the module docstring)."""
  cfg = {k: v for k, v in plain(config).items() if k not in NOT_RESULTS + (CERTIFY_KEY,)}
  return _digest({"version": CACHE_VERSION, "config": cfg, "data": sources.identity(),
                  "models": {name: {"digest": variables_digest(m.variables),
                                    "meta": {k: m.metadata.get(k) for k in MODEL_META}}
                             for name, m in models.named().items()}})


def outcome_id(config, models, sources) -> str:
  """The identity of the certification's calibration outcomes."""
  cfg = plain(config)
  return _digest({"version": CACHE_VERSION, "config": {k: cfg.get(k) for k in OUTCOME_KEYS},
                  "split": [cfg["certify"]["split"], cfg["certify"]["seed"]],
                  "data": sources.identity(),
                  "models": [variables_digest(m.variables) for m in (models.edge, models.server)]})


def certified_id(certificate: dict) -> str:
  """The certified point's identity: its Certified row is cached under it."""
  return _digest({k: certificate[k] for k in ("certified", "lambda_hat", "tau", "q_hat")})


class ChunkStore:
  """The files of one fingerprint's cache directory. A file that cannot be
  read back whole is reported, removed and treated as missing (recomputed)."""

  def __init__(self, out_dir: str, fp: str):
    self.root = os.path.join(out_dir, "cache")
    self.dir = os.path.join(self.root, fp)
    os.makedirs(self.dir, exist_ok=True)

  def chunk_path(self, c: int, certified: str | None = None) -> str:
    sub = (f"certified_{certified}",) if certified else ()
    return os.path.join(self.dir, *sub, f"chunk_{c:05d}.npz")

  def load_chunk(self, c: int, points: int, certified: str | None = None) -> dict | None:
    """A finished chunk's arrays (the sweep's, or a certified point's one row)."""
    keys = ("keys",) + POINT_KEYS if certified else CHUNK_KEYS
    return _load(self.chunk_path(c, certified), keys, points)

  def save_chunk(self, c: int, arrays: dict, certified: str | None = None) -> None:
    path = self.chunk_path(c, certified)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_savez(path, **arrays)

  @property
  def calibration_path(self) -> str:
    return os.path.join(self.dir, "calibration.json")

  def load_calibration(self) -> Calibration | None:
    path = self.calibration_path
    if not os.path.exists(path):
      return None
    try:
      return Calibration.from_json(path)
    except (CalibrationError, OSError, UnicodeDecodeError) as e:
      warnings.warn(f"cached calibration {path} is unreadable ({e}); recomputing")
      return None

  def outcomes_path(self, ident: str) -> str:
    return os.path.join(self.root, "outcomes", f"{ident}.npz")

  def load_outcomes(self, ident: str) -> dict | None:
    path = self.outcomes_path(ident)
    if not os.path.exists(path):
      return None
    try:
      with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
    except (OSError, ValueError, KeyError) as e:
      warnings.warn(f"cached certification outcomes {path} are unreadable ({e}); recomputing")
      return None

  def save_outcomes(self, ident: str, arrays: dict) -> None:
    path = self.outcomes_path(ident)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_savez(path, **arrays)


def _load(path: str, keys, points: int) -> dict | None:
  if not os.path.exists(path):
    return None
  try:
    with np.load(path, allow_pickle=False) as z:
      d = {k: z[k] for k in keys}
    n = len(d["keys"])
    if d["pred"].shape != (points, n) or d["kept"].shape != (points, n):
      raise ValueError(f"shapes {d['pred'].shape} for {points} points x {n} images")
    return d
  except Exception as e:  # zip CRC, truncation, missing keys: all mean recompute
    warnings.warn(f"cached chunk {path} is corrupt ({type(e).__name__}: {e}); recomputing")
    os.unlink(path)
    return None
