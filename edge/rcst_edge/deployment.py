"""What an edge deploys with: calibration.json read without JAX, the
operating point it hands out, and Eq. 27.

rcst_jax's `Calibration` (calibration/artifact.py) validates every field when
it writes and loads the file; it reads the operating point and the seal
through the functions here, so the JAX-free edge and `rcst run` cannot read
the same file differently. A sealed file is one rcst wrote (and validated).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math

import numpy as np

from rcst_edge import seal as seal_lib
from rcst_edge.errors import RcstError

FORMAT, VERSION = "rcst_calibration", 3


class CalibrationError(RcstError):
  """Invalid calibration artifact or a CRC rule that cannot be satisfied (strict mode)."""


class CalibrationSealError(CalibrationError):
  """The file differs from its seal (``fields``: what changed), or has none (``fields`` None)."""

  def __init__(self, message: str, fields: list[str] | None):
    super().__init__(message)
    self.fields = fields


@dataclasses.dataclass(frozen=True)
class OperatingPoint:
  """Where the proposed method runs: the edge answers iff
  ``accepts(p_max, lambda_hat)``, APS sets use ``q_hat``, and an offloaded
  image sends its patches scoring >= ``tau``, coded by ``codec``. The calibration artifact hands
  it out (`operating_point`): the certified pair, or the CRC lambda with an
  explicit tau, for `rcst run`, `rcst explain`, the gallery and the JAX-free
  edge alike. ``certified``: the whole-system certificate applies."""
  lambda_hat: float
  q_hat: float
  tau: float
  certified: bool = False
  codec: str = "raw"   # how the kept patches are coded (payload/codecs.py)


def decode_float(x, name: str) -> float:
  if x == "inf":
    return math.inf
  if isinstance(x, bool) or not isinstance(x, (int, float)):
    raise CalibrationError(f"{name} must be a number or the string 'inf', got {x!r}")
  return float(x)


def operating_point(lambda_hat: float, q_hat: float, certificate: dict | None,
                    tau: float | None = None, codec: str | None = None) -> OperatingPoint:
  """Where Algorithm 2 runs with a calibration (its CRC ``lambda_hat`` and APS
  ``q_hat``, its ``certificate`` or None).

  No ``tau``: the certified (lambda, tau, codec) and the q_hat fitted with
  it (a lambda above 1 accepts nothing, as inf does); an uncertified
  certificate is server-only (accept nothing, keep every raw patch),
  whatever it holds. With ``tau``: the CRC lambda_hat and APS q_hat at that
  tau, outside any whole-system certificate. ``codec`` (a spec, e.g.
  "jpeg:90") replaces the certified one, or raw with a tau; a codec other
  than the certified one leaves the certificate.
  """
  if tau is not None:
    return OperatingPoint(lambda_hat, q_hat, float(tau), codec=codec or "raw")
  if certificate is None:
    raise CalibrationError("this calibration has no certified (lambda, tau); give a tau")
  cert_q = decode_float(certificate["q_hat"], "certificate.q_hat")
  if not certificate["certified"]:
    return OperatingPoint(math.inf, cert_q, 0.0, certified=False, codec=codec or "raw")
  lam = decode_float(certificate["lambda_hat"], "certificate.lambda_hat")
  chosen = certificate["codec"] if codec is None else codec
  return OperatingPoint(math.inf if lam > 1 else lam, cert_q, float(certificate["tau"]),
                        certified=chosen == certificate["codec"], codec=chosen)


def check_seal(d: dict) -> None:
  """Raises CalibrationSealError unless ``d`` matches its own seal."""
  diffs = seal_lib.changed(d, d.get(seal_lib.KEY))
  if diffs is None:
    raise CalibrationSealError(
        "no valid seal (written before rcst sealed whole calibration files, or the seal was "
        "edited): run `rcst calibrate --reseal FILE` if you vouch for every field as it is, "
        "or rerun `rcst calibrate`", None)
  if diffs:
    raise CalibrationSealError(
        f"edited since rcst wrote it, per its seal: {', '.join(diffs)}; rerun "
        "`rcst calibrate`, or run `rcst calibrate --reseal FILE` if the edit was on purpose "
        "(no guarantee then applies to those fields)", seal_lib.names(diffs))


def check_format(d) -> None:
  if not isinstance(d, dict):
    raise CalibrationError(f"expected a JSON object, got {type(d).__name__}")
  if d.get("format") != FORMAT or d.get("version") != VERSION:
    raise CalibrationError(
        f"not an {FORMAT} v{VERSION} file (format={d.get('format')!r}, "
        f"version={d.get('version')!r}); rerun `rcst calibrate`")


def load_sealed(path) -> dict:
  """The fields of the calibration file at ``path``: strict JSON, its format,
  and its seal checked (what the JAX-free edge reads; rcst_jax's `Calibration`
  checks every field on top)."""
  d = read_strict_json(path)
  try:
    check_format(d)
    check_seal(d)
  except CalibrationSealError as e:
    raise CalibrationSealError(f"{path}: {str(e).replace('FILE', str(path))}",
                               e.fields) from e
  except CalibrationError as e:
    raise CalibrationError(f"{path}: malformed calibration file: {e}") from e
  return d


def file_digest(path) -> str:
  """sha256 of a file's bytes (what a calibration records of an ONNX edge)."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def combine(offloaded, server_pred, fallback) -> np.ndarray:
  """Eq. 27: the server's answer where the image was offloaded, else the edge's."""
  return np.where(np.asarray(offloaded, bool), np.asarray(server_pred),
                  np.asarray(fallback)).astype(np.int32)


def _unique_keys(pairs):
  d = {}
  for k, v in pairs:
    if k in d:  # json would keep the last value silently
      raise CalibrationError(f"duplicate key {k!r}")
    d[k] = v
  return d


def _finite(text: str) -> float:
  """NaN, Infinity, -Infinity and overflowing literals (1e999) are refused."""
  x = float(text)
  if not math.isfinite(x):
    raise CalibrationError(f"non-finite number {text} (strict JSON has none; write 'inf')")
  return x


def read_strict_json(path):
  """Strict JSON: UTF-8, no repeated key at any level, no NaN or Infinity."""
  with open(path, "rb") as f:
    raw = f.read()
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise CalibrationError(f"{path}: not a UTF-8 JSON file ({e})") from e
  try:
    return json.loads(text, object_pairs_hook=_unique_keys, parse_float=_finite,
                      parse_constant=_finite)
  except json.JSONDecodeError as e:
    raise CalibrationError(f"{path}: not valid JSON ({e})") from e
  except CalibrationError as e:
    raise CalibrationError(f"{path}: not strict JSON: {e}") from e
