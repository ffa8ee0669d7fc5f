"""Each figure writes a valid PNG; Figure 1 draws one sorted line per method."""

import numpy as np
from PIL import Image

from rcst_jax.report import plots, tables

SERVER = 0.818


def paper_points():
  """Sweeps shaped like the paper's Figure 1 (4 methods + server-only)."""
  rows = [("server_only", 1.0, SERVER),
          ("proposed", 0.3327, 0.8160), ("proposed", 0.2579, 0.8105), ("proposed", 0.20, 0.79),
          ("random", 0.30, 0.79), ("random", 0.43, 0.8107), ("random", 0.39, 0.8086),
          ("topk", 0.50, 0.8107), ("topk", 0.43, 0.8107), ("topk", 0.35, 0.8082),
          ("attention_sum", 0.428, 0.8106), ("attention_sum", 0.3236, 0.8084)]
  return [{"method": m, "cost": c, "accuracy": a} for m, c, a in rows]


def assert_png(path, min_side=100):
  assert path.exists() and path.stat().st_size > 0
  with Image.open(path) as im:
    im.verify()
  with Image.open(path) as im:
    assert im.format == "PNG" and min(im.size) >= min_side
    return im.size


def sample_images(n=2, size=56, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
  cams = rng.random((n, size, size))
  keep = rng.random((n, 14 * 14)) < 0.4
  return images, cams, keep


def test_figure1_lines_and_png(tmp_path):
  points = paper_points()
  fig = plots.build_figure1(points, SERVER)
  ax = fig.axes[0]
  names = {tables.display_name(m): m for m in tables.methods_in(points)}
  method_lines = [l for l in ax.get_lines() if l.get_label() in names]
  assert sorted(l.get_label() for l in method_lines) == sorted(names)
  for line in method_lines:
    x = line.get_xdata()
    assert np.all(np.diff(x) >= 0)  # sorted by cost
    assert len(x) == sum(p["method"] == names[line.get_label()] for p in points)
  stars = [l for l in ax.get_lines() if l.get_marker() == "*"]
  assert len(stars) == 8  # best + within-gap for 4 methods
  server = [l for l in ax.get_lines() if l.get_label() == "Server-only"]
  assert server[0].get_linestyle() == "--"
  np.testing.assert_allclose(server[0].get_ydata(), 81.8)
  legend = [t.get_text() for t in ax.get_legend().get_texts()]
  assert set(names) <= set(legend)
  assert_png(plots.figure1(points, tmp_path / "sub" / "fig1.png", SERVER))


def test_figure1_without_stars():
  fig = plots.build_figure1(paper_points(), SERVER, stars=False)
  assert not [l for l in fig.axes[0].get_lines() if l.get_marker() == "*"]


def test_figure2_bars_and_png(tmp_path):
  ops = tables.operating_points(paper_points() + [pt_weak()], SERVER)
  fig = plots.build_figure2(ops, log_y=True)
  ax_a, ax_b = fig.axes
  assert ax_a.get_yscale() == "log"
  # server-only + 5 methods x 3 rates in (a); "weak" has no (b) point.
  assert len(ax_a.patches) == 6 * 3 and len(ax_b.patches) == 5 * 3
  heights = sorted(p.get_height() for p in ax_a.patches)
  assert heights[-1] == 1176.0
  assert_png(plots.figure2(ops, tmp_path / "fig2.png"))


def pt_weak():
  return {"method": "weak", "cost": 0.1, "accuracy": 0.5}


def test_patch_mask_is_row_major():
  keep = np.zeros(14 * 14, bool)
  keep[1] = True  # row 0, column 1
  pix = plots.patch_mask_image(keep, 224, 224)
  assert pix[:16, 16:32].all() and pix.sum() == 16 * 16
  sent = plots.sent_patches(np.full((224, 224, 3), 200, np.uint8), keep)
  assert (sent[0, 20] == 200).all() and (sent[0, 0] == 96).all()


def test_saliency_gallery_png(tmp_path):
  images, cams, keep = sample_images(2)
  titles = ["APS {goldfish: 0.91, tench: 0.05}", "APS {tabby: 0.60}"]
  w, h = assert_png(plots.saliency_gallery(images, cams, keep, titles, tmp_path / "g.png"))
  assert h > w / 2  # two rows stacked


def test_explain_figure_png(tmp_path):
  images, cams, keep = sample_images(1)
  aps = [("goldfish", 0.71), ("tench", 0.2), ("axolotl", 0.05)]
  for accepted, mask in ((False, keep[0]), (True, None)):
    path = plots.explain_figure(images[0], cams[0], mask, aps, tmp_path / f"e{accepted}.png",
                                accepted=accepted, decision="lambda_hat=0.62, 3 classes")
    assert_png(path)


def test_certification_figure_marks_the_chosen_pair_and_the_oracle(tmp_path):
  cost = np.array([[0.1, 0.3], [0.6, 1.0]])
  risk = np.array([[0.019, 0.012], [0.004, 0.0]])
  certified = np.array([[False, True], [True, True]])
  fig = plots.build_certification_figure(cost, risk, certified, chosen=(0.3, 0.012),
                                         epsilon=0.02, oracle=(0.1, 0.019))
  ax = fig.axes[0]
  labels = [t.get_text() for t in ax.get_legend().get_texts()]
  assert any(l.startswith("oracle") for l in labels) and "chosen (lowest cost)" in labels
  offsets = [tuple(c.get_offsets()[0]) for c in ax.collections if len(c.get_offsets()) == 1]
  assert (0.1, 0.019) in offsets and (0.3, 0.012) in offsets
  path = plots.certification_figure(cost, risk, certified, tmp_path / "c.png", oracle=(0.1, 0.019))
  assert Image.open(path).format == "PNG"
  without = plots.build_certification_figure(cost, risk, certified)
  assert not any("oracle" in t.get_text() for t in without.axes[0].get_legend().get_texts())


def test_accuracy_bytes_one_line_per_method_and_codec_on_log_axis(tmp_path):
  points = []
  for codec, scale in (("raw", 1.0), ("webp-lossless", 0.6), ("jpeg:75", 0.1)):
    points += [{**p, "codec": codec, "cost_bytes": p["cost"] * scale}
               for p in paper_points()]
  fig = plots.build_accuracy_bytes(points)
  ax = fig.axes[0]
  assert ax.get_xscale() == "log"
  labels = [l.get_label() for l in ax.get_lines()]
  for m in ("Proposed", "Random", "Top-K", "Attention Sum"):
    for codec in ("raw", "webp-lossless", "jpeg:75"):
      assert f"{m}, {codec}" in labels
  jpeg = next(l for l in ax.get_lines() if l.get_label() == "Proposed, jpeg:75")
  np.testing.assert_allclose(sorted(jpeg.get_xdata()), [0.02, 0.02579, 0.03327])
  styles = {l.get_label().split(", ")[1]: l.get_linestyle() for l in ax.get_lines()
            if ", " in l.get_label()}
  assert len(set(styles.values())) == 3  # each codec its own line style
  assert_png(plots.accuracy_bytes(points, tmp_path / "ab.png"))
