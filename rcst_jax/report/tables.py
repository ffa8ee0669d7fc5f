"""Operating points, latency and the paper's Tables 1-2 from sweep results.

Input is the sweep engine's list of operating points: one dict per
(method, threshold) with `accuracy` (fraction), `cost` (patch-count ratio,
the paper's measure), `cost_bytes` (exact payload ratio) and diagnostics.
`server_only` and `edge_only` are reference rows, never candidates.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

from rcst_edge.payload.geometry import Geometry
from rcst_jax.core.fileio import atomic_open, atomic_write_text
from rcst_jax.inference import methods
from rcst_jax.report.styles import DISPLAY_NAMES, SHORT_NAMES
from rcst_jax.sweep.metrics import codecs_in, for_codec  # noqa: F401 (re-exported)

REFERENCES = tuple(m.name for m in methods.ALL_METHODS if m.reference)
# The method table's order; methods not listed follow in order of first appearance.
METHOD_ORDER = tuple(m.name for m in methods.ALL_METHODS if not m.reference)
# Methods whose single point is their operating point in both settings of
# Table 1 (chosen before the test set is seen, not read off it).
SINGLE_POINT = ("certified",)
RESULT_KEYS = (
    "method", "param_name", "param", "codec", "deployed", "accuracy", "cost", "cost_bytes",
    "offload_rate", "mean_patches", "edge_risk", "alpha_crc",
    "aps_set_size", "aps_coverage", "n",
)
FULL_IMAGE_BYTES = Geometry().raw_bytes  # 150,528 B: 8-bit RGB at 224 x 224
RATES_MBPS = (1, 8, 20)
# Accuracies are count ratios; this absorbs float error in `server - gap`
# (0.818 - 0.01 == 0.80799999...).
_EPS = 1e-9


def display_name(method: str, names: dict | None = None) -> str:
  return (names or DISPLAY_NAMES).get(method, method)


def methods_in(points) -> list[str]:
  """Non-reference methods present, in the paper's order."""
  seen = [p["method"] for p in points if p["method"] not in REFERENCES]
  known = [m for m in METHOD_ORDER if m in seen]
  return known + [m for m in dict.fromkeys(seen) if m not in METHOD_ORDER]


def reference_point(points, method: str = "server_only") -> dict | None:
  return next((p for p in points if p["method"] == method), None)


def server_accuracy(points, server_only_accuracy: float | None = None) -> float:
  """The given accuracy, else the `server_only` row's."""
  if server_only_accuracy is not None:
    return float(server_only_accuracy)
  ref = reference_point(points)
  if ref is None or ref.get("accuracy") is None:
    raise ValueError("server_only_accuracy not given and no server_only point in results")
  return float(ref["accuracy"])


def server_cost(points, cost_key: str = "cost") -> float:
  """Server-only cost: its row's value when reported, else 1 by definition."""
  ref = reference_point(points)
  value = None if ref is None else ref.get(cost_key)
  return 1.0 if value is None else float(value)


def usable(point, cost_key: str) -> bool:
  """Has both accuracy and the chosen cost (diagnostic rows may lack them)."""
  acc, cost = point.get("accuracy"), point.get(cost_key)
  return acc is not None and cost is not None and not (math.isnan(acc) or math.isnan(cost))


def best_point(points, cost_key: str = "cost") -> dict | None:
  """Highest accuracy; ties -> lowest cost (then first listed)."""
  pts = [p for p in points if usable(p, cost_key)]
  return min(pts, key=lambda p: (-p["accuracy"], p[cost_key]), default=None)


def cheapest_within(points, floor: float, cost_key: str = "cost") -> dict | None:
  """Lowest cost with accuracy >= floor; ties -> higher accuracy."""
  pts = [p for p in points if usable(p, cost_key) and p["accuracy"] >= floor - _EPS]
  return min(pts, key=lambda p: (p[cost_key], -p["accuracy"]), default=None)


def operating_points(points, server_only_accuracy: float | None = None,
                     gap: float = 0.01, cost_key: str = "cost") -> dict:
  """Table 1's two settings per method: {method: {"best", "within_gap"}}.

  "best": highest-accuracy point. "within_gap": cheapest point whose accuracy
  is at least server-only minus `gap` (a fraction: 0.01 = 1 pp). Either is
  None when the method has no qualifying point. `cost_key` picks the cost
  measure ("cost": patch-count ratio as in the paper; "cost_bytes": exact
  payload ratio).
  """
  floor = server_accuracy(points, server_only_accuracy) - gap
  out = {}
  for method in methods_in(points):
    pts = [p for p in points if p["method"] == method]
    if method in SINGLE_POINT and len(pts) == 1:
      out[method] = {"best": pts[0], "within_gap": pts[0]}
      continue
    out[method] = {"best": best_point(pts, cost_key),
                   "within_gap": cheapest_within(pts, floor, cost_key)}
  return out


def latency_ms(cost, rate_mbps, full_image_bytes: int = FULL_IMAGE_BYTES,
               convention: str = "paper"):
  """Upload latency in ms of `cost` x a full image at `rate_mbps` Mb/s.

  "paper" (Table 2): the image is counted in KiB as kilobits x 8 and the rate
  in Mb/s read as 1000 kb/s, so latency = cost * (bytes / 1024) * 8 / rate ms:
  150,528 B = 147 KiB -> 1176 ms at 1 Mb/s, 147 at 8, 58.8 at 20.
  "si": bits / (rate * 1e6) s, i.e. cost * bytes * 8 / (rate * 1e3) ms
  (1204.22 ms at 1 Mb/s), 2.4% above the paper's numbers.
  Works elementwise on arrays.
  """
  cost, rate = np.asarray(cost, np.float64), np.asarray(rate_mbps, np.float64)
  if convention == "paper":
    out = cost * (full_image_bytes / 1024) * 8 / rate
  elif convention == "si":
    out = cost * full_image_bytes * 8 / (rate * 1e3)
  else:
    raise ValueError(f"convention must be 'paper' or 'si', got {convention!r}")
  return float(out) if out.ndim == 0 else out


# ---- Markdown ---------------------------------------------------------------

def _fmt(x, spec: str = ".2f", scale: float = 1.0) -> str:
  return "--" if x is None else format(x * scale, spec)


def _bold_where(cells: list[str], pick) -> list[str]:
  """Bolds every cell whose (formatted) value equals pick(values)."""
  values = [float(c) for c in cells if c != "--"]
  if not values:
    return cells
  target = format(pick(values), ".2f")
  return [f"**{c}**" if c == target else c for c in cells]


def _row(cells) -> str:
  return "| " + " | ".join(cells) + " |"


def _gap_label(gap: float) -> str:
  return f"Within {gap * 100:g} pp"


def table1_markdown(points, server_only_accuracy: float | None = None,
                    gap: float = 0.01, cost_key: str = "cost",
                    bold: bool = True, names: dict | None = None) -> str:
  """Table 1: per method, cost and accuracy at "best" and "within gap".

  Bold marks the lowest cost and highest accuracy among the methods in each
  setting (the server-only row is the reference, never bolded).
  """
  server_acc = server_accuracy(points, server_only_accuracy)
  ops = operating_points(points, server_acc, gap, cost_key)
  methods = list(ops)
  columns = []  # one list of cells per (setting, field)
  for setting in ("best", "within_gap"):
    pts = [ops[m][setting] for m in methods]
    cost = [_fmt(None if p is None else p[cost_key]) for p in pts]
    acc = [_fmt(None if p is None else p["accuracy"], scale=100) for p in pts]
    if bold:
      cost, acc = _bold_where(cost, min), _bold_where(acc, max)
    columns += [cost, acc]
  label = _gap_label(gap)
  lines = [
      _row(["Method", "Best Acc.: Cost", "Best Acc.: Acc. (%)",
            f"{label}: Cost", f"{label}: Acc. (%)"]),
      _row(["---"] + ["---:"] * 4),
  ]
  for i, m in enumerate(methods):
    lines.append(_row([display_name(m, names)] + [col[i] for col in columns]))
  ref = _fmt(server_cost(points, cost_key)), _fmt(server_acc, scale=100)
  lines.append(_row([display_name("server_only", names), *ref, *ref]))
  return "\n".join(lines) + "\n"


def table_codecs_markdown(points, gap: float = 0.01, names: dict | None = None) -> str:
  """Table 1's byte columns per codec: each method's cheapest point in exact
  payload bytes (over a raw image's bytes) whose accuracy, with the patches
  the server decoded, is within ``gap`` of server-only on raw patches.

  One column pair (bytes, accuracy) per codec; the server-only row last,
  every patch coded by each codec. Certified shows its one point under the
  codec it was certified with.
  """
  server_acc = server_accuracy(for_codec(points, "raw"))
  codecs = codecs_in(points)
  per_codec = {c: operating_points(for_codec(points, c), server_acc, gap, "cost_bytes")
               for c in codecs}
  methods = list(dict.fromkeys(m for ops in per_codec.values() for m in ops))
  label = _gap_label(gap)
  lines = [_row(["Method"] + [f"{c}: {h}" for c in codecs for h in ("Bytes", "Acc. (%)")]),
           _row(["---"] + ["---:"] * (2 * len(codecs)))]
  for m in methods:
    cells = []
    for c in codecs:
      p = per_codec[c].get(m, {}).get("within_gap")
      if m == "certified" and p is not None and p.get("codec") != c:
        p = None  # its one point belongs to its own codec's column
      cells += [_fmt(None if p is None else p["cost_bytes"], ".4f"),
                _fmt(None if p is None else p["accuracy"], scale=100)]
    lines.append(_row([display_name(m, names)] + cells))
  cells = []  # server-only sends every patch, coded by each codec
  for c in codecs:
    ref = reference_point(for_codec(points, c))
    cells += [_fmt(None if ref is None else ref["cost_bytes"], ".4f"),
              _fmt(None if ref is None else ref["accuracy"], scale=100)]
  lines.append(_row([display_name("server_only", names)] + cells))
  return (f"Exact payload bytes / raw image bytes ({FULL_IMAGE_BYTES:,} B) at each "
          f"method's cheapest point {label.lower()} of server-only, per codec\n\n"
          + "\n".join(lines) + "\n")


def table2_codecs_markdown(points, gap: float = 0.01, rates=RATES_MBPS,
                           convention: str = "paper", names: dict | None = None) -> str:
  """Table 2 per codec: upload latency from the exact bytes sent."""
  server_acc = server_accuracy(for_codec(points, "raw"))
  parts = []
  for c in codecs_in(points):
    parts.append(f"Codec {c}\n\n" + table2_markdown(
        for_codec(points, c), server_acc, gap, "cost_bytes", rates, convention=convention,
        names=names))
  return "\n".join(parts)


def table2_markdown(points, server_only_accuracy: float | None = None,
                    gap: float = 0.01, cost_key: str = "cost",
                    rates=RATES_MBPS, methods=None, convention: str = "paper",
                    full_image_bytes: int = FULL_IMAGE_BYTES, bold: bool = True,
                    names: dict | None = None) -> str:
  """Table 2: accuracy and upload latency (ms) for settings (a) and (b).

  (a) = each method's best-accuracy point, (b) = its cheapest point within
  `gap` of server-only. `methods` restricts the rows (the paper shows only
  Att-Sum and Proposed); default: all. Bold marks the lowest latency among
  the methods per rate.
  """
  names = names or SHORT_NAMES
  server_acc = server_accuracy(points, server_only_accuracy)
  ops = operating_points(points, server_acc, gap, cost_key)
  methods = [m for m in (methods or ops) if m in ops]
  lat = lambda c, r: latency_ms(c, r, full_image_bytes, convention)
  ref_cost = server_cost(points, cost_key)
  lines = [
      _row(["Setting", "Method", "Acc. (%)"] + [f"{r:g} Mb/s" for r in rates]),
      _row(["---", "---"] + ["---:"] * (1 + len(rates))),
  ]
  for tag, setting in (("(a)", "best"), ("(b)", "within_gap")):
    pts = [ops[m][setting] for m in methods]
    per_rate = []
    for r in rates:
      cells = [_fmt(None if p is None else lat(p[cost_key], r)) for p in pts]
      per_rate.append(_bold_where(cells, min) if bold else cells)
    ref = [_fmt(lat(ref_cost, r)) for r in rates]
    lines.append(_row([tag, display_name("server_only", names),
                       _fmt(server_acc, scale=100), *ref]))
    for i, (m, p) in enumerate(zip(methods, pts)):
      acc = _fmt(None if p is None else p["accuracy"], scale=100)
      lines.append(_row(["", display_name(m, names), acc] + [c[i] for c in per_rate]))
  return "\n".join(lines) + "\n"


# ---- Files ------------------------------------------------------------------

def _plain(x):
  """JSON-safe scalar: numpy -> Python, NaN/inf -> None (strict JSON has no NaN)."""
  if isinstance(x, np.generic):
    x = x.item()
  if isinstance(x, float) and not math.isfinite(x):
    return None
  return x


def result_columns(points) -> list[str]:
  """Schema keys first (in schema order), then any extras sorted."""
  keys = {k for p in points for k in p}
  return [k for k in RESULT_KEYS if k in keys] + sorted(keys - set(RESULT_KEYS))


def write_results(points, out_dir) -> tuple[Path, Path]:
  """Writes results.json and results.csv under out_dir; returns both paths.

  CSV: one row per point, every key as a column; None is an empty cell.
  """
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  cols = result_columns(points)
  rows = [{k: _plain(p.get(k)) for k in cols} for p in points]
  json_path, csv_path = out / "results.json", out / "results.csv"
  atomic_write_text(str(json_path), json.dumps(rows, indent=1) + "\n")
  with atomic_open(str(csv_path), "w") as f:
    writer = csv.DictWriter(f, fieldnames=cols, lineterminator="\r\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows)
  return json_path, csv_path


def dtype_comparison(points_a, points_b, name_a: str, name_b: str) -> str:
  """Markdown: accuracy and cost of every operating point under two compute dtypes."""
  lines = [f"| method | param | acc {name_a} (%) | acc {name_b} (%) | diff (pp) | "
           f"cost {name_a} | cost {name_b} |", "|---|---|---|---|---|---|---|"]
  for a, b in zip(points_a, points_b):
    assert (a["method"], a["param"]) == (b["method"], b["param"])
    param = "" if a["param"] is None else f"{a['param_name']}={a['param']:g}"
    lines.append(f"| {a['method']} | {param} | {100 * a['accuracy']:.2f} | "
                 f"{100 * b['accuracy']:.2f} | {100 * (b['accuracy'] - a['accuracy']):+.2f} | "
                 f"{a['cost']:.3f} | {b['cost']:.3f} |")
  return "\n".join(lines)


# The paper's Table 1 (cost, top-1 %), quoted for comparison, never recomputed.
PAPER_TABLE1 = {"server_only": (1.00, 81.80), "best": (0.33, 81.60), "within_gap": (0.26, 81.05)}


def paper_comparison_markdown(points, paper=PAPER_TABLE1, cost_key: str = "cost") -> str:
  """Server-only and the proposed method's two settings: the paper next to this run."""
  ops = operating_points(points, cost_key=cost_key).get("proposed", {})
  ours = {"server_only": reference_point(points), "best": ops.get("best"),
          "within_gap": ops.get("within_gap")}
  label = {"server_only": "Server-only", "best": "Proposed, best accuracy",
           "within_gap": "Proposed, within 1 pp"}
  rows = [_row(["Setting", "paper cost", "paper acc. (%)", "this run cost",
                "this run acc. (%)"]), _row(["---"] * 5)]
  for key in ("server_only", "best", "within_gap"):
    p = ours[key]
    mine = ["-", "-"] if p is None else [_fmt(p.get(cost_key, 1.0)), _fmt(p["accuracy"], scale=100)]
    rows.append(_row([label[key], _fmt(paper[key][0]), _fmt(paper[key][1]), *mine]))
  return "\n".join(rows) + "\n"
