"""Per-scene cost of the demo's synthetic renderer (`data/synthetic.py`)
against the previous renderer, kept here as the reference.

  .venv/bin/python benchmarks/bench_synthetic.py [--scenes 2000] [--pool 512]

Every split renders scenes 0..N-1 (seed 0, 224 px) with both renderers,
alternating which goes first, and each scene must come out byte for byte the
same (image, label, mask, box, distractor mask): the run doubles as the check
that the demo's images did not change. --pool also times
`SyntheticShapes.arrays` in this process against two spawned processes
(startup included), the alternative to a cheaper renderer. Report ratios from
one run: 2-core hosts are noisy.
"""

import argparse
import functools
import math
import os
import time

import numpy as np
from machine import cpu_name

from rcst_jax.data import synthetic as syn

# ---------------------------------------------------------------- the reference (before)
# The functions whose code changed, as they were; the unchanged helpers come from `syn`.


def _old_texture(texture, a, b, r):
  if texture == "stripes":
    return np.clip(0.5 + 1.5 * np.sin(2 * np.pi * a), 0, 1)
  if texture == "checker":
    return np.clip(0.5 + 3.0 * np.sin(2 * np.pi * a) * np.sin(2 * np.pi * b), 0, 1)
  if texture == "dots":
    return np.clip(0.5 + 1.5 * (np.cos(2 * np.pi * a) + np.cos(2 * np.pi * b) - 0.9), 0, 1)
  if texture == "grid":
    return np.clip(3.0 * (np.maximum(np.cos(2 * np.pi * a), np.cos(2 * np.pi * b)) - 0.7), 0, 1)
  if texture == "crosshatch":
    return np.clip(0.5 + 1.5 * np.maximum(np.sin(2 * np.pi * (a + b) / 1.4),
                                          np.sin(2 * np.pi * (a - b) / 1.4)), 0, 1)
  if texture == "rings":
    return np.clip(0.5 + 1.5 * np.sin(2 * np.pi * r), 0, 1)
  if texture == "flat":
    return np.ones_like(a)
  raise ValueError(texture)


def _old_hsv(h, s, v):
  h, s, v = np.broadcast_arrays(np.asarray(h, np.float32) % 1.0, s, v)
  k = (np.array([5.0, 3.0, 1.0], np.float32) + h[..., None] * 6) % 6
  rgb = v[..., None] - v[..., None] * s[..., None] * np.clip(np.minimum(k, 4 - k), 0, 1)
  return (255.0 * rgb).astype(np.float32)


class _OldCanvas:

  def __init__(self, size, rng):
    self.size, self.rng = size, rng
    self.grid = (np.arange(size, dtype=np.float32) + 0.5)
    self.image = _old_background(size, rng)

  def window(self, cy, cx, radius):
    lo = lambda c: int(max(0, np.floor(c - radius - 2)))
    hi = lambda c: int(min(self.size, np.ceil(c + radius + 2)))
    return slice(lo(cy), hi(cy)), slice(lo(cx), hi(cx))

  def paint(self, win, alpha, colour):
    region = self.image[win]
    delta = np.subtract(colour, region, dtype=np.float32)
    delta *= alpha[..., None]
    region += delta


def _old_background(size, rng):
  n = 4
  grid = _old_hsv(rng.random((n, n)), rng.uniform(0, 0.6, (n, n)),
                  rng.uniform(0.3, 0.75, (n, n)))
  w = syn._bilinear_weights(size, n)
  field = np.einsum("yi,ijc,xj->yxc", w, grid, w, optimize=True)
  dy, dx = rng.integers(0, size, 2)
  noise = _old_noise_bank(size)[dy:dy + size, dx:dx + size]
  return (field + rng.uniform(6, 18) * noise).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _old_noise_bank(size):
  return np.random.default_rng(1234).standard_normal((2 * size, 2 * size, 3)).astype(np.float32)


def _old_clutter(c):
  rng, s = c.rng, c.size
  for _ in range(rng.integers(3, 7)):
    (cy, cx), r = rng.uniform(0, s, 2).tolist(), float(rng.uniform(0.05, 0.18)) * s
    ys, xs = c.window(cy, cx, r)
    d2 = ((c.grid[ys, None] - cy) ** 2 + (c.grid[None, xs] - cx) ** 2) / (r * r)
    alpha = float(rng.uniform(0.3, 0.7)) * np.maximum(1 - d2, 0) ** 2
    c.paint((ys, xs), alpha, _old_hsv(rng.random(), rng.random(), rng.uniform(0.2, 1)))
  for _ in range(rng.integers(2, 6)):
    p0 = rng.uniform(0, s, 2)
    p1 = p0 + rng.uniform(0.15, 0.6) * s * syn._unit_vector(rng.uniform(0, 2 * np.pi))
    width = float(rng.uniform(1.0, 3.0)) * s / 224
    ys, xs = (syn._span(p0[k], p1[k], 3, s) for k in (0, 1))
    d = syn._segment_distance(c.grid[ys], c.grid[xs], p0, p1)
    alpha = float(rng.uniform(0.5, 1.0)) * np.clip(width / 2 + 0.5 - d, 0, 1)
    c.paint((ys, xs), alpha, _old_hsv(rng.random(), rng.random(), rng.random()))


def _old_draw_shape(c, p, opacity=1.0, cut=None):
  rng, scale = c.rng, p["scale"]
  cy, cx = (float(x) for x in p["centre"])
  win = c.window(cy, cx, p["bound"])
  dy, dx = c.grid[win[0], None] - cy, c.grid[None, win[1]] - cx
  cos, sin = math.cos(p["angle"]), math.sin(p["angle"])
  u, v = dx * cos + dy * sin, dy * cos - dx * sin
  alpha = np.clip(0.5 - scale * syn._sdf(p["shape"], u / scale, v / scale), 0, 1)
  if cut is not None:
    phi, offset = cut
    alpha *= np.clip(0.5 + u * math.cos(phi) + v * math.sin(phi) - offset * scale, 0, 1)
  pattern, degrees, period_scale = syn.TEXTURES[p["texture"]]
  period = float(rng.uniform(*syn.TEXTURE_PERIOD)) * period_scale * c.size / 224
  phi = float(rng.uniform(0, np.pi)) if degrees is None else \
      math.radians(degrees + float(rng.uniform(-8, 8)))
  ca, sa = math.cos(phi) / period, math.sin(phi) / period
  a = dy * ca - dx * sa + float(rng.random())
  b = dx * ca + dy * sa + float(rng.random())
  mix = _old_texture(pattern, a, b, np.sqrt(dx * dx + dy * dy) / period)[..., None]
  light, dark = _old_colour_pair(rng)
  c.paint(win, opacity * alpha, dark + mix * (light - dark))
  return win, opacity * alpha


def _old_colour_pair(rng):
  h = rng.random()
  light = _old_hsv(h, rng.uniform(0.4, 1.0), rng.uniform(0.75, 1.0))
  dark = _old_hsv(h + rng.uniform(0.25, 0.75), rng.uniform(0.4, 1.0), rng.uniform(0.05, 0.35))
  return (light, dark) if rng.random() < 0.5 else (dark, light)


def _old_render_scene(seed, split, index, size=224):
  rng = np.random.default_rng([seed, syn.SPLIT_IDS[split], index])
  label = int(rng.integers(syn.NUM_CLASSES))
  obj = syn._shape_params(rng, size, label, rng.uniform(*syn.OBJECT_AREA))
  canvas = _OldCanvas(size, rng)
  _old_clutter(canvas)
  distractors = np.zeros((size, size), bool)
  for _ in range(rng.integers(syn.DISTRACTORS[0], syn.DISTRACTORS[1] + 1)):
    other = int(label + rng.integers(1, syn.NUM_CLASSES)) % syn.NUM_CLASSES
    mode = rng.integers(3)
    area = rng.uniform(*(syn.SMALL_AREA, syn.FAINT_AREA, syn.PARTIAL_AREA)[mode])
    p = syn._shape_params(rng, size, other, area, centre=np.zeros(2))
    p["centre"] = syn._place_distractor(rng, size, obj, p["bound"])
    opacity = float(rng.uniform(*syn.FAINT_ALPHA)) if mode == 1 else 1.0
    cut = (float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(-0.2, 0.3))) if mode == 2 else None
    win, alpha = _old_draw_shape(canvas, p, opacity, cut)
    distractors[win] |= alpha > 0.5 * opacity
  win, alpha = _old_draw_shape(canvas, obj)
  mask = np.zeros((size, size), bool)
  mask[win] = alpha > 0.5
  image = np.clip(canvas.image + 0.5, 0, 255).astype(np.uint8)
  return syn.Scene(image, label, mask, syn._bbox(mask), distractors & ~mask)


# ---------------------------------------------------------------- the run


def _same(a, b):
  return (a.label == b.label and a.bbox == b.bbox and a.image.dtype == b.image.dtype
          and a.image.flags.c_contiguous and b.image.flags.c_contiguous
          and all(np.array_equal(x, y) for x, y in
                  ((a.image, b.image), (a.mask, b.mask), (a.distractor_mask, b.distractor_mask))))


def _split(split, scenes, size):
  """Per-scene seconds (before, after); raises if any scene differs."""
  before = after = 0.0
  for i in range(scenes):
    for which in ((0, 1) if i % 2 == 0 else (1, 0)):
      t0 = time.perf_counter()
      if which == 0:
        old = _old_render_scene(0, split, i, size)
        before += time.perf_counter() - t0
      else:
        new = syn.render_scene(0, split, i, size)
        after += time.perf_counter() - t0
    if not _same(old, new):
      raise AssertionError(f"scene {split}/{i} at {size} px differs from the reference")
  return before / scenes, after / scenes


def _pool(scenes):
  src = syn.SyntheticShapes("calibration", scenes)
  out = {}
  for workers in (0, 2):
    t0 = time.perf_counter()
    images, _ = src.arrays(workers=workers, progress=False)
    out[workers] = time.perf_counter() - t0
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--scenes", type=int, default=2000, help="per split")
  ap.add_argument("--size", type=int, default=224)
  ap.add_argument("--pool", type=int, default=0, help="scenes for the process-pool timing")
  args = ap.parse_args()
  print(f"{cpu_name()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
  syn.render_scene(0, "train", 0, args.size)        # caches (noise bank, weights, areas)
  _old_render_scene(0, "train", 0, args.size)
  total_b = total_a = 0.0
  for split in syn.SPLIT_IDS:
    b, a = _split(split, args.scenes, args.size)
    total_b, total_a = total_b + b, total_a + a
    print(f"{split}: {args.scenes} scenes identical; before {b * 1e3:.2f} ms/scene, "
          f"after {a * 1e3:.2f} ms/scene: {b / a:.2f}x")
  print(f"all splits: before {total_b / 3 * 1e3:.2f} ms/scene, after {total_a / 3 * 1e3:.2f} "
        f"ms/scene: {total_b / total_a:.2f}x")
  if args.pool:
    t = _pool(args.pool)
    print(f"arrays() of {args.pool} scenes: in this process {t[0]:.2f} s, two spawned "
          f"processes {t[2]:.2f} s (startup included): {t[0] / t[2]:.2f}x")


if __name__ == "__main__":
  main()
