"""`rcst demo` at smoke size, with the shipped demo weights: the README's first
command runs the same code on more images."""

import json

from rcst_jax.calibration.artifact import Calibration


def test_demo_smoke(demo_smoke):
  out, printed = demo_smoke  # tests/conftest.py runs `rcst demo --config demo:smoke`
  assert "demo finished" in printed and "| Proposed |" in printed
  for name in ("results.json", "results.csv", "table1.md", "table1_bytes.md", "table2.md",
               "table2_bytes.md", "figure1.png", "figure2.png", "accuracy_bytes.png",
               "gallery.png", "calibration.json", "summary.json"):
    assert (out / name).stat().st_size > 0, name
  # Byte-cost rows per codec are printed (the smoke sweeps raw and jpeg:75).
  assert "| raw: Bytes | raw: Acc. (%) | jpeg:75: Bytes |" in printed
  points = json.loads((out / "results.json").read_text())
  assert {p["method"] for p in points} == {"server_only", "edge_only", "proposed", "random",
                                           "topk", "attention_sum", "certified"}
  assert all(p["n"] == 48 for p in points)
  assert {p["codec"] for p in points} == {"raw", "jpeg:75"}
  # Every raw point has its JPEG twin: the same patches sent, fewer bytes once any are.
  raw = {(p["method"], p["param"]): p for p in points if p["codec"] == "raw"}
  for p in points:
    if p["codec"] == "jpeg:75":
      r = raw[(p["method"], p["param"])]
      assert p["cost"] == r["cost"]
      assert p["cost_bytes"] < r["cost_bytes"] or r["cost"] == 0
  cal = json.loads((out / "calibration.json").read_text())
  assert cal["n"] == 200 and cal["lambda_valid"] and cal["dataset"] == "synthetic"
  # Sealed whole (every field), and it loads as written.
  assert sorted(cal["seal"]["fields"]) == sorted(k for k in cal if k != "seal")
  assert Calibration.from_json(out / "calibration.json").n == 200
  # The demo certifies (or falls back to server-only) with a whole-system certificate.
  cert = cal["certificate"]
  assert cert["n_fit"] + cert["n_test"] == 200 and cert["epsilon"] == 0.02
  assert cert["codec_grid"] == ["jpeg:75"] and cert["cost"] == "bytes"
  # The shipped models are real: far better than chance (1/12) on the server.
  server = next(p for p in points if p["method"] == "server_only")
  assert server["accuracy"] > 0.4
