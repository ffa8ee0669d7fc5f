"""`rcst demo` at smoke size, with the shipped demo weights: the README's first
command runs the same code on more images."""

import json


def test_demo_smoke(demo_smoke):
  out, printed = demo_smoke  # tests/conftest.py runs `rcst demo --config demo:smoke`
  assert "demo finished" in printed and "| Proposed |" in printed
  for name in ("results.json", "results.csv", "table1.md", "table2.md", "figure1.png",
               "figure2.png", "gallery.png", "calibration.json", "summary.json"):
    assert (out / name).stat().st_size > 0, name
  points = json.loads((out / "results.json").read_text())
  assert {p["method"] for p in points} == {"server_only", "edge_only", "proposed", "random",
                                           "topk", "attention_sum", "certified"}
  assert all(p["n"] == 48 for p in points)
  cal = json.loads((out / "calibration.json").read_text())
  assert cal["n"] == 200 and cal["lambda_valid"] and cal["dataset"] == "synthetic"
  # The demo certifies (or falls back to server-only) with a whole-system certificate.
  cert = cal["certificate"]
  assert cert["n_fit"] + cert["n_test"] == 200 and cert["epsilon"] == 0.02
  # The shipped models are real: far better than chance (1/12) on the server.
  server = next(p for p in points if p["method"] == "server_only")
  assert server["accuracy"] > 0.4
