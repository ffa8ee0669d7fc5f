"""Calibrated as deployed: Algorithm 1 scores with the function that decides
(the edge step, a Flax model or an exported ONNX file). That the calibration
file is the same for 1 and 8 devices: tests/sweep/test_engine.py."""

import os

import numpy as np
import pytest
import small_models
from support import WEIGHTS

from rcst_jax import cli
from rcst_jax.calibration import algorithm1
from rcst_jax.data.sources import Sources
from rcst_jax.data.synthetic import SyntheticShapes
from rcst_jax.inference import edge as edge_lib
from rcst_jax.models.checkpoints import load_model

ONNX = os.path.join(WEIGHTS, "demo_edge.onnx")


def _config(*overrides):
  return cli.parse_config("demo:smoke", ["--config.progress=False", *overrides])


def test_calibration_scores_are_the_decision_scores_bit_for_bit():
  edge = load_model(os.path.join(WEIGHTS, "demo_edge"))
  src = SyntheticShapes("calibration", 20, seed=0)
  sources = Sources(src, src, name="synthetic")
  config = _config("--config.batch_size=8")
  images = np.stack([src[i].image for i in range(len(src))])
  soft = algorithm1.edge_softmax(config, edge, sources, progress=False)
  decided = edge_lib.edge_step_batched(edge, images, 0.5, 0.9, layer="features", grid=14,
                                       batch_size=8)
  assert soft.probs.dtype == decided["probs"].dtype == np.float32
  assert (soft.probs.view(np.uint32) == decided["probs"].view(np.uint32)).all()
  assert (soft.probs.max(-1) == decided["p_max"]).all()


def test_an_onnx_edge_is_calibrated_as_it_decides():
  """Algorithm 1 through ONNX Runtime: the file's own probabilities, its
  digest recorded (rcst-edge then runs it without a warning)."""
  from rcst_edge.onnx_edge import OnnxEdge
  onnx = OnnxEdge(ONNX)
  src = SyntheticShapes("calibration", 20, seed=0)
  images = np.stack([src[i].image for i in range(len(src))])
  config = _config("--config.batch_size=8")
  soft = algorithm1.edge_softmax(config, onnx, Sources(src, src, name="synthetic"),
                                 progress=False)
  ort = onnx.batched(images, algorithm1_point(), batch_size=8)
  assert (soft.probs.view(np.uint32) == ort["probs"].view(np.uint32)).all()
  flax = edge_lib.edge_step_batched(load_model(os.path.join(WEIGHTS, "demo_edge")), images,
                                    0.5, 0.9, layer="features", grid=14, batch_size=8)
  assert 0 < np.abs(soft.probs - flax["probs"]).max() <= 1e-5  # another rounding, close


def algorithm1_point():
  from rcst_edge.deployment import OperatingPoint
  return OperatingPoint(np.inf, np.inf, 0.0)


def test_rcst_calibrate_with_an_onnx_edge_records_it(tmp_path, capsys):
  out = tmp_path / "cal.json"
  assert cli.main(["calibrate", "--config", "demo:smoke", "--config.certify.enabled=False",
                   "--config.data.n_cal=40", f"--config.edge_onnx={ONNX}",
                   f"--config.output_dir={tmp_path}", "--out", str(out)]) == 0
  from rcst_edge import deployment
  from rcst_edge.onnx_edge import OnnxEdge
  fields = deployment.load_sealed(out)
  assert fields["edge_onnx_digest"] == OnnxEdge(ONNX).digest
  assert OnnxEdge(ONNX).check_calibrated(fields, str(out)) is True
  # An ONNX file of other weights is refused before anything runs, naming both.
  with pytest.raises(Exception, match="exported from edge weights"):
    cli.parse_config  # noqa: B018
    from rcst_jax.models.loading import load_onnx_edge
    load_onnx_edge(ONNX, small_models.edge(), "features")
