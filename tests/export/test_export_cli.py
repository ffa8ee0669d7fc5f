"""`rcst export` where the converter is missing (the main venv): one line that
names the package and the make target, before any model loads."""

import os
import sys

from rcst_jax import cli

EDGE = os.path.join(os.path.dirname(__file__), "..", "..", "weights", "demo_edge")


def test_missing_converter_names_package_and_target(tmp_path, capsys, monkeypatch):
  monkeypatch.setitem(sys.modules, "jax2onnx", None)  # import jax2onnx -> ImportError
  out = tmp_path / "edge.onnx"
  assert cli.main(["export", "--edge", EDGE, "--out", str(out)]) == 2
  err = capsys.readouterr().err
  assert err.startswith("rcst export: error:") and err.count("\n") == 1, err
  assert "jax2onnx" in err and "make export-env" in err, err
  assert not out.exists()
