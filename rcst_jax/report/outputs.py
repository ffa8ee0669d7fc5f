"""Everything a sweep writes: results, Tables 1-2, Figures 1-2, gallery, per-image CSV."""

from __future__ import annotations

import csv
import hashlib
import io
import os

import jax
import numpy as np

from rcst_jax import __version__
from rcst_jax.calibration.certificate import describe
from rcst_jax.core.fileio import OutputDir, atomic_write_bytes, atomic_write_text, write_json
from rcst_jax.models.predict import class_names_for
from rcst_jax.report import explain, plots, tables
from rcst_jax.sweep import metrics


def gallery(batch_iter, edge, point, layer: str, geometry, count: int, class_names,
            batch_size: int = 16, sharding=None):
  """The first `count` offloaded images of ``batch_iter`` at an operating point:
  images, maps, kept patches, titles (None if no image was offloaded)."""
  picked = []
  for b in batch_iter:
    for i, x in enumerate(explain.explain_images(edge, b.images, point, layer, geometry,
                                                 batch_size, sharding)):
      if b.valid[i] and not x.accepted:
        picked.append((b.images[i], x, int(b.labels[i])))
    if len(picked) >= count:
      break
  if not picked:
    return None
  picked = picked[:count]
  name = explain.namer(class_names)
  return (np.stack([p[0] for p in picked]), np.stack([p[1].cam for p in picked]),
          np.stack([p[1].keep for p in picked]),
          [explain.gallery_title(x, name, label) for _, x, label in picked])


def gallery_point(cal, ops: dict):
  """What the gallery shows: the certified pair, else the CRC lambda at the
  proposed method's chosen tau (within 1 pp of server-only, else its best)."""
  if cal.certificate is not None and cal.certificate["certified"]:
    return cal.operating_point()
  prop = ops.get("proposed") or {}
  chosen = prop.get("within_gap") or prop.get("best")
  return None if chosen is None else cal.operating_point(chosen["param"])


def write_per_image(path: str, arrays: dict, points, geometry, codecs) -> str:
  buf = io.StringIO()
  w = csv.writer(buf)
  w.writerow(metrics.PER_IMAGE_COLUMNS)
  w.writerows(metrics.per_image_rows(arrays, points, geometry, codecs))
  return atomic_write_text(path, buf.getvalue())


def _tables(out: str, points, codec_points, cert) -> dict:
  """Tables 1-2 as the paper has them (raw patches), then per codec in exact bytes."""
  paths = {}
  paths["results_json"], paths["results_csv"] = map(str, tables.write_results(codec_points, out))
  note = "" if cert is None else "\n" + describe(cert) + "\n"
  for name, text in (("table1.md", tables.table1_markdown(points) + note),
                     ("table1_bytes.md", tables.table_codecs_markdown(codec_points)),
                     ("table2.md", tables.table2_markdown(points)),
                     ("table2_bytes.md", tables.table2_codecs_markdown(codec_points))):
    paths[name] = atomic_write_text(os.path.join(out, name), text + "\n")
  return paths


def _figures(out: str, points, codec_points, ops, grid, cert) -> dict:
  paths = {"figure1": str(plots.figure1(points, os.path.join(out, "figure1.png"))),
           "figure2": str(plots.figure2(ops, os.path.join(out, "figure2.png"))),
           "accuracy_bytes": str(plots.accuracy_bytes(
               codec_points, os.path.join(out, "accuracy_bytes.png")))}
  if grid is not None:
    paths["certification"] = str(plots.certification_figure(
        grid["cost"], grid["risk"], grid["certified"], os.path.join(out, "certification.png"),
        chosen=tuple(grid["chosen"]) if "chosen" in grid else None, epsilon=cert["epsilon"],
        risk_label=f"calibration {cert['risks'][0].replace('_', ' ')}",
        oracle=tuple(grid["oracle"]) if "oracle" in grid else None))
  return paths


# Every file a sweep may write into its output directory (fileio.OutputDir).
OUTPUT_NAMES = ("results.json", "results.csv", "table1.md", "table1_bytes.md", "table2.md",
                "table2_bytes.md", "figure1.png", "figure2.png", "accuracy_bytes.png", "certification.png", "per_image.csv",
                "gallery.png", "calibration.json", "summary.json", "dtype_comparison.md")


def write_outputs(ev, result: dict, gallery_size: int = 6, per_image: bool = False,
                  claimed: OutputDir | None = None) -> dict:
  """results.json/csv, Tables 1-2 (Markdown), Figures 1-2, gallery, calibration,
  summary; each recorded as rcst's own in ``claimed`` (the output directory)."""
  paths = _write_outputs(ev, result, gallery_size, per_image)
  claimed = claimed or OutputDir(ev.out_dir).claim(OUTPUT_NAMES)
  for path in paths.values():
    claimed.record(path)
  return paths


def _write_outputs(ev, result: dict, gallery_size: int, per_image: bool) -> dict:
  out, points, cal = ev.out_dir, result["points"], result["calibration"]
  codec_points = result.get("codec_points", points)
  ops = tables.operating_points(points)
  paths = {**_tables(out, points, codec_points, cal.certificate),
           **_figures(out, points, codec_points, ops, result.get("certification_grid"),
                      cal.certificate)}
  if per_image:
    paths["per_image"] = write_per_image(os.path.join(out, "per_image.csv"), result["arrays"],
                                         ev.all_points(), ev.geometry, ev.codecs)
  point = gallery_point(cal, ops)
  if gallery_size and point is not None:
    batch_iter = ev.passes.batches(ev.sources.test_source,
                                   ev.sources.test_indices[:32 * gallery_size], "gallery",
                                   progress=ev.progress)
    # The sweep's edge, mesh and matmul precision: its compiled edge step, not a second one.
    with ev.precision():
      g = gallery(batch_iter, ev.passes.edge, point, ev.config.gradcam_layer, ev.geometry,
                  gallery_size, class_names_for(ev.models.edge), int(ev.config.batch_size),
                  ev.passes.sharding)
    if g is not None:
      paths["gallery"] = str(plots.saliency_gallery(*g, os.path.join(out, "gallery.png"),
                                                    grid=ev.geometry.grid))
  # The artifact that produced these numbers, byte for byte as the cache holds it.
  with open(ev.published_calibration, "rb") as f:
    paths["calibration"] = atomic_write_bytes(os.path.join(out, "calibration.json"), f.read())
  summary = {k: v for k, v in result.items()
             if k not in ("points", "codec_points", "calibration", "arrays",
                          "certification_grid")}
  with open(paths["calibration"], "rb") as f:
    summary["calibration_sha256"] = hashlib.sha256(f.read()).hexdigest()
  grid = result.get("certification_grid") or {}
  if "oracle" in grid:  # cost and risk on the calibration images (no guarantee)
    summary["certification_oracle"] = {"cost": grid["oracle"][0], "risk": grid["oracle"][1]}
  summary.update(certificate=cal.certificate, rcst_jax_version=__version__,
                 devices=int(ev.mesh.devices.size), backend=jax.default_backend(),
                 dtype=ev.config.dtype, operating_points=ops, outputs=paths)
  paths["summary"] = write_json(os.path.join(out, "summary.json"), summary)
  return paths
