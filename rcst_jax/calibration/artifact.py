"""The calibration artifact: Algorithm 1's output plus what the run used, as JSON.

Validated on load (a named CalibrationError for every malformed field), so a
hand-edited or truncated file never reaches `rcst run` silently: strict JSON
(UTF-8, no repeated key, no NaN or Infinity), a transform that fits the
recorded patch geometry, a certificate whose digest matches its fields and
whose fields are consistent with a Learn-then-Test run that certified, and a
seal over the whole file (calibration/seal.py) that names each edited field.

A file without a seal (written before whole-file seals) is refused: it may
have been edited, and nothing can tell. `rcst calibrate --reseal FILE` vouches
for a file as it is; a resealed file loads with a warning naming its edited fields.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from typing import Any, Optional

import numpy as np

from rcst_edge import deployment
from rcst_edge import seal as seal_lib
from rcst_edge.deployment import (  # noqa: F401  (the file format's names, here too)
  CalibrationError,
  CalibrationSealError,
  OperatingPoint,
  decode_float,
  read_strict_json,
)
from rcst_edge.errors import ConfigError
from rcst_edge.payload.geometry import Geometry
from rcst_jax.calibration import certificate
from rcst_jax.calibration.certificate import encode_float
from rcst_jax.core.fileio import atomic_write_text
from rcst_jax.data.preprocess import Preprocess
from rcst_jax.models.checkpoints import variables_digest


class CalibrationWarning(UserWarning):
  """CRC could not be satisfied: the stored lambda_hat is inf (the edge accepts nothing)."""


class ResealedWarning(UserWarning):
  """The calibration was edited by hand and resealed: no guarantee applies to those fields."""


_META = ("edge_model", "server_model", "dataset", "split", "gradcam_layer", "edge_digest",
         "server_digest", "edge_onnx_digest")


def _check_threshold(lam: float, valid: bool, name: str):
  if valid and not 0.0 <= lam <= 1.0:
    raise CalibrationError(f"{name}={lam} must lie in [0, 1] when valid")
  if not valid and not math.isinf(lam):
    raise CalibrationError(f"{name}={lam} must be inf when the CRC rule is not satisfiable")


_TRANSFORM_KEYS = {"resize_size": int, "crop_size": int, "interpolation": str}
_GEOMETRY_KEYS = {"image_size": int, "patch": int, "channels": int}


def _check_record(d, keys: dict, name: str):
  if d is None:
    return
  if not isinstance(d, dict) or set(d) != set(keys):
    raise CalibrationError(f"{name} must be an object with keys {sorted(keys)}, got {d!r}")
  for k, t in keys.items():
    if isinstance(d[k], bool) or not isinstance(d[k], t) or (t is int and d[k] < 1):
      raise CalibrationError(f"{name}.{k} must be a {'positive int' if t is int else 'string'}, "
                             f"got {d[k]!r}")


def _check_fit(transform, geometry) -> None:
  """What `rcst run` needs: a whole patch grid, RGB, and an edge crop of exactly
  the server's image size (collaborative_inference refuses any other shape)."""
  try:
    geo = Geometry.from_dict(geometry) if geometry else Geometry()
  except ValueError as e:
    raise CalibrationError(f"geometry {geometry}: {e}") from e
  if geo.channels != 3:
    raise CalibrationError(f"geometry.channels={geo.channels}: images are RGB (3 channels)")
  if transform is None:
    return
  try:
    Preprocess(**transform)
  except ConfigError as e:
    raise CalibrationError(f"transform {transform}: {e}") from e
  if transform["crop_size"] != geo.image_size:
    raise CalibrationError(
        f"transform.crop_size={transform['crop_size']} differs from geometry.image_size="
        f"{geo.image_size}: the edge's crop is what the server's patches are cut from")


def _check_certificate(c, n: int):
  """The certificate's own checks (certificate.check), as a CalibrationError."""
  if c is None:
    return
  try:
    certificate.check(c, n)
  except ValueError as e:
    raise CalibrationError(str(e)) from e


@dataclasses.dataclass(frozen=True)
class Calibration:
  """Output of Algorithm 1, plus what the run that made it used.

  lambda_hat: edge accepts when p_max >= lambda_hat, with p_max in float32
  as calibrated (inf: accepts nothing, lambda_valid False). q_hat: APS
  quantile (inf: every class is a candidate). `transform` (resize, crop,
  interpolation), `gradcam_layer` and `geometry` (image size, patch,
  channels) are recorded so `rcst run` and `rcst explain` apply exactly the
  evaluation's steps.
  """
  lambda_hat: float
  q_hat: float
  alpha_crc: float
  alpha_aps: float
  n: int
  lambda_valid: bool
  edge_model: Optional[str] = None
  server_model: Optional[str] = None
  dataset: Optional[str] = None
  split: Optional[str] = None
  B: float = 1.0
  gradcam_layer: Optional[str] = None
  transform: Optional[dict] = None
  geometry: Optional[dict] = None
  # variables_digest of the models calibrated with, so a calibration is not
  # silently applied to other weights than it was computed for.
  edge_digest: Optional[str] = None
  server_digest: Optional[str] = None
  # sha256 of the `rcst export` file calibrated with (config.edge_onnx), which
  # rcst-edge then requires; written only when there is one.
  edge_onnx_digest: Optional[str] = None
  # Learn-then-Test certificate of a (lambda, tau) pair (calibration/certificate.py).
  certificate: Optional[dict] = None
  # `rcst calibrate --reseal` records (calibration/seal.py); written only when present.
  resealed: Optional[list] = None

  def __post_init__(self):
    if isinstance(self.n, bool) or not isinstance(self.n, (int, np.integer)) or self.n < 1:
      raise CalibrationError(f"n must be a positive integer, got {self.n!r}")
    check_B(self.B)
    if not isinstance(self.lambda_valid, (bool, np.bool_)):
      raise CalibrationError(f"lambda_valid must be a bool, got {self.lambda_valid!r}")
    for name in ("alpha_crc", "alpha_aps"):
      a = getattr(self, name)
      if not isinstance(a, (int, float, np.floating)) or not 0 < a < 1:
        raise CalibrationError(f"{name} must lie in (0, 1), got {a!r}")
    _check_threshold(self.lambda_hat, bool(self.lambda_valid), "lambda_hat")
    if math.isnan(self.q_hat) or self.q_hat < 0:
      raise CalibrationError(f"q_hat must be >= 0 or inf, got {self.q_hat}")
    for name in _META:
      v = getattr(self, name)
      if v is not None and not isinstance(v, str):
        raise CalibrationError(f"{name} must be a string or null, got {v!r}")
    _check_record(self.transform, _TRANSFORM_KEYS, "transform")
    _check_record(self.geometry, _GEOMETRY_KEYS, "geometry")
    _check_fit(self.transform, self.geometry)
    _check_certificate(self.certificate, int(self.n))
    why = seal_lib.check_history(self.resealed)
    if why is not None:
      raise CalibrationError(why)

  def operating_point(self, tau: float | None = None, codec: str | None = None) -> OperatingPoint:
    """Where Algorithm 2 runs with this calibration: `rcst_edge.deployment.operating_point`
    (the certified point without ``tau``; the CRC lambda_hat at ``tau`` with one)."""
    return deployment.operating_point(self.lambda_hat, self.q_hat, self.certificate, tau, codec)

  def check_models(self, where: str, edge, server=None, allow_other_weights: bool = False):
    """Refuses models this calibration was not made for: a server whose patch
    geometry differs, or weights other than those calibrated (unless
    ``allow_other_weights``, which warns that the guarantee no longer holds)."""
    geometry = self.patch_geometry()
    if server is not None and Geometry.of_server(server) != geometry:
      raise CalibrationError(f"the server's patch geometry {Geometry.of_server(server)} differs "
                             f"from the calibration's {geometry} ({where})")
    for name, model, want in (("edge", edge, self.edge_digest),
                              ("server", server, self.server_digest)):
      if model is None or want is None or variables_digest(model.variables) == want:
        continue
      msg = f"{where} was calibrated for other {name} weights than these"
      if not allow_other_weights:
        raise CalibrationError(msg + "; rerun `rcst calibrate` with these models, or pass "
                               "--allow-other-weights (the CRC guarantee then no longer applies)")
      warnings.warn(msg + ": the CRC guarantee does not apply to these weights")

  def patch_geometry(self) -> Geometry:
    """The patch geometry recorded (older artifacts: the default 224 / 16)."""
    return Geometry.from_dict(self.geometry) if self.geometry else Geometry()

  def to_dict(self) -> dict:
    """The file's fields, sealed (the seal last)."""
    d = {"format": deployment.FORMAT, "version": deployment.VERSION}
    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      if f.name in ("lambda_hat", "q_hat"):
        v = encode_float(float(v))
      if f.name not in (seal_lib.HISTORY, "edge_onnx_digest") or v is not None:
        d[f.name] = v
    return {**d, seal_lib.KEY: seal_lib.make(d)}

  def to_json(self, path) -> None:
    atomic_write_text(str(path), json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")

  @classmethod
  def from_dict(cls, d: Any) -> "Calibration":
    """The calibration of a file's fields: every field checked, then the seal."""
    cal = cls.unsealed(d)
    deployment.check_seal(d)
    return cal

  @classmethod
  def unsealed(cls, d: Any) -> "Calibration":
    """The calibration of a file's fields, each checked; the seal is not (`from_dict` checks it)."""
    deployment.check_format(d)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    body = {k: v for k, v in d.items() if k not in ("format", "version", seal_lib.KEY)}
    unknown = sorted(set(body) - set(fields))
    if unknown:
      raise CalibrationError(f"unknown field(s) {unknown}")
    required = [k for k, f in fields.items() if f.default is dataclasses.MISSING]
    missing = [k for k in required if k not in body]
    if missing:
      raise CalibrationError(f"missing field(s) {missing}")
    kw = dict(body)
    kw["lambda_hat"] = decode_float(kw["lambda_hat"], "lambda_hat")
    kw["q_hat"] = decode_float(kw["q_hat"], "q_hat")
    for k in ("alpha_crc", "alpha_aps", "B"):
      if k in kw:
        kw[k] = decode_float(kw[k], k)
    return cls(**kw)

  @classmethod
  def from_json(cls, path) -> "Calibration":
    """The file at ``path``, checked and sealed; warns (ResealedWarning) when it was resealed."""
    d = read_strict_json(path)
    try:
      cal = cls.from_dict(d)
    except CalibrationSealError as e:
      raise CalibrationSealError(f"{path}: {str(e).replace('FILE', str(path))}",
                                 e.fields) from e
    except CalibrationError as e:
      raise CalibrationError(f"{path}: malformed calibration file: {e}") from e
    if cal.resealed:
      warnings.warn(seal_lib.history_warning(path, cal.resealed), ResealedWarning, stacklevel=2)
    return cal


def check_B(B) -> float:
  """B bounds the 0-1 loss in the CRC rule: finite and >= 1 (B < 1 would understate it)."""
  if isinstance(B, bool) or not isinstance(B, (int, float, np.integer, np.floating)):
    raise CalibrationError(f"B (the loss bound) must be a number >= 1, got {B!r}")
  if not math.isfinite(B) or B < 1:
    raise CalibrationError(f"B (the loss bound) must be finite and >= 1, got {B!r}")
  return float(B)
