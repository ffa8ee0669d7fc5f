"""The exported edge step on ONNX Runtime: what `rcst-edge` runs on a device.

`OnnxEdge(path)` opens an `rcst export` file, reads what it says of itself
(model digest, geometry, transform) and runs it on uint8 images at an
operating point. `check_calibrated` refuses a file other than the one a
calibration names, naming both digests.
"""

from __future__ import annotations

import os

import numpy as np

from rcst_edge import onnx_format
from rcst_edge.deployment import OperatingPoint, file_digest
from rcst_edge.images import Preprocess
from rcst_edge.payload.geometry import Geometry


def _session(path: str, threads: int | None):
  try:
    import onnxruntime as ort
  except ImportError:
    raise onnx_format.MissingRuntime(
        "the ONNX edge needs onnxruntime: pip install onnxruntime") from None
  opts = ort.SessionOptions()
  if threads:
    opts.intra_op_num_threads = threads
  opts.log_severity_level = 3  # the converter's unused initializers are not news
  try:
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
  except Exception as e:  # onnxruntime raises its own classes for a bad file
    raise onnx_format.EdgeFileError(f"{path}: ONNX Runtime cannot load it ({e})") from None


class OnnxEdge:
  """An exported edge: ``digest`` (sha256 of the file), ``meta`` (its
  metadata), ``geometry`` and ``transform`` (the eval transform it was
  exported with)."""

  def __init__(self, path: str | os.PathLike, threads: int | None = None):
    self.path = str(path)
    if not os.path.isfile(self.path):
      raise onnx_format.EdgeFileError(f"{self.path}: no such ONNX file")
    self.session = _session(self.path, threads)
    props = self.session.get_modelmeta().custom_metadata_map
    self.meta = onnx_format.read_props(props, self.path)
    self.digest = "sha256:" + file_digest(self.path)
    self.geometry = Geometry.from_dict(self.meta["geometry"])
    self.transform = Preprocess(**self.meta["transform"])

  def __call__(self, images, point: OperatingPoint) -> dict:
    """The edge step on uint8 images [B, H, W, 3]: `onnx_format.OUTPUTS` as numpy."""
    images = np.ascontiguousarray(images, np.uint8)
    g = self.geometry
    if images.ndim != 4 or images.shape[1:] != (g.image_size, g.image_size, g.channels):
      raise ValueError(f"images must be uint8 [B, {g.image_size}, {g.image_size}, "
                       f"{g.channels}], got {images.shape}")
    feed = {"images": images, **{k: np.asarray(v, np.float32) for k, v in (
        ("lambda_hat", point.lambda_hat), ("q_hat", point.q_hat), ("tau", point.tau))}}
    return dict(zip(onnx_format.OUTPUTS, self.session.run(list(onnx_format.OUTPUTS), feed)))

  def batched(self, images, point: OperatingPoint, batch_size: int = 16) -> dict:
    parts = [self(images[i:i + batch_size], point) for i in range(0, len(images), batch_size)]
    if not parts:
      raise ValueError("no images given")
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def check_calibrated(self, calibration: dict, where: str) -> bool:
    """Refuses this file unless ``calibration`` (its fields) was made for it:
    with this very file (``edge_onnx_digest``), or with the weights it was
    exported from (``edge_digest``). Returns whether it was this file."""
    want = calibration.get("edge_onnx_digest")
    if want is not None:
      if want != self.digest:
        raise onnx_format.EdgeFileError(
            f"{self.path} ({self.digest}) is not the edge {where} was calibrated with "
            f"({want}): the guarantee holds for that file only")
      return True
    weights = calibration.get("edge_digest")
    if weights != self.meta.get("edge_digest"):
      raise onnx_format.EdgeFileError(
          f"{self.path} was exported from edge weights {self.meta.get('edge_digest')}, but "
          f"{where} was calibrated for {weights}: export the calibrated edge")
    return False
