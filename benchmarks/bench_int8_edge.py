"""An int8 edge: ONNX Runtime static quantisation of the exported demo edge,
then its accuracy, acceptance and speed next to the float file.

  .venv-export/bin/python benchmarks/bench_int8_edge.py [--out /tmp/edge_int8.onnx]
      [--cal-images 64] [--n 512]

Quantises the convolutions as `rcst export --int8` does (rcst_jax/export/
quantize.py: QDQ, int8 weights per channel, uint8 activations calibrated on
--cal-images generated images; the Grad-CAM backward and the APS rule stay
float) and keeps the file's rcst metadata, so
`rcst calibrate` / `rcst demo --config.edge_onnx=OUT` calibrate it as
deployed. Needs onnx (the export venv). Prints accuracy and acceptance at the
demo's operating point on --n test images, and images/s at batch 1 and 16 for
both files, in the same run.
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import cpu_name  # noqa: E402

from rcst_edge.deployment import OperatingPoint  # noqa: E402
from rcst_edge.onnx_edge import OnnxEdge  # noqa: E402
from rcst_jax.data.synthetic import SyntheticShapes  # noqa: E402
from rcst_jax.export.quantize import quantize_int8  # noqa: E402

FLOAT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "weights",
                     "demo_edge.onnx")
POINT = OperatingPoint(0.56, 0.976, 0.5)  # the demo's calibration, about


def _images(split: str, n: int, seed: int):
  src = SyntheticShapes(split, n, seed=seed)
  return np.stack([src[i].image for i in range(n)]), np.array([src[i].label for i in range(n)])


def quantize(out: str, n_cal: int) -> None:
  """`rcst export --int8 synthetic:N`'s quantisation, of the shipped float file."""
  images, _ = _images("calibration", n_cal, seed=1)
  quantize_int8(FLOAT, out, images, (POINT.lambda_hat, POINT.q_hat, POINT.tau))


def rate(edge: OnnxEdge, images, batch: int, seconds: float = 2.0) -> float:
  edge(images[:batch], POINT)
  t0, n = time.perf_counter(), 0
  while time.perf_counter() - t0 < seconds:
    edge(images[:batch], POINT)
    n += batch
  return n / (time.perf_counter() - t0)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "edge_int8.onnx"))
  p.add_argument("--cal-images", type=int, default=64)
  p.add_argument("--n", type=int, default=512)
  args = p.parse_args()
  t0 = time.perf_counter()
  quantize(args.out, args.cal_images)
  print(f"cpu: {cpu_name()}; quantised in {time.perf_counter() - t0:.1f} s -> {args.out} "
        f"({os.path.getsize(args.out):,} B; float {os.path.getsize(FLOAT):,} B)")
  images, labels = _images("test", args.n, seed=0)
  print("file        acc (%)  accepted (%)  acc of accepted (%)  img/s b1  img/s b16")
  for name, path in (("float", FLOAT), ("int8", args.out)):
    edge = OnnxEdge(path)
    out = edge.batched(images, POINT, 16)
    right = out["pred"] == labels
    print(f"{name:10s} {100 * right.mean():8.2f} {100 * out['accept'].mean():13.2f} "
          f"{100 * right[out['accept']].mean():20.2f} {rate(edge, images, 1):9.1f} "
          f"{rate(edge, images, 16):10.1f}")


if __name__ == "__main__":
  main()
