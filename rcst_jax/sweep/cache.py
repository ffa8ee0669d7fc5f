"""What a sweep keeps on disk, the identity that keys it, and the manifest that vouches for it.

A run's finished work lives under ``<output_dir>/cache/<fingerprint>/``: the
calibration artifact, one npz per chunk of test images, and the Certified
row per certified point (``certified_<id>/``, with the certified
calibration it was run with). The fingerprint hashes the whole resolved
config except `NOT_RESULTS` and `certify`, each model's weights and
preprocessing metadata, the data sources' identity and `CACHE_VERSION`.
What the data *hold* is checked per file: every cached file has an entry in
the directory's `Manifest` with the sha256 of its bytes, the digest of the
input images it was computed from (data.identity) and the calibration it
used. A file is reused only when all three match; otherwise it is reported
(when its bytes were edited or damaged) and recomputed. Calibration
outcomes for the certificate are keyed apart (`outcome_id`), by what they
depend on only, so a new certificate request reruns no model.

A cache never follows a symbolic link: a link at the cache directory, a fingerprint
or outcomes directory, or any file the cache reads or writes (chunk, calibration,
manifest, lock, file digests) is refused with a CacheLinkError before anything is
read or written, so rcst writes nothing outside the output directory's cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import warnings

import numpy as np

from rcst_edge.errors import OutputRefusedError
from rcst_jax.calibration import certificate
from rcst_jax.calibration.artifact import Calibration, CalibrationError, CalibrationSealError
from rcst_jax.core.fileio import atomic_write_bytes, plain
from rcst_jax.models.checkpoints import variables_digest

CACHE_VERSION = 7  # 7: Algorithm 1 scores with the edge step (edge.edge_outputs)
# Config keys that cannot change any cached number: where outputs go, how
# much is printed or drawn, how models are found (they are identified by
# content below), how many devices share the work. Everything else is hashed.
NOT_RESULTS = ("output_dir", "progress", "gallery_size", "per_image", "models_dir", "edge",
               "server", "baseline_edge", "devices", "multihost", "compare_dtype",
               "host_concurrency", "edge_onnx")  # an ONNX edge counts by its digest
# Keyed apart: changing the certificate request never invalidates chunks.
CERTIFY_KEY = "certify"
MODEL_META = ("timm_name", "num_classes", "input_size", "crop_pct", "interpolation", "mean",
              "std", "arch_overrides")
POINT_KEYS = ("offloaded", "kept", "server_pred", "pred")  # [points, n] arrays
CODEC_KEYS = ("codec_server_pred", "codec_pred", "codec_bytes")  # [codecs, points, n]
CHUNK_KEYS = ("labels", "keys") + POINT_KEYS + CODEC_KEYS + (
    "edge_pred", "edge_p_max", "edge_accept", "edge_aps_size", "edge_aps_cover", "base_pred",
    "base_p_max", "base_accept")


class CacheLinkError(OutputRefusedError):
  """A path in a cache is a symbolic link: the cache would read or write outside itself."""


def no_link(path: str, root: str) -> str:
  """``path``, once neither it nor any directory between ``root`` (included) and it is a
  symbolic link; CacheLinkError naming the link otherwise."""
  root = os.path.abspath(root)
  rel = os.path.relpath(os.path.abspath(path), os.path.dirname(root))
  here = os.path.dirname(root)
  for part in rel.split(os.sep):
    here = os.path.join(here, part)
    if os.path.islink(here):
      raise CacheLinkError(
          f"refusing to use the cache: {here} is a symbolic link (to "
          f"{os.readlink(here)}); rcst writes its cache only inside {root}. Remove the link, "
          "or set output_dir where the cache should live")
  return path


def point_rows(arrays: dict, points: slice) -> dict:
  """The POINT_KEYS and CODEC_KEYS arrays of ``arrays`` at a slice of its points."""
  return {**{k: arrays[k][points] for k in POINT_KEYS},
          **{k: arrays[k][:, points] for k in CODEC_KEYS}}


# What the certification outcomes depend on (not the test itself).
OUTCOME_KEYS = ("data", "alpha_aps", "gradcam_layer", "dtype", "matmul_precision",
                "batch_size", "server_batch", "server_min_batch", "server_token_budget",
                "buckets")


def _digest(ident) -> str:
  return hashlib.sha1(json.dumps(plain(ident), sort_keys=True).encode()).hexdigest()[:16]


def sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def fingerprint(config, models, sources) -> str:
  """The identity of a sweep's results (see the module docstring)."""
  cfg = {k: v for k, v in plain(config).items() if k not in NOT_RESULTS + (CERTIFY_KEY,)}
  return _digest({"version": CACHE_VERSION, "config": cfg, "data": sources.identity(),
                  "models": {name: {"digest": variables_digest(m.variables),
                                    "meta": {k: m.metadata.get(k) for k in MODEL_META}}
                             for name, m in models.named().items()},
                  **_deployed(models)})


def _deployed(models) -> dict:
  """The exported edge that decides, by its file's digest (nothing without one)."""
  edge = getattr(models, "deployed_edge", None)
  return {} if edge is None else {"deployed_edge": edge.digest}


def outcome_id(config, models, sources, cal_inputs: str) -> str:
  """The identity of the certification's calibration outcomes (``cal_inputs``:
  the digest of the calibration images' content)."""
  cfg = plain(config)
  return _digest({"version": CACHE_VERSION, "config": {k: cfg.get(k) for k in OUTCOME_KEYS},
                  "split": [cfg["certify"]["split"], cfg["certify"]["seed"]],
                  "taus": list(certificate.tau_grid(config)),
                  "codecs": list(certificate.codec_grid(config)),
                  "data": sources.identity(), "inputs": cal_inputs,
                  "models": [variables_digest(m.variables) for m in (models.edge, models.server)],
                  **_deployed(models)})


def certified_id(certificate: dict) -> str:
  """The certified point's identity: its Certified row is cached under it."""
  return _digest({k: certificate[k] for k in ("certified", "lambda_hat", "tau", "codec", "q_hat")})


class Manifest:
  """``manifest.json`` of one cache directory: file name -> {"sha256", and what
  it was computed from}. Each update re-reads the file under an exclusive
  lock and replaces it atomically, so concurrent runs never lose an entry."""

  def __init__(self, directory: str, root: str | None = None):
    self.root = root or directory  # the cache directory: no link from there down
    self.path = os.path.join(directory, "manifest.json")
    self.lock_path = os.path.join(directory, ".manifest.lock")

  def read(self) -> dict:
    no_link(self.path, self.root)
    try:
      with open(self.path, encoding="utf-8") as f:
        entries = json.load(f)
      return entries if isinstance(entries, dict) else {}
    except FileNotFoundError:
      return {}
    except (OSError, ValueError) as e:
      warnings.warn(f"cache manifest {self.path} is unreadable ({e}); its files are recomputed")
      return {}

  @contextlib.contextmanager
  def _locked(self):
    with open(no_link(self.lock_path, self.root), "a") as lock:
      try:
        fcntl.flock(lock, fcntl.LOCK_EX)
      except OSError:  # a filesystem without locks: still atomic, last writer wins
        pass
      yield

  def record(self, name: str, data: bytes, **inputs) -> None:
    with self._locked():
      entries = self.read()
      entries[name] = {"sha256": sha256(data), **inputs}
      text = json.dumps(entries, indent=1, sort_keys=True) + "\n"
      atomic_write_bytes(no_link(self.path, self.root), text.encode())

  def matches(self, name: str, data: bytes, **inputs) -> bool | None:
    """True: the bytes are what was recorded, from these inputs. False: the
    inputs changed (stale, recompute quietly). None: the bytes differ from the
    record, or there is none (edited, damaged or foreign: report)."""
    entry = self.read().get(name)
    if not isinstance(entry, dict) or entry.get("sha256") != sha256(data):
      return None
    return all(entry.get(k) == v for k, v in inputs.items())


class ChunkStore:
  """The files of one fingerprint's cache directory, each checked against the
  manifest before it is believed. A file that is not what the manifest
  recorded, or that cannot be read back whole, is reported and treated as
  missing (recomputed); one computed from other inputs is recomputed quietly."""

  def __init__(self, out_dir: str, fp: str):
    self.root = os.path.join(out_dir, "cache")
    self.dir = os.path.join(self.root, fp)
    outcomes = os.path.join(self.root, "outcomes")
    self.manifest = Manifest(self.dir, self.root)
    self.outcomes_manifest = Manifest(outcomes, self.root)
    # Before any directory is made or model runs (each read and write checks again).
    for path in (self.digests_path, self.manifest.path, self.manifest.lock_path,
                 self.outcomes_manifest.path, self.outcomes_manifest.lock_path):
      no_link(path, self.root)
    os.makedirs(self.dir, exist_ok=True)
    os.makedirs(outcomes, exist_ok=True)

  @property
  def digests_path(self) -> str:
    """The input files' digests (data.identity.DigestCache), kept with the cache."""
    return os.path.join(self.root, "file_digests.json")

  def _read(self, path: str, manifest: Manifest, what: str, **inputs) -> bytes | None:
    """The bytes of a cached file if the manifest vouches for them, else None."""
    if not os.path.exists(no_link(path, self.root)):
      return None
    with open(path, "rb") as f:
      data = f.read()
    ok = manifest.matches(os.path.relpath(path, os.path.dirname(manifest.path)), data, **inputs)
    if ok is None:
      warnings.warn(f"cached {what} {path} does not match its manifest entry (edited, damaged "
                    "or not written by this cache); recomputing")
    return data if ok else None

  def _write(self, path: str, data: bytes, manifest: Manifest, **inputs) -> str:
    os.makedirs(os.path.dirname(no_link(path, self.root)), exist_ok=True)
    atomic_write_bytes(path, data)
    manifest.record(os.path.relpath(path, os.path.dirname(manifest.path)), data, **inputs)
    return sha256(data)

  def chunk_path(self, c: int, certified: str | None = None) -> str:
    sub = (f"certified_{certified}",) if certified else ()
    return os.path.join(self.dir, *sub, f"chunk_{c:05d}.npz")

  def load_chunk(self, c: int, points: int, codecs: int = 1, certified: str | None = None,
                 **inputs) -> dict | None:
    """A finished chunk's arrays (the sweep's, or a certified point's one row),
    if it was computed from ``inputs`` (image digest, calibration)."""
    path = self.chunk_path(c, certified)
    data = self._read(path, self.manifest, "chunk", **inputs)
    keys = ("keys",) + POINT_KEYS + CODEC_KEYS if certified else CHUNK_KEYS
    return None if data is None else _arrays(path, data, keys, points, codecs)

  def save_chunk(self, c: int, arrays: dict, certified: str | None = None, **inputs) -> None:
    path = self.chunk_path(c, certified)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    self._write(path, buf.getvalue(), self.manifest, **inputs)

  def calibration_path(self, certified: str | None = None) -> str:
    sub = (f"certified_{certified}",) if certified else ()
    return os.path.join(self.dir, *sub, "calibration.json")

  def load_calibration(self, inputs: str) -> tuple[Calibration, str] | None:
    """(calibration, sha256 of its file) if cached for these calibration images."""
    path = self.calibration_path()
    data = self._read(path, self.manifest, "calibration", inputs=inputs)
    if data is None:
      return None
    try:
      return Calibration.from_dict(json.loads(data.decode("utf-8"))), sha256(data)
    except CalibrationSealError:
      warnings.warn(f"cached calibration {path} is not sealed as this rcst seals calibrations "
                    "(an older rcst wrote it); recomputing")
      return None
    except (CalibrationError, ValueError) as e:
      warnings.warn(f"cached calibration {path} is unreadable ({e}); recomputing")
      return None

  def save_calibration(self, cal: Calibration, certified: str | None = None, **inputs) -> str:
    """Writes the artifact; returns the sha256 of its bytes."""
    path = self.calibration_path(certified)
    return self._write(path, calibration_bytes(cal), self.manifest, **inputs)

  def outcomes_path(self, ident: str) -> str:
    return os.path.join(self.root, "outcomes", f"{ident}.npz")

  def load_outcomes(self, ident: str) -> dict | None:
    path = self.outcomes_path(ident)
    data = self._read(path, self.outcomes_manifest, "certification outcomes")
    if data is None:
      return None
    try:
      with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
    except (OSError, ValueError, KeyError) as e:
      warnings.warn(f"cached certification outcomes {path} are unreadable ({e}); recomputing")
      return None

  def save_outcomes(self, ident: str, arrays: dict) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    self._write(self.outcomes_path(ident), buf.getvalue(), self.outcomes_manifest)


def calibration_bytes(cal: Calibration) -> bytes:
  """The artifact as written (Calibration.to_json's format)."""
  return (json.dumps(cal.to_dict(), indent=2, allow_nan=False) + "\n").encode()


def _arrays(path: str, data: bytes, keys, points: int, codecs: int) -> dict | None:
  try:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
      d = {k: z[k] for k in keys}
    n = len(d["keys"])
    if d["pred"].shape != (points, n) or d["kept"].shape != (points, n):
      raise ValueError(f"shapes {d['pred'].shape} for {points} points x {n} images")
    for k in CODEC_KEYS:
      if d[k].shape != (codecs, points, n):
        raise ValueError(f"{k} has shape {d[k].shape}, not {codecs} codecs x {points} points "
                         f"x {n} images")
    return d
  except Exception as e:  # zip CRC, truncation, missing keys: all mean recompute
    warnings.warn(f"cached chunk {path} is corrupt ({type(e).__name__}: {e}); recomputing")
    return None
