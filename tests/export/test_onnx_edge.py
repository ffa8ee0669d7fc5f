"""The exported ONNX edge (rcst_jax.export) against the Flax edge_step.

Needs jax2onnx and onnxruntime: it runs in the export venv (`make
test-export`); anywhere else it is skipped, with that reason in the summary.
"""

import json
import os

import numpy as np
import pytest

REASON = "the ONNX export needs the export venv: run `make test-export`"
pytest.importorskip("jax2onnx", reason=REASON)
pytest.importorskip("onnxruntime", reason=REASON)
onnx = pytest.importorskip("onnx", reason=REASON)

from rcst_edge.errors import OutputRefusedError  # noqa: E402
from rcst_jax.data.synthetic import SyntheticShapes  # noqa: E402
from rcst_jax.export import onnx_edge, parity  # noqa: E402
from rcst_jax.inference.edge import edge_step  # noqa: E402
from rcst_jax.models.checkpoints import load_model  # noqa: E402

EDGE = os.path.join(os.path.dirname(__file__), "..", "..", "weights", "demo_edge")
# (lambda_hat, q_hat): a demo-like operating point, a strict one, and the extremes
# (accept nothing with every class in the set; accept everything).
POINTS = [(0.5, 0.9), (0.8, 0.5), (np.inf, np.inf), (0.0, 0.0)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("onnx") / "edge.onnx")
  return onnx_edge.export_edge(EDGE, path)


@pytest.fixture(scope="module")
def sess(exported):
  return parity.session(exported["out"])


@pytest.fixture(scope="module")
def flax_edge():
  return load_model(EDGE)


@pytest.fixture(scope="module")
def images():
  src = SyntheticShapes("test", 32, seed=3)
  return np.stack([src[i].image for i in range(len(src))])


def _both(sess, edge, images, lam, q):
  ref = {k: np.asarray(v) for k, v in edge_step(edge, images, lam, q).items()}
  return ref, parity.run_onnx(sess, images, lam, q)


@pytest.mark.parametrize("lam, q", POINTS)
def test_outputs_match_flax(sess, flax_edge, images, lam, q):
  ref, got = _both(sess, flax_edge, images, lam, q)
  assert sorted(got) == sorted(onnx_edge.OUTPUTS) == sorted([*ref, "keep"])
  for k in ref:
    assert (got[k].dtype, got[k].shape) == (ref[k].dtype, ref[k].shape), k
  r = parity.compare(ref, got, lam, q)
  assert r["max_abs_probs"] <= 1e-4 and r["max_abs_p_max"] <= 1e-4, r
  assert r["max_abs_patch_scores"] <= 1e-5 and r["max_abs_cam"] <= 1e-4, r
  assert all(r[f"{k}_untied"] == 0 for k in ("accept", "pred", "aps_mask", "aps_size")), r
  if np.isinf(lam):
    assert not got["accept"].any() and (got["aps_size"] == ref["probs"].shape[1]).all()
  if lam == 0.0:
    assert got["accept"].all()


def test_one_file_any_batch(sess, flax_edge, images):
  lam, q = POINTS[0]
  for n in (1, 5):
    ref, got = _both(sess, flax_edge, images[:n], lam, q)
    assert got["patch_scores"].shape == (n, 196) and got["cam"].shape[0] == n
    r = parity.compare(ref, got, lam, q)
    assert r["max_abs_probs"] <= 1e-4 and r["max_abs_patch_scores"] <= 1e-5, (n, r)
    assert r["aps_mask_untied"] == r["accept_untied"] == r["pred_untied"] == 0, (n, r)


def test_signature_and_metadata(exported, flax_edge):
  model = onnx.load(exported["out"])
  graph = model.graph
  dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
  assert [i.name for i in graph.input] == list(onnx_edge.INPUTS)
  assert [o.name for o in graph.output] == list(onnx_edge.OUTPUTS)
  assert dims(graph.input[0]) == ["B", 224, 224, 3] and dims(graph.input[1]) == []
  assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
  props = {p.key: p.value for p in model.metadata_props}
  assert props["rcst.edge_digest"] == flax_edge.metadata["variables_digest"]
  assert props["rcst.edge_digest"] == exported["edge_digest"]
  assert props["rcst.geometry"] == '{"image_size": 224, "patch": 16, "channels": 3}'
  assert props["rcst.grid"] == "14" and props["rcst.gradcam_layer"] == "features"
  assert props["rcst.mean"] == "[0.485, 0.456, 0.406]"
  assert props["rcst.opset"] == str(onnx_edge.OPSET)
  assert {"jax", "jax2onnx", "onnx", "rcst_jax"} <= set(json.loads(props["rcst.versions"]))
  assert exported["bytes"] == os.path.getsize(exported["out"])


def test_cli_export_is_reproducible_and_checked(exported, tmp_path, capsys):
  from rcst_jax import cli
  out = tmp_path / "edge.onnx"
  assert cli.main(["export", "--edge", EDGE, "--out", str(out), "--check", "4"]) == 0
  printed = json.loads(capsys.readouterr().out)
  assert printed["sha256"] == exported["sha256"]  # the same bytes from the same weights
  check = printed["check"]
  assert check["images"] == 4 and check["max_abs_patch_scores"] <= 1e-5, check
  assert sum(v for k, v in check.items() if k.endswith("_untied")) == 0, check


def test_refusals(exported, tmp_path):
  with pytest.raises(OutputRefusedError, match="--overwrite"):
    onnx_edge.export_edge(EDGE, exported["out"])
  with pytest.raises(onnx_edge.ExportError, match=r"\.onnx"):
    onnx_edge.export_edge(EDGE, str(tmp_path / "edge.bin"))
  with pytest.raises(onnx_edge.ExportError, match="not a Grad-CAM tap"):
    onnx_edge.export_edge(EDGE, str(tmp_path / "x.onnx"), layer="blocks")
  with pytest.raises(onnx_edge.ExportError, match="not a multiple"):
    onnx_edge.export_edge(EDGE, str(tmp_path / "x.onnx"), patch=15)
  assert not os.path.exists(tmp_path / "x.onnx")


def test_the_shipped_demo_edge_file_is_this_export(exported):
  """weights/demo_edge.onnx (what rcst-edge's tests and users run) is exactly
  what `rcst export` writes from weights/demo_edge today."""
  from rcst_edge.deployment import file_digest
  shipped = os.path.join(os.path.dirname(EDGE), "demo_edge.onnx")
  assert file_digest(shipped) == exported["sha256"]


def test_keep_is_the_decision_rcst_run_makes(sess, flax_edge, images):
  """The graph's kept patches are `methods.decide`'s for the proposed method."""
  from rcst_jax.inference import edge as edge_lib
  from rcst_jax.inference import methods
  lam, q = POINTS[0]
  for tau in (0.0, 0.3, 0.7):
    ref = {k: np.asarray(v) for k, v in edge_step(flax_edge, images, lam, q).items()}
    off, keep, _ = methods.decide(methods.PROPOSED, edge_lib.edge_view(ref), [tau])
    got = parity.run_onnx(sess, images, lam, q, tau)
    assert (got["keep"] == keep[0]).all() and (~got["accept"] == off[0]).all(), tau


def test_int8_export_is_a_smaller_edge_that_can_be_calibrated_as_deployed(exported, flax_edge,
                                                                          images, tmp_path,
                                                                          capsys):
  from rcst_edge.deployment import OperatingPoint
  from rcst_edge.onnx_edge import OnnxEdge
  from rcst_jax import cli
  from rcst_jax.models.loading import load_onnx_edge
  out = tmp_path / "int8.onnx"
  assert cli.main(["export", "--edge", EDGE, "--out", str(out), "--int8", "synthetic:16"]) == 0
  printed = json.loads(capsys.readouterr().out)
  assert printed["int8_calibration_images"] == 16 and printed["bytes"] < exported["bytes"]
  edge = load_onnx_edge(str(out), flax_edge, "features")  # what --config.edge_onnx loads
  assert edge.meta["quantized"].startswith("int8") and "QuantizeLinear" in str(
      [n.op_type for n in onnx.load(str(out)).graph.node])
  lam, q = POINTS[0]
  got = edge(images, OperatingPoint(lam, q, 0.5))
  ref = {k: np.asarray(v) for k, v in edge_step(flax_edge, images, lam, q).items()}
  assert 0 < np.abs(got["probs"] - ref["probs"]).max() < 0.2  # quantised: close, not equal
  assert (got["pred"] == ref["pred"]).mean() >= 0.8
  before = OnnxEdge(out).digest
  assert cli.main(["export", "--edge", EDGE, "--out", str(out), "--int8", "synthetic:4"]) == 2
  assert "--overwrite" in capsys.readouterr().err and OnnxEdge(out).digest == before
