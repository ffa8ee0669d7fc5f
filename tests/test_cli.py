"""`rcst calibrate`, `rcst run` (Algorithm 2 per image) and `rcst explain` on
the shipped demo models and synthetic images written as files."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from rcst_jax import cli
from rcst_jax.inference import payload
from rcst_jax.data.synthetic import SyntheticShapes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTS = os.path.join(REPO, "weights")


@pytest.fixture(scope="module")
def calibration(demo_smoke, tmp_path_factory):
  """`rcst calibrate` on the smoke demo's cache: Algorithm 1 and the certificate's
  calibration outcomes are cached there, so no model may run."""
  from rcst_jax.sweep import engine

  def refuse(*a, **k):
    raise AssertionError("rcst calibrate ran a model although the evaluation cache has it all")
  path = tmp_path_factory.mktemp("cal") / "cal.json"
  with pytest.MonkeyPatch.context() as m:
    for obj, name in ((engine.offline, "algorithm1"), (engine.pipeline, "edge_step"),
                      (engine.pipeline.Server, "logits_from_images")):
      m.setattr(obj, name, refuse)
    assert cli.main(["calibrate", "--config", "demo:smoke", f"--config.output_dir={demo_smoke[0]}",
                     "--out", str(path)]) == 0
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
    assert r["accepted_on_edge"] == (r["p_max"] >= lam)
    if r["accepted_on_edge"]:
      assert r["patches_sent"] == 0 and r["bytes_sent"] == 0
    else:
      assert r["patches_sent"] >= 1
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
