"""Operating points, latency convention and Tables 1-2 against the paper."""

import csv
import json
import math

import numpy as np
import pytest

from rcst_jax.inference import methods
from rcst_jax.report import styles, tables

SERVER = 0.818


def test_every_method_has_one_style_in_table_order():
  """report/styles.py shows every method of inference/methods.py, in its table order."""
  assert list(styles.STYLES) == [m.name for m in methods.ALL_METHODS]
  assert tables.display_name("attention_sum") == "Attention Sum"
  assert tables.SHORT_NAMES["attention_sum"] == "Att-Sum"
  assert set(styles.MARKERS) == {m.name for m in methods.ALL_METHODS if not m.reference}


def pt(method, cost, acc, **kw):
  base = {k: None for k in tables.RESULT_KEYS}
  base.update(method=method, cost=cost, accuracy=acc, cost_bytes=cost, n=40000)
  base.update(kw)
  return base


def paper_points():
  """Sweeps whose operating points are the paper's Tables 1-2."""
  return [
      pt("server_only", 1.0, SERVER),
      pt("edge_only", 0.0, 0.77),
      pt("proposed", 0.3327, 0.8160, param_name="tau", param=0.2),
      pt("proposed", 0.2579, 0.8105, param_name="tau", param=0.3),
      pt("proposed", 0.20, 0.7900, param_name="tau", param=0.4),
      pt("random", 0.43, 0.8107, param_name="k", param=84.0),
      pt("random", 0.39, 0.8086, param_name="k", param=76.0),
      pt("random", 0.30, 0.7900, param_name="k", param=59.0),
      pt("topk", 0.50, 0.8107, param_name="k", param=98.0),  # ties best acc, dearer
      pt("topk", 0.43, 0.8107, param_name="k", param=84.0),
      pt("topk", 0.35, 0.8082, param_name="k", param=69.0),
      pt("attention_sum", 0.428, 0.8106, param_name="delta_sum", param=0.9),
      pt("attention_sum", 0.3236, 0.8084, param_name="delta_sum", param=0.8),
  ]


def test_operating_points_paper_table1():
  ops = tables.operating_points(paper_points(), SERVER)
  assert list(ops) == ["random", "topk", "attention_sum", "proposed"]  # refs excluded
  got = {m: ((o["best"]["cost"], o["best"]["accuracy"]),
             (o["within_gap"]["cost"], o["within_gap"]["accuracy"])) for m, o in ops.items()}
  assert got == {
      "random": ((0.43, 0.8107), (0.39, 0.8086)),
      "topk": ((0.43, 0.8107), (0.35, 0.8082)),
      "attention_sum": ((0.428, 0.8106), (0.3236, 0.8084)),
      "proposed": ((0.3327, 0.8160), (0.2579, 0.8105)),
  }


def test_operating_points_ties_and_boundary():
  pts = [pt("a", 0.5, 0.80), pt("a", 0.4, 0.80), pt("a", 0.3, 0.75),
         pt("b", 0.2, 0.808), pt("b", 0.2, 0.809), pt("b", 0.1, 0.8079)]
  ops = tables.operating_points(pts, SERVER, gap=0.01)
  assert ops["a"]["best"]["cost"] == 0.4          # accuracy tie -> cheaper
  assert ops["a"]["within_gap"] is None           # 0.80 < 0.808
  assert ops["b"]["within_gap"]["accuracy"] == 0.809  # cost tie -> more accurate
  # Exactly at the floor qualifies despite 0.818 - 0.01 < 0.808 in binary.
  only_floor = tables.operating_points([pt("c", 0.2, 0.808)], SERVER)
  assert only_floor["c"]["within_gap"]["accuracy"] == 0.808


def test_operating_points_cost_key_and_server_from_points():
  pts = [pt("server_only", 1.0, 0.8),
         pt("m", 0.30, 0.795, cost_bytes=0.40), pt("m", 0.35, 0.796, cost_bytes=0.33)]
  by_bytes = tables.operating_points(pts, cost_key="cost_bytes")  # server acc from points
  by_count = tables.operating_points(pts, cost_key="cost")
  assert by_bytes["m"]["within_gap"]["cost_bytes"] == 0.33
  assert by_count["m"]["within_gap"]["cost"] == 0.30
  with pytest.raises(ValueError):
    tables.operating_points([pt("m", 0.3, 0.8)])


def test_operating_points_skip_missing_values():
  pts = [pt("m", None, 0.9), pt("m", 0.2, float("nan")), pt("m", 0.3, 0.7)]
  assert tables.operating_points(pts, SERVER)["m"]["best"]["cost"] == 0.3


def test_latency_paper_convention():
  np.testing.assert_allclose(tables.latency_ms(1.0, np.array([1, 8, 20])),
                             [1176.0, 147.0, 58.8], rtol=1e-12)
  assert tables.latency_ms(0.26, 1) == pytest.approx(0.26 * 1176) == pytest.approx(305.76)
  # Table 2's latencies divided by 1176 ms give back the costs.
  assert 503.33 / 1176 == pytest.approx(0.428, abs=5e-6)
  for cost, row in [(0.428, (503.33, 62.92, 25.17)), (0.3327, (391.26, 48.91, 19.56)),
                    (0.3236, (380.55, 47.57, 19.03)), (0.2579, (303.29, 37.91, 15.16))]:
    assert [f"{tables.latency_ms(cost, r):.2f}" for r in (1, 8, 20)] == [f"{v:.2f}" for v in row]


def test_latency_si_convention():
  assert tables.latency_ms(1.0, 1, convention="si") == pytest.approx(1204.224)
  with pytest.raises(ValueError):
    tables.latency_ms(1.0, 1, convention="bogus")


def test_table1_markdown():
  md = tables.table1_markdown(paper_points(), SERVER)
  lines = md.splitlines()
  assert lines[0] == ("| Method | Best Acc.: Cost | Best Acc.: Acc. (%) | "
                      "Within 1 pp: Cost | Within 1 pp: Acc. (%) |")
  assert "| Random | 0.43 | 81.07 | 0.39 | 80.86 |" in lines
  assert "| Attention Sum | 0.43 | 81.06 | **0.32** | 80.84 |" not in lines  # 0.26 is min
  assert "| Attention Sum | 0.43 | 81.06 | 0.32 | 80.84 |" in lines
  assert "| Proposed | **0.33** | **81.60** | **0.26** | **81.05** |" in lines
  assert lines[-1] == "| Server-only | 1.00 | 81.80 | 1.00 | 81.80 |"
  assert len(lines) == 2 + 4 + 1


def test_table1_no_qualifying_point():
  pts = [pt("server_only", 1.0, SERVER), pt("weak", 0.2, 0.70), pt("proposed", 0.3, 0.81)]
  md = tables.table1_markdown(pts, bold=False)
  assert "| weak | 0.20 | 70.00 | -- | -- |" in md.splitlines()


def test_table2_markdown_reproduces_paper():
  md = tables.table2_markdown(paper_points(), SERVER, methods=["attention_sum", "proposed"])
  lines = md.splitlines()
  assert lines[0] == "| Setting | Method | Acc. (%) | 1 Mb/s | 8 Mb/s | 20 Mb/s |"
  assert lines[2:] == [
      "| (a) | Server-only | 81.80 | 1176.00 | 147.00 | 58.80 |",
      "|  | Att-Sum | 81.06 | 503.33 | 62.92 | 25.17 |",
      "|  | Proposed | 81.60 | **391.26** | **48.91** | **19.56** |",
      "| (b) | Server-only | 81.80 | 1176.00 | 147.00 | 58.80 |",
      "|  | Att-Sum | 80.84 | 380.55 | 47.57 | 19.03 |",
      "|  | Proposed | 81.05 | **303.29** | **37.91** | **15.16** |",
  ]


def test_table2_all_methods_and_missing():
  pts = paper_points() + [pt("weak", 0.1, 0.5)]
  lines = tables.table2_markdown(pts, SERVER).splitlines()
  assert sum(l.startswith("|  | Random |") for l in lines) == 2
  assert "|  | weak | -- | -- | -- | -- |" in lines


def _read_csv(path):
  """results.csv read back by hand: an empty cell is None, numbers typed back."""
  def cell(text):
    if text == "":
      return None
    for cast in (int, float):
      try:
        return cast(text)
      except ValueError:
        pass
    return text
  with open(path, newline="") as f:
    return [{k: cell(v) for k, v in row.items()} for row in csv.DictReader(f)]


def test_write_results_round_trip(tmp_path):
  pts = paper_points()
  pts[2] = {**pts[2], "edge_risk": np.float64(0.049), "n": np.int64(40000),
            "aps_coverage": float("nan"), "extra_note": "x"}
  json_path, csv_path = tables.write_results(pts, tmp_path / "out")
  header = csv_path.read_text().splitlines()[0].split(",")
  assert header == list(tables.RESULT_KEYS) + ["extra_note"]
  expect = [{k: p.get(k) for k in header} for p in pts]
  expect[2]["aps_coverage"] = None  # non-finite -> null
  expect[2]["edge_risk"], expect[2]["n"] = 0.049, 40000
  for back in (json.loads(json_path.read_text()), _read_csv(csv_path)):
    assert back == expect
    assert type(back[2]["n"]) is int and type(back[2]["edge_risk"]) is float
  assert not any(isinstance(v, float) and math.isnan(v) for r in back for v in r.values())


def test_paper_comparison_quotes_the_paper_and_this_run():
  points = [{"method": "server_only", "param": None, "accuracy": 0.8, "cost": 1.0},
            {"method": "proposed", "param": 0.3, "accuracy": 0.805, "cost": 0.4},
            {"method": "proposed", "param": 0.6, "accuracy": 0.795, "cost": 0.2}]
  rows = tables.paper_comparison_markdown(points).splitlines()
  assert rows[2] == "| Server-only | 1.00 | 81.80 | 1.00 | 80.00 |"
  assert rows[3] == "| Proposed, best accuracy | 0.33 | 81.60 | 0.40 | 80.50 |"
  assert rows[4] == "| Proposed, within 1 pp | 0.26 | 81.05 | 0.20 | 79.50 |"


def _codec_points():
  """Two codecs: JPEG loses 1.5 pp at tau=0.3, so its within-1pp point moves to tau=0.2."""
  pts = []
  for codec, scale, drop in (("raw", 1.0, 0.0), ("jpeg:75", 0.1, 0.015)):
    pts += [pt("server_only", 1.0, SERVER, codec=codec, cost_bytes=1.0002 * scale),
            pt("proposed", 0.33, 0.816, codec=codec, param_name="tau", param=0.2,
               cost_bytes=0.33 * scale),
            pt("proposed", 0.26, 0.8105 - drop, codec=codec, param_name="tau", param=0.3,
               cost_bytes=0.26 * scale),
            pt("certified", 0.30, 0.812 - drop, codec=codec, param_name="tau", param=0.25,
               cost_bytes=0.30 * scale, deployed=codec == "jpeg:75")]
  return pts


def test_for_codec_keeps_the_deployed_certified_point():
  pts = _codec_points()
  raw = tables.for_codec(pts, "raw")
  assert [p["method"] for p in raw] == ["server_only", "proposed", "proposed", "certified"]
  assert raw[-1]["codec"] == "jpeg:75"  # the certified point is the one its certificate covers
  assert tables.codecs_in(pts) == ["raw", "jpeg:75"]


def test_table_codecs_per_codec_within_gap_and_server_row():
  text = tables.table_codecs_markdown(_codec_points())
  rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
          for line in text.splitlines() if line.startswith("| ") and "---" not in line}
  assert rows["Method"] == ["raw: Bytes", "raw: Acc. (%)", "jpeg:75: Bytes", "jpeg:75: Acc. (%)"]
  # raw: tau=0.3 is within 1 pp (81.05 >= 80.80); jpeg: 79.55 is not, so tau=0.2 at 0.033.
  assert rows["Proposed"] == ["0.2600", "81.05", "0.0330", "81.60"]
  # Certified: its one point, in its own codec's column only.
  assert rows["Certified (LTT)"] == ["--", "--", "0.0300", "79.70"]
  assert rows["Server-only"] == ["1.0002", "81.80", "0.1000", "81.80"]


def test_table2_codecs_latency_from_exact_bytes():
  text = tables.table2_codecs_markdown(_codec_points())
  assert text.index("Codec raw") < text.index("Codec jpeg:75")
  jpeg = text[text.index("Codec jpeg:75"):]
  # Server-only with JPEG: 0.10002 x 147 KiB x 8 / 1 Mb/s (the paper's convention).
  assert f"{0.1 * 1.0002 * 150528 / 1024 * 8:.2f}" in jpeg
