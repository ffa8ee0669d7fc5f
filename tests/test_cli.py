"""`rcst calibrate`, `rcst run` (Algorithm 2 per image) and `rcst explain` on
the shipped demo models and synthetic images written as files."""

import json
import os

import numpy as np
import paper_rules
import pytest
from PIL import Image

from rcst_jax import cli
from rcst_jax.calibration import certificate
from rcst_jax.calibration.artifact import Calibration
from rcst_jax.data.synthetic import SyntheticShapes
from rcst_jax.payload import message as payload

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTS = os.path.join(REPO, "weights")


def _refuse_model_calls(m):
  """Every model call `rcst calibrate` could make, refused where the library
  looks it up: Algorithm 1 (sweep.engine and sweep.certification call
  `algorithm1.algorithm1` on the module), the edge step (sweep.passes calls
  `edge_lib.edge_step`, and `edge_step_batched` for a certified view) and the
  server (`Server.logits_from_images`, the class sweep.passes instantiates)."""
  from rcst_jax.calibration import algorithm1
  from rcst_jax.inference import server
  from rcst_jax.sweep import certification, engine, passes

  def refuse(*a, **k):
    raise AssertionError("rcst calibrate ran a model although the evaluation cache has it all")
  assert engine.algorithm1 is algorithm1 and certification.algorithm1 is algorithm1
  assert passes.Server is server.Server
  for obj, name in ((algorithm1, "algorithm1"), (passes.edge_lib, "edge_step"),
                    (passes.edge_lib, "edge_step_batched"),
                    (server.Server, "logits_from_images")):
    m.setattr(obj, name, refuse)


@pytest.fixture(scope="module")
def calibration(demo_smoke, tmp_path_factory):
  """`rcst calibrate` on the smoke demo's cache: Algorithm 1 and the certificate's
  calibration outcomes are cached there, so no model may run."""
  path = tmp_path_factory.mktemp("cal") / "cal.json"
  with pytest.MonkeyPatch.context() as m:
    _refuse_model_calls(m)
    assert cli.main(["calibrate", "--config", "demo:smoke", f"--config.output_dir={demo_smoke[0]}",
                     "--out", str(path)]) == 0
    # The refusals bite: without the cache, Algorithm 1 is the first model call.
    empty = tmp_path_factory.mktemp("nocache")
    with pytest.raises(AssertionError, match="ran a model"):
      cli.main(["calibrate", "--config", "demo:smoke", f"--config.output_dir={empty}",
                "--out", str(empty / "cal.json")])
  return path


def test_calibrate_writes_artifact(calibration, demo_smoke):
  cal = json.loads(calibration.read_text())
  assert cal["n"] == 200 and cal["alpha_crc"] == 0.05 and cal["alpha_aps"] == 0.05
  assert cal["lambda_valid"] and 0 < cal["lambda_hat"] <= 1 and cal["dataset"] == "synthetic"
  # The same artifact as the demo's own (another entry point, same cache).
  assert cal == json.loads((demo_smoke[0] / "calibration.json").read_text())
  assert cal["certificate"]["n_fit"] + cal["certificate"]["n_test"] == 200


def _files(tmp_path, n=4):
  src = SyntheticShapes("test", n, seed=5)
  paths = []
  for i in range(n):
    p = tmp_path / f"img{i}.png"
    Image.fromarray(src[i].image).save(p)
    paths.append(str(p))
  return paths


def test_run_prints_per_image_decisions(calibration, tmp_path, capsys):
  paths = _files(tmp_path)
  bad = tmp_path / "bad.jpg"
  bad.write_bytes(b"nope")
  capsys.readouterr()
  assert cli.main(["run", "--edge", f"{WEIGHTS}/demo_edge", "--server",
                   f"{WEIGHTS}/demo_server", "--calibration", str(calibration), "--tau", "0.5",
                   *paths, str(bad)]) == 1  # one item failed, the others answered
  lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
  by_image = {r["image"]: r for r in lines}
  assert "error" in by_image[str(bad)]
  lam = json.loads(calibration.read_text())["lambda_hat"]
  for p in paths:
    r = by_image[p]
    assert r["accepted_on_edge"] == bool(paper_rules.accepts(r["p_max"], lam))
    if r["accepted_on_edge"]:
      assert r["patches_sent"] == 0 and r["bytes_sent"] == 0 and r["sent_indices"] == []
    else:
      assert r["patches_sent"] >= 1 and len(r["sent_indices"]) == r["patches_sent"]
      assert r["sent_indices"] == sorted(set(r["sent_indices"]))
      assert r["bytes_sent"] == payload.payload_bytes(r["patches_sent"])
    assert 0 <= r["prediction"] < 12 and isinstance(r["label"], str) and r["aps_set"]


def test_explain_writes_png(calibration, tmp_path, capsys):
  path = _files(tmp_path, 1)[0]
  out = tmp_path / "explain.png"
  assert cli.main(["explain", "--edge", f"{WEIGHTS}/demo_edge", "--calibration",
                   str(calibration), "--tau", "0.5", "--out", str(out), path]) == 0
  record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert record["out"] == str(out) and ("offloaded" in record["decision"] or
                                         "accepted" in record["decision"])
  assert Image.open(out).size[0] > 300 and np.asarray(Image.open(out)).std() > 0


def _json_lines(capsys):
  return [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]


@pytest.mark.parametrize("codec", ["raw", "jpeg420:50"])
def test_run_and_explain_without_tau_take_the_certified_decision(calibration, tmp_path,
                                                                   capsys, codec):
  """A calibration whose certificate certifies (lambda, tau, codec) with tau > 0:
  `rcst run` and `rcst explain` without --tau both apply that pair (and its
  q_hat), not the CRC lambda: the same acceptance, the same sent patch indices
  and the same payload bytes under the certified codec per image, some images
  offloaded and some accepted."""
  paths = _files(tmp_path, 8)
  edge = ["--edge", f"{WEIGHTS}/demo_edge"]
  # p_max does not depend on the thresholds: one run to place lambda among them.
  assert cli.main(["run", *edge, "--server", f"{WEIGHTS}/demo_server", "--calibration",
                   str(calibration), "--tau", "0.5", *paths]) == 0
  p_max = sorted(r["p_max"] for r in _json_lines(capsys))
  assert p_max[2] < p_max[-3], p_max  # distinct enough to split
  lam = float((p_max[2] + p_max[-3]) / 2)
  d = Calibration.from_json(calibration).to_dict()
  assert d["certificate"] is not None and lam != d["lambda_hat"]
  d["certificate"] = certificate.seal({  # a consistent certificate of a one-point grid
      **d["certificate"], "certified": True, "lambda_hat": lam, "tau": 0.4, "q_hat": 0.5,
      "p_value": 0.01, "lambda_grid": [lam], "tau_grid": [0.4], "codec": codec,
      "codec_grid": [codec], "grid_size": 1, "certified_count": 1})
  certified = tmp_path / "certified.json"
  Calibration.unsealed(d).to_json(certified)  # sealed anew as written
  point = Calibration.from_json(certified).operating_point()
  assert (point.lambda_hat, point.q_hat, point.tau, point.certified) == (lam, 0.5, 0.4, True)

  assert cli.main(["run", *edge, "--server", f"{WEIGHTS}/demo_server", "--calibration",
                   str(certified), *paths]) == 0
  ran = {r["image"]: r for r in _json_lines(capsys)}
  explained = {}
  for i, path in enumerate(paths):
    assert cli.main(["explain", *edge, "--calibration", str(certified), "--out",
                     str(tmp_path / f"x{i}.png"), path]) == 0
    explained[path] = _json_lines(capsys)[-1]
  for path in paths:
    r, x = ran[path], explained[path]
    assert x["p_max"] == r["p_max"]
    assert x["accepted_on_edge"] == r["accepted_on_edge"] == bool(
        paper_rules.accepts(r["p_max"], lam)), path
    assert x["sent_indices"] == r["sent_indices"], path
    assert len(r["sent_indices"]) == r["patches_sent"]
    assert x["codec"] == r["codec"] == codec
    assert x["bytes_sent"] == r["bytes_sent"], path
    if codec != "raw" and r["patches_sent"]:  # a coded payload, not the raw byte count
      assert r["bytes_sent"] < payload.payload_bytes(r["patches_sent"]), path
    assert ("certified pair" in x["decision"]) and ("tau=0.4" in x["decision"]
                                                    or x["accepted_on_edge"])
  decisions = [r["accepted_on_edge"] for r in ran.values()]
  assert any(decisions) and not all(decisions)
