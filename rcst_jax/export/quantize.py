"""`rcst export --int8`: the exported edge with its convolutions quantised by
ONNX Runtime's static quantisation (QDQ: int8 weights per channel, uint8
activations whose ranges come from calibration images).

The Grad-CAM backward and the APS rule stay float. The file keeps the float
file's rcst metadata (weights digest, geometry, transform) and says it is
quantised, so `--config.edge_onnx` calibrates it as deployed; measured in
benchmarks/RESULTS.md (bench_int8_edge.py).
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

from rcst_edge import onnx_format
from rcst_edge.images import Preprocess


def calibration_images(spec: str, transform: Preprocess, limit: int = 256) -> np.ndarray:
  """uint8 images [n, H, W, 3]: ``synthetic:N`` (the demo's generator) or a
  directory whose image files (any depth) are read with the edge's transform."""
  if spec.startswith("synthetic:"):
    from rcst_jax.data.synthetic import SyntheticShapes
    src = SyntheticShapes("calibration", int(spec.split(":", 1)[1]), seed=1)
    return np.stack([src[i].image for i in range(len(src))])
  if not os.path.isdir(spec):
    raise onnx_format.EdgeFileError(f"--int8 {spec!r}: not a directory of images nor "
                                    "synthetic:N")
  paths = sorted(os.path.join(d, f) for d, _, files in os.walk(spec) for f in files
                 if f.lower().endswith((".png", ".jpg", ".jpeg", ".webp", ".bmp")))[:limit]
  if not paths:
    raise onnx_format.EdgeFileError(f"--int8 {spec}: no image files there")
  return np.stack([transform(p) for p in paths])


def quantize_int8(float_path: str, out_path: str, images: np.ndarray,
                  point=(0.5, 0.9, 0.5)) -> None:
  """Writes the int8 form of the edge file at ``float_path`` to ``out_path``;
  ``images`` set the activation ranges (``point``: lambda, q_hat, tau fed with them)."""
  import onnx
  from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_static,
  )
  from onnxruntime.quantization.shape_inference import quant_pre_process
  scalars = {k: np.asarray(v, np.float32) for k, v in zip(onnx_format.INPUTS[1:], point)}

  class Reader(CalibrationDataReader):
    def __init__(self):
      self.starts = iter(range(0, len(images), 8))

    def get_next(self):
      i = next(self.starts, None)
      return None if i is None else {"images": images[i:i + 8], **scalars}
  with tempfile.TemporaryDirectory() as tmp:
    pre = os.path.join(tmp, "pre.onnx")
    quant_pre_process(float_path, pre, skip_symbolic_shape=True)
    quantize_static(pre, out_path, Reader(), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=["Conv"], activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, per_channel=True)
  model = onnx.load(out_path)
  props = {p.key: p.value for p in model.metadata_props}
  props["rcst.quantized"] = f"int8 QDQ convolutions, {len(images)} calibration images"
  onnx.helper.set_model_props(model, props)
  onnx.save(model, out_path)
