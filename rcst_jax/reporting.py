"""Everything a sweep writes: results, Tables 1-2, Figures 1-2, gallery, per-image CSV."""

from __future__ import annotations

import csv
import io
import os

import jax
import numpy as np

from rcst_jax import explain, metrics, pipeline, plots, tables
from rcst_jax.fileio import atomic_write_text, write_json


def gallery(ev, cal, tau: float, count: int, class_names):
  """The first `count` offloaded test images: images, maps, kept patches, titles."""
  picked = []
  for b in ev._batches(ev.sources.test_source, ev.sources.test_indices[:32 * count], "gallery"):
    e = jax.device_get(pipeline.edge_step(ev.models.edge, b.images, cal.lambda_hat, cal.q_hat,
                                          layer=ev.config.gradcam_layer, grid=ev.geometry.grid))
    for i, x in enumerate(explain.explain_batch(e, tau, ev.geometry)):
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


def write_per_image(path: str, arrays: dict, points, geometry) -> str:
  buf = io.StringIO()
  w = csv.writer(buf)
  w.writerow(metrics.PER_IMAGE_COLUMNS)
  w.writerows(metrics.per_image_rows(arrays, points, geometry))
  return atomic_write_text(path, buf.getvalue())


def write_outputs(ev, result: dict, gallery_size: int = 6, per_image: bool = False,
                  extra_summary: dict | None = None) -> dict:
  """results.json/csv, Tables 1-2 (Markdown), Figures 1-2, gallery, calibration, summary."""
  from rcst_jax.predict import class_names_for
  out = ev.out_dir
  points = result["points"]
  paths = {}
  paths["results_json"], paths["results_csv"] = map(str, tables.write_results(points, out))
  cert = result["calibration"].certificate
  note = ""
  if cert is not None:
    from rcst_jax.certification import describe
    note = "\n" + describe(cert) + "\n"
  for name, text in (("table1.md", tables.table1_markdown(points) + note),
                     ("table1_bytes.md", tables.table1_markdown(points, cost_key="cost_bytes")),
                     ("table2.md", tables.table2_markdown(points))):
    paths[name] = atomic_write_text(os.path.join(out, name), text + "\n")
  ops = tables.operating_points(points)
  paths["figure1"] = str(plots.figure1(points, os.path.join(out, "figure1.png")))
  paths["figure2"] = str(plots.figure2(ops, os.path.join(out, "figure2.png")))
  grid = result.get("certification_grid")
  if grid is not None:
    paths["certification"] = str(plots.certification_figure(
        grid["cost"], grid["risk"], grid["certified"], os.path.join(out, "certification.png"),
        chosen=tuple(grid["chosen"]) if "chosen" in grid else None, epsilon=cert["epsilon"],
        risk_label=f"calibration {cert['risks'][0].replace('_', ' ')}"))
  if per_image:
    paths["per_image"] = write_per_image(os.path.join(out, "per_image.csv"), result["arrays"],
                                         ev.all_points(), ev.geometry)
  prop = ops.get("proposed") or {}
  chosen = prop.get("within_gap") or prop.get("best")
  if gallery_size and chosen is not None:
    g = gallery(ev, result["calibration"], chosen["param"], gallery_size,
                class_names_for(ev.models.edge))
    if g is not None:
      paths["gallery"] = str(plots.saliency_gallery(*g, os.path.join(out, "gallery.png"),
                                                    grid=ev.geometry.grid))
  paths["calibration"] = os.path.join(out, "calibration.json")
  result["calibration"].to_json(paths["calibration"])
  summary = {k: v for k, v in result.items()
             if k not in ("points", "calibration", "arrays", "certification_grid")}
  summary["certificate"] = cert
  from rcst_jax import __version__
  summary.update(rcst_jax_version=__version__, devices=int(ev.mesh.devices.size),
                 backend=jax.default_backend(),
                 dtype=ev.config.dtype, operating_points=ops, outputs=paths,
                 **(extra_summary or {}))
  paths["summary"] = write_json(os.path.join(out, "summary.json"), summary)
  return paths
