"""Figures 1-2 of the paper, a saliency gallery and the `rcst explain` panel.

Figures are built on `matplotlib.figure.Figure` with the Agg canvas, never
pyplot: no global backend switch, no display, nothing left open. Each
`build_*` returns the Figure (tests inspect its Axes); the plain-named
functions save it and return the path.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from rcst_jax.report import tables
from rcst_jax.report.styles import COLORS, MARKERS, SHORT_NAMES

DPI = 150


def _figure(**kwargs) -> Figure:
  # Constrained layout keeps long tick labels (class names) out of neighbours.
  fig = Figure(layout="constrained", **kwargs)
  FigureCanvasAgg(fig)
  return fig


def _save(fig: Figure, path) -> Path:
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=DPI, bbox_inches="tight")
  return path


def _color(method: str, i: int) -> str:
  return COLORS.get(method, f"C{i % 10}")


# ---- Figure 1: accuracy vs communication cost ------------------------------

def build_figure1(points, server_only_accuracy: float | None = None,
                  stars=None, cost_key: str = "cost", gap: float = 0.01,
                  names: dict | None = None) -> Figure:
  """Accuracy (%) vs cost, one line per method (label = display name).

  stars: operating points to mark ({method: {"best", "within_gap"}}, as from
  tables.operating_points); None computes them, False draws none.
  """
  server_acc = tables.server_accuracy(points, server_only_accuracy)
  if stars is None:
    stars = tables.operating_points(points, server_acc, gap, cost_key)
  fig = _figure(figsize=(6.0, 4.2))
  ax = fig.add_subplot()
  for i, m in enumerate(tables.methods_in(points)):
    pts = sorted((p for p in points if p["method"] == m and tables.usable(p, cost_key)),
                 key=lambda p: p[cost_key])
    x = [p[cost_key] for p in pts]
    y = [100 * p["accuracy"] for p in pts]
    ax.plot(x, y, marker=MARKERS.get(m, "o"), ms=4, lw=1.5, color=_color(m, i),
            label=tables.display_name(m, names))
  ax.axhline(100 * server_acc, ls="--", lw=1, color="black",
             label=tables.display_name("server_only", names))
  ax.plot([tables.server_cost(points, cost_key)], [100 * server_acc], "o",
          color="black", ms=6, label="_nolegend_")
  ax.axhline(100 * (server_acc - gap), ls=":", lw=0.8, color="gray",
             label=f"Server-only − {gap * 100:g} pp")
  for i, (m, ops) in enumerate((stars or {}).items()):
    for p in (ops["best"], ops["within_gap"]):
      if p is not None:
        ax.plot(p[cost_key], 100 * p["accuracy"], "*", ms=14, mec="black", mew=0.6,
                color=_color(m, i), label="_nolegend_", zorder=5)
  ax.set_xlabel("Communication cost (normalized to full image)")
  ax.set_ylabel("Top-1 accuracy (%)")
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=8, loc="lower right")
  return fig


def figure1(points, path, server_only_accuracy: float | None = None,
            stars=None, cost_key: str = "cost", gap: float = 0.01) -> Path:
  return _save(build_figure1(points, server_only_accuracy, stars, cost_key, gap), path)


# ---- accuracy vs exact bytes, every method and codec -----------------------

CODEC_STYLES = ("-", "--", ":", "-.")


def build_accuracy_bytes(points, gap: float = 0.01, names: dict | None = None) -> Figure:
  """Accuracy (%) against exact payload bytes (log scale, over a raw image's
  bytes): one colour per method, one line style per codec."""
  raw = tables.for_codec(points, "raw")
  server_acc = tables.server_accuracy(raw)
  codecs = tables.codecs_in(points)
  fig = _figure(figsize=(6.4, 4.4))
  ax = fig.add_subplot()
  for i, m in enumerate(tables.methods_in(points)):
    for k, c in enumerate(codecs):
      pts = sorted((p for p in points if p["method"] == m and p.get("codec", "raw") == c
                    and tables.usable(p, "cost_bytes") and p["cost_bytes"] > 0),
                   key=lambda p: p["cost_bytes"])
      if m == "certified":
        pts = [p for p in pts if p.get("deployed", True)]
      if not pts:
        continue
      ax.plot([p["cost_bytes"] for p in pts], [100 * p["accuracy"] for p in pts],
              ls=CODEC_STYLES[k % len(CODEC_STYLES)], marker=MARKERS.get(m, "o"),
              ms=11 if m == "certified" else 3.5, mec="black" if m == "certified" else None,
              lw=1.2, color=_color(m, i), label=f"{tables.display_name(m, names)}, {c}")
  ax.axhline(100 * server_acc, ls="--", lw=1, color="black", label="Server-only (raw)")
  ax.axhline(100 * (server_acc - gap), ls=":", lw=0.8, color="gray",
             label=f"Server-only − {gap * 100:g} pp")
  ax.set_xscale("log")
  ax.set_xlabel("Exact payload bytes (normalized to a raw image, log scale)")
  ax.set_ylabel("Top-1 accuracy (%)")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=6, loc="lower right", ncol=2)
  return fig


def accuracy_bytes(points, path, gap: float = 0.01) -> Path:
  return _save(build_accuracy_bytes(points, gap), path)


# ---- Figure 2: latency at the operating points ------------------------------

def build_figure2(op_points, rates=tables.RATES_MBPS, log_y: bool = False,
                  cost_key: str = "cost", server_only_cost: float | None = 1.0,
                  convention: str = "paper", names: dict | None = None,
                  gap: float = 0.01) -> Figure:
  """Grouped latency bars: (a) best-accuracy and (b) within-gap points.

  Groups are upload rates; bars within a group are methods (server-only first
  unless server_only_cost is None). A method with no point gets no bar.
  """
  names = names or SHORT_NAMES
  methods = list(op_points)
  labels = ([] if server_only_cost is None else ["server_only"]) + methods
  fig = _figure(figsize=(10.0, 3.8))
  axes = fig.subplots(1, 2, sharey=True)
  width = 0.8 / len(labels)
  x = np.arange(len(rates))
  for ax, (tag, setting) in zip(axes, (("(a) Best accuracy", "best"),
                                       (f"(b) Within {gap * 100:g} pp", "within_gap"))):
    for j, m in enumerate(labels):
      p = None if m == "server_only" else op_points[m][setting]
      cost = server_only_cost if m == "server_only" else (None if p is None else p[cost_key])
      if cost is None:
        continue
      lat = tables.latency_ms(cost, np.asarray(rates), convention=convention)
      bars = ax.bar(x + (j - (len(labels) - 1) / 2) * width, lat, width,
                    color=_color(m, j), label=tables.display_name(m, names))
      ax.bar_label(bars, fmt="%.0f", fontsize=6)
    ax.set_xticks(x, [f"{r:g} Mb/s" for r in rates])
    ax.set_title(tag)
    ax.grid(True, axis="y", alpha=0.3)
    if log_y:
      ax.set_yscale("log")
  axes[0].set_ylabel("Transmission latency (ms)")
  axes[0].legend(fontsize=8)
  return fig


def figure2(op_points, path, rates=tables.RATES_MBPS, log_y: bool = False,
            cost_key: str = "cost", server_only_cost: float | None = 1.0,
            gap: float = 0.01) -> Path:
  return _save(build_figure2(op_points, rates, log_y, cost_key, server_only_cost,
                             gap=gap), path)


# ---- Saliency panels ---------------------------------------------------------

def _grid_index(size: int, cells: int) -> np.ndarray:
  """Cell index of each pixel along one axis (works when size % cells != 0)."""
  return np.arange(size) * cells // size


def patch_mask_image(keep_mask, height: int, width: int, grid: int = 14) -> np.ndarray:
  """[grid*grid] bool (row-major, as ViT tokens) -> [H, W] bool pixel mask."""
  cells = np.asarray(keep_mask, bool).reshape(grid, grid)
  return cells[_grid_index(height, grid)[:, None], _grid_index(width, grid)[None, :]]


def sent_patches(image, keep_mask, grid: int = 14, fill: int = 96) -> np.ndarray:
  """The image as the server sees it: dropped patches replaced by grey."""
  image = np.asarray(image)
  keep = patch_mask_image(keep_mask, image.shape[0], image.shape[1], grid)
  return np.where(keep[..., None], image, np.uint8(fill)).astype(np.uint8)


def _resize_nearest(m, height: int, width: int) -> np.ndarray:
  m = np.asarray(m, np.float64)
  return m[_grid_index(height, m.shape[0])[:, None], _grid_index(width, m.shape[1])[None, :]]


def cam_overlay(image, cam, alpha: float = 0.5) -> np.ndarray:
  """Jet-coloured CAM blended over the image; float RGB in [0, 1]."""
  image = np.asarray(image, np.float64) / 255.0
  cam = np.clip(_resize_nearest(cam, *image.shape[:2]), 0.0, 1.0)
  heat = matplotlib.colormaps["jet"](cam)[..., :3]
  return (1 - alpha) * image + alpha * heat


def _show(ax, img, label: str = ""):
  ax.imshow(img)
  ax.set_xticks([])
  ax.set_yticks([])
  ax.set_xlabel(label, fontsize=8)


def build_saliency_gallery(images, cams, keep_masks, titles, grid: int = 14,
                           alpha: float = 0.5) -> Figure:
  """One row per image: input, Grad-CAM overlay, sent patches; row title above."""
  n = len(images)
  fig = _figure(figsize=(7.5, 2.7 * n))
  axes = np.atleast_2d(fig.subplots(n, 3))
  for i in range(n):
    k = int(np.asarray(keep_masks[i]).sum())
    _show(axes[i, 0], images[i], "input")
    _show(axes[i, 1], cam_overlay(images[i], cams[i], alpha), "Grad-CAM")
    _show(axes[i, 2], sent_patches(images[i], keep_masks[i], grid),
          f"sent {k}/{grid * grid} patches")
    axes[i, 0].set_title(titles[i], loc="left", fontsize=8)
  return fig


def saliency_gallery(images, cams, keep_masks, titles, path, grid: int = 14,
                     alpha: float = 0.5) -> Path:
  return _save(build_saliency_gallery(images, cams, keep_masks, titles, grid, alpha), path)


def build_explain_figure(image, cam, keep_mask, aps_classes, grid: int = 14,
                         accepted: bool = False, decision: str = "",
                         alpha: float = 0.5) -> Figure:
  """`rcst explain` panel: image, APS set (bar chart), Grad-CAM, patches sent.

  aps_classes: [(name, prob)] in APS order. keep_mask None (e.g. accepted on
  the edge with no map computed) leaves the last panel empty.
  """
  fig = _figure(figsize=(13.0, 3.4))
  ax_img, ax_aps, ax_cam, ax_sent = fig.subplots(1, 4, width_ratios=(1, 1.3, 1, 1))
  _show(ax_img, image, "input")
  names = [str(c) for c, _ in aps_classes][::-1]  # largest prob on top
  probs = [float(p) for _, p in aps_classes][::-1]
  ax_aps.barh(range(len(probs)), probs, color="tab:blue")
  ax_aps.set_yticks(range(len(probs)), names, fontsize=7)
  ax_aps.set_xlim(0, 1)
  for y, p in enumerate(probs):
    ax_aps.text(min(p + 0.02, 0.85), y, f"{p:.3f}", va="center", fontsize=7)
  ax_aps.set_title(f"APS set ({len(probs)} classes)", fontsize=9)
  ax_aps.set_xlabel("edge probability", fontsize=8)
  _show(ax_cam, cam_overlay(image, cam, alpha), "APS-weighted Grad-CAM")
  if keep_mask is None:
    ax_sent.axis("off")
  else:
    k = int(np.asarray(keep_mask).sum())
    verb = "would send" if accepted else "sent"
    _show(ax_sent, sent_patches(image, keep_mask, grid), f"{verb} {k}/{grid * grid} patches")
  head = "accepted on edge" if accepted else "offloaded to server"
  fig.suptitle(f"{head}: {decision}" if decision else head, fontsize=10,
               color="tab:green" if accepted else "tab:orange")
  return fig


def explain_figure(image, cam, keep_mask, aps_classes, path, grid: int = 14,
                   accepted: bool = False, decision: str = "",
                   alpha: float = 0.5) -> Path:
  return _save(build_explain_figure(image, cam, keep_mask, aps_classes, grid,
                                    accepted, decision, alpha), path)


def build_certification_figure(cost, risk, certified, chosen=None, epsilon=None,
                               risk_label: str = "calibration risk", oracle=None) -> Figure:
  """Risk against cost for every (lambda, tau) of the grid; certified ones
  filled, the chosen one starred, the oracle (the cheapest within epsilon on
  these images, no guarantee) ringed."""
  cost, risk, certified = (np.asarray(a).ravel() for a in (cost, risk, certified))
  fig = _figure(figsize=(5.5, 4.0))
  ax = fig.add_subplot()
  ax.scatter(cost[~certified], risk[~certified], s=14, facecolors="none",
             edgecolors="tab:gray", label="not certified")
  ax.scatter(cost[certified], risk[certified], s=16, color="tab:orange", label="certified")
  if chosen is not None:
    ax.scatter([chosen[0]], [chosen[1]], marker="*", s=180, color="tab:red", zorder=3,
               label="chosen (lowest cost)")
  if oracle is not None:
    ax.scatter([oracle[0]], [oracle[1]], marker="o", s=110, facecolors="none",
               edgecolors="tab:blue", linewidths=1.6, zorder=3,
               label="oracle (cheapest within epsilon, no guarantee)")
  if epsilon is not None:
    ax.axhline(epsilon, color="black", lw=0.8, ls="--", label=f"epsilon = {epsilon:g}")
  ax.set_xlabel("communication cost")
  ax.set_ylabel(risk_label)
  ax.legend(fontsize=8)
  return fig


def certification_figure(cost, risk, certified, path, chosen=None, epsilon=None,
                         risk_label: str = "calibration risk", oracle=None) -> Path:
  return _save(build_certification_figure(cost, risk, certified, chosen, epsilon, risk_label,
                                          oracle), path)
