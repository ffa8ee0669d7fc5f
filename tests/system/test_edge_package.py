"""rcst-edge, the JAX-free edge: installed alone into a fresh venv (no JAX,
no Flax, no rcst_jax), it classifies image files against `rcst serve` with the
exported demo edge exactly as the in-process `rcst run` does."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from support import REPO, WEIGHTS, image_files

from rcst_edge import deployment, onnx_format
from rcst_edge.onnx_edge import OnnxEdge
from rcst_jax import cli
from rcst_jax.models.checkpoints import load_model
from rcst_jax.serving.service import RcstServer, ServeOptions

ONNX = os.path.join(WEIGHTS, "demo_edge.onnx")
SAME = ("prediction", "accepted_on_edge", "edge_prediction", "aps_set", "patches_sent",
        "sent_indices", "bytes_sent", "status", "codec")


@pytest.fixture(scope="module")
def edge_venv(tmp_path_factory):
  root = tmp_path_factory.mktemp("edge")
  venv, src = root / "venv", root / "src"
  # Built from a copy: a build in edge/ itself would leave build/ in the checkout.
  shutil.copytree(os.path.join(REPO, "edge"), src,
                  ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
  pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
         "--disable-pip-version-check", "-c", os.path.join(REPO, "constraints.txt")]
  r = subprocess.run([*pip, str(src)], capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  return venv


@pytest.fixture(scope="module")
def demo_served():
  srv = RcstServer(load_model(os.path.join(WEIGHTS, "demo_server")), "127.0.0.1:0",
                   ServeOptions(batch=8))
  yield srv
  srv.stop(0)


def test_the_edge_venv_has_no_jax(edge_venv):
  code = ("import importlib.util as u, rcst_edge.cli, onnxruntime; "
          "print([m for m in ('jax', 'jaxlib', 'flax', 'rcst_jax', 'torch') if u.find_spec(m)])")
  r = subprocess.run([str(edge_venv / "bin" / "python"), "-c", code], capture_output=True,
                     text=True, timeout=120, cwd=str(edge_venv))
  assert r.returncode == 0 and r.stdout.strip() == "[]", (r.stdout, r.stderr)


def test_rcst_edge_answers_as_rcst_run(edge_venv, demo_served, calibration, tmp_path, capsys):
  paths = image_files(tmp_path, n=12)
  point = ["--calibration", str(calibration), "--tau", "0.4", "--codec", "jpeg420:50",
           "--server", demo_served.address]
  capsys.readouterr()
  assert cli.main(["run", "--edge", f"{WEIGHTS}/demo_edge", *point, *paths]) == 0
  want = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
  r = subprocess.run([str(edge_venv / "bin" / "rcst-edge"), "--edge", ONNX, *point, *paths],
                     capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
  assert r.returncode == 0, r.stderr
  got = [json.loads(x) for x in r.stdout.strip().splitlines()]
  assert [g["image"] for g in got] == paths
  for a, b in zip(want, got):
    assert {k: a[k] for k in SAME} == {k: b[k] for k in SAME}, (a, b)
    assert abs(a["p_max"] - b["p_max"]) <= 1e-5
  assert {g["status"] for g in got} == {"edge", "server"}  # both kinds of decision seen
  assert "calibrated with the JAX edge of these weights" in r.stderr


def test_an_edge_file_of_other_weights_is_refused_naming_both(calibration):
  edge = OnnxEdge(ONNX)
  fields = deployment.load_sealed(calibration)
  assert edge.check_calibrated(fields, "cal.json") is False  # the same weights, not this file
  other = dict(fields, edge_digest="blake2b:" + "0" * 64)
  with pytest.raises(onnx_format.EdgeFileError) as e:
    edge.check_calibrated(other, "cal.json")
  assert edge.meta["edge_digest"] in str(e.value) and "blake2b:" + "0" * 64 in str(e.value)
  with pytest.raises(onnx_format.EdgeFileError, match="not the edge cal.json was calibrated"):
    edge.check_calibrated(dict(fields, edge_onnx_digest="sha256:" + "1" * 64), "cal.json")
  assert edge.check_calibrated(dict(fields, edge_onnx_digest=edge.digest), "cal.json") is True


def test_a_file_that_is_not_an_exported_edge_is_refused(tmp_path):
  bad = tmp_path / "x.onnx"
  bad.write_bytes(b"not onnx")
  with pytest.raises(onnx_format.EdgeFileError, match="cannot load"):
    OnnxEdge(bad)
  with pytest.raises(ValueError, match="images must be uint8"):
    OnnxEdge(ONNX)(np.zeros((2, 100, 100, 3), np.uint8), deployment.OperatingPoint(0.5, 0.9, 0.5))
