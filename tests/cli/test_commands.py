"""`rcst calibrate`, `rcst run` (Algorithm 2 per image) and `rcst explain` on
the shipped demo models and synthetic images written as files."""

import json

import numpy as np
import paper_rules
import pytest
from PIL import Image
from support import WEIGHTS, image_files

from rcst_edge.payload import message as payload
from rcst_jax import cli
from rcst_jax.calibration import certificate
from rcst_jax.calibration.artifact import Calibration


def test_calibrate_writes_artifact(calibration, demo_smoke):
  cal = json.loads(calibration.read_text())
  assert cal["n"] == 200 and cal["alpha_crc"] == 0.05 and cal["alpha_aps"] == 0.05
  assert cal["lambda_valid"] and 0 < cal["lambda_hat"] <= 1 and cal["dataset"] == "synthetic"
  # The same artifact as the demo's own (another entry point, same cache).
  assert cal == json.loads((demo_smoke[0] / "calibration.json").read_text())
  assert cal["certificate"]["n_fit"] + cal["certificate"]["n_test"] == 200


def test_run_prints_per_image_decisions(calibration, tmp_path, capsys):
  paths = image_files(tmp_path)
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
  path = image_files(tmp_path, 1)[0]
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
  paths = image_files(tmp_path, 8)
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
