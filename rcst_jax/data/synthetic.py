"""SyntheticShapes: the embedded demo dataset (no download, deterministic, fast).

Each 224x224 image holds one object whose class is its fill texture (12
textures: stripes in four orientations, fine and coarse checker, fine and
coarse dots, grid, crosshatch, rings, flat), drawn as a random shape covering
10-25 % of the frame at a random position, scale and rotation. The rest of
the frame is clutter: a smooth colour field with noise, lines and blobs, plus
3-5 distractors of *other* classes that are smaller, faint or cut in half.
Colours and shapes are random and never decide the class.

Why this design: the class evidence is local (a texture is recognisable
within one or two 16x16 patches) and sits in the object's patches, so a server
that sees only those patches can be near perfect, random patches mostly show
clutter and wrong-class distractors, and a small CNN that pools globally sees
conflicting evidence (it must weigh the largest full-contrast region). An
earlier version made the class shape x texture; tiny models trained for
minutes on two CPU cores could not learn the shape part (about 25 %
accuracy), so the shape is now a nuisance variable.

Images are already at model resolution: do not pass them through Preprocess.
Cost: about 2.5 ms of CPU per image (numpy, one core); `arrays(workers=2)`
renders in two processes. Difficulty knobs are the module constants below.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import math
import multiprocessing
import types
from typing import NamedTuple

import numpy as np
from tqdm.auto import tqdm

from rcst_jax.data.preprocess import Example

SHAPES = ("circle", "square", "triangle", "cross")
# class name -> (pattern, orientation in degrees or None for random, period scale)
TEXTURES = {
    "horizontal stripes": ("stripes", 0.0, 1.0),
    "vertical stripes": ("stripes", 90.0, 1.0),
    "rising stripes": ("stripes", 45.0, 1.0),
    "falling stripes": ("stripes", 135.0, 1.0),
    "fine checker": ("checker", None, 1.0),
    "coarse checker": ("checker", None, 2.0),
    "fine dots": ("dots", None, 1.0),
    "coarse dots": ("dots", None, 2.0),
    "grid": ("grid", None, 1.5),
    "crosshatch": ("crosshatch", None, 1.0),
    "rings": ("rings", None, 1.0),
    "flat": ("flat", None, 1.0),
}
CLASS_NAMES = tuple(TEXTURES)  # label = texture index
NUM_CLASSES = len(CLASS_NAMES)

SPLIT_IDS = {"train": 0, "calibration": 1, "test": 2}
DEFAULT_SIZES = {"train": 20_000, "calibration": 1_000, "test": 5_000}

OBJECT_AREA = (0.11, 0.24)        # fraction of the frame, uniform
DISTRACTORS = (3, 5)              # how many, inclusive
SMALL_AREA = (0.012, 0.035)       # full-contrast but small
FAINT_AREA, FAINT_ALPHA = (0.03, 0.07), (0.25, 0.45)
PARTIAL_AREA = (0.03, 0.07)       # full-contrast, about half cut away
TEXTURE_PERIOD = (7.0, 12.0)      # pixels at 224; under one 16-px patch
_CROSS_ARM = 0.38                 # cross arm half-width / arm half-length


# ---------------------------------------------------------------- geometry


def _sdf(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Signed distance in units of the shape's size (negative inside)."""
  if shape == "circle":
    return np.sqrt(u * u + v * v) - 1.0
  if shape == "square":
    return _box(u, v, 1.0, 1.0)
  if shape == "cross":
    return np.minimum(_box(u, v, 1.0, _CROSS_ARM), _box(u, v, _CROSS_ARM, 1.0))
  if shape == "triangle":  # equilateral, circumradius 1 (Inigo Quilez's formula)
    k, h = math.sqrt(3.0), math.sqrt(3.0) / 2  # Python floats keep arrays float32
    x, y = np.abs(u) - h, v + h / k
    flip = x + k * y > 0
    x, y = np.where(flip, (x - k * y) / 2, x), np.where(flip, (-k * x - y) / 2, y)
    x = x - np.clip(x, -2 * h, 0.0)
    return -np.sqrt(x * x + y * y) * np.sign(y)
  raise ValueError(shape)


def _box(u, v, hu, hv):
  qu, qv = np.abs(u) - hu, np.abs(v) - hv
  outside = np.sqrt(np.maximum(qu, 0) ** 2 + np.maximum(qv, 0) ** 2)
  return outside + np.minimum(np.maximum(qu, qv), 0.0)


BOUND = {"circle": 1.0, "square": math.sqrt(2.0), "triangle": 1.0,
         "cross": math.hypot(1.0, _CROSS_ARM)}  # radius of the enclosing circle


@functools.lru_cache(maxsize=None)
def _unit_area(shape: str) -> float:
  """Area / size^2, measured once on a fine grid (exact enough, no formulas)."""
  g = (np.arange(1000) + 0.5) / 500.0 - 1.0
  g = g * BOUND[shape]
  u, v = np.meshgrid(g, g)
  return float((_sdf(shape, u, v) < 0).mean() * (2 * BOUND[shape]) ** 2)


def _texture(texture: str, a, b, r) -> np.ndarray:
  """Mix weight in [0, 1]; a(), b() give phases in periods (r(): radius in periods), computed
  only if the pattern needs them; soft edges against aliasing."""
  if texture == "stripes":
    return np.clip(0.5 + 1.5 * np.sin(2 * np.pi * a()), 0, 1)
  if texture == "rings":
    return np.clip(0.5 + 1.5 * np.sin(2 * np.pi * r()), 0, 1)
  if texture == "flat":
    return np.ones_like(a())
  a, b = a(), b()
  if texture == "checker":
    return np.clip(0.5 + 3.0 * np.sin(2 * np.pi * a) * np.sin(2 * np.pi * b), 0, 1)
  if texture == "dots":
    return np.clip(0.5 + 1.5 * (np.cos(2 * np.pi * a) + np.cos(2 * np.pi * b) - 0.9), 0, 1)
  if texture == "grid":  # thin lines both ways
    return np.clip(3.0 * (np.maximum(np.cos(2 * np.pi * a), np.cos(2 * np.pi * b)) - 0.7), 0, 1)
  if texture == "crosshatch":  # two diagonal stripe sets
    return np.clip(0.5 + 1.5 * np.maximum(np.sin(2 * np.pi * (a + b) / 1.4),
                                          np.sin(2 * np.pi * (a - b) / 1.4)), 0, 1)
  raise ValueError(texture)


def _hsv(h, s, v) -> np.ndarray:
  """HSV in [0,1] -> RGB in [0,255]; vectorised over the last axis."""
  if isinstance(h, float) and isinstance(s, float) and isinstance(v, float) and h >= 0:
    return _hsv_one(h, s, v)
  h, s, v = np.broadcast_arrays(np.asarray(h, np.float32) % 1.0, s, v)
  k = (np.array([5.0, 3.0, 1.0], np.float32) + h[..., None] * 6) % 6
  rgb = v[..., None] - v[..., None] * s[..., None] * np.clip(np.minimum(k, 4 - k), 0, 1)
  return (255.0 * rgb).astype(np.float32)


def _hsv_one(h: float, s: float, v: float) -> np.ndarray:
  """`_hsv` of one colour in Python floats, bit for bit: array calls cost ~30 us on 3 numbers.

  The float32 steps round through `_f32` (a float32 +, -, * or fmod done in
  float64 and rounded once is the correctly rounded float32 result); the
  float64 steps are Python's own.
  """
  h = math.fmod(_f32(h), 1.0)   # h >= 0: numpy's % is fmod
  out = []
  for base in (5.0, 3.0, 1.0):
    k = math.fmod(_f32(base + _f32(h * 6)), 6.0)
    m = min(max(min(k, _f32(4 - k)), 0.0), 1.0)
    out.append(255.0 * (v - v * s * m))
  return np.array(out, np.float32)


def _f32(x: float) -> float:
  return float(np.float32(x))


# ---------------------------------------------------------------- one scene


class Scene(NamedTuple):
  image: np.ndarray            # uint8 [S, S, 3]
  label: int
  mask: np.ndarray             # bool [S, S]: object pixels (alpha > 0.5)
  bbox: tuple[int, int, int, int]  # object (top, left, bottom, right), exclusive ends
  distractor_mask: np.ndarray  # bool [S, S]: visible distractor pixels


class _Canvas:
  """A float32 RGB image, planar [3, S, S] (painting a window then runs along rows, not over
  3-long pixels), plus the pixel-centre grid; elements paint in windows."""

  def __init__(self, size: int, rng: np.random.Generator):
    self.size, self.rng = size, rng
    self.grid = (np.arange(size, dtype=np.float32) + 0.5)
    self.image = _background(size, rng)

  def window(self, cy, cx, radius):
    lo = lambda c: int(max(0, np.floor(c - radius - 2)))
    hi = lambda c: int(min(self.size, np.ceil(c + radius + 2)))
    return slice(lo(cy), hi(cy)), slice(lo(cx), hi(cx))

  def paint(self, win, alpha: np.ndarray, colour: np.ndarray):
    """colour: [3] or planar [3, h, w] over the window."""
    region = self.image[(slice(None),) + tuple(win)]
    colour = colour[:, None, None] if colour.ndim == 1 else colour
    delta = np.subtract(colour, region, dtype=np.float32)  # in place: fewer temporaries
    delta *= alpha
    region += delta


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
  """Smooth random colour field plus fine noise: texture everywhere, no class. Planar."""
  n = 4
  grid = _hsv(rng.random((n, n)), rng.uniform(0, 0.6, (n, n)), rng.uniform(0.3, 0.75, (n, n)))
  w = _bilinear_weights(size, n)
  field = np.einsum("yi,ijc,xj->yxc", w, grid, w, optimize=_einsum_path(size, n))
  dy, dx = rng.integers(0, size, 2)
  noise = _noise_bank(size)[:, dy:dy + size, dx:dx + size]
  out = np.empty((3, size, size), np.float32)
  return np.add(field.transpose(2, 0, 1), rng.uniform(6, 18) * noise, out=out)


@functools.lru_cache(maxsize=None)
def _einsum_path(size: int, n: int):
  # The path optimize=True finds (it depends on the shapes only), found once.
  w, g = np.zeros((size, n), np.float32), np.zeros((n, n, 3), np.float32)
  return np.einsum_path("yi,ijc,xj->yxc", w, g, w, optimize=True)[0]


@functools.lru_cache(maxsize=None)
def _bilinear_weights(size: int, n: int) -> np.ndarray:
  pos = (np.arange(size) + 0.5) / size * (n - 1)
  return np.maximum(0, 1 - np.abs(pos[:, None] - np.arange(n)[None, :])).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _noise_bank(size: int) -> np.ndarray:
  # One fixed noise image, planar; scenes take random crops (fresh normals cost more than the rest).
  noise = np.random.default_rng(1234).standard_normal((2 * size, 2 * size, 3)).astype(np.float32)
  return np.ascontiguousarray(noise.transpose(2, 0, 1))


def _clutter(c: _Canvas):
  """Soft blobs and line segments of random colour, under the shapes."""
  rng, s = c.rng, c.size
  for _ in range(rng.integers(3, 7)):
    (cy, cx), r = rng.uniform(0, s, 2).tolist(), float(rng.uniform(0.05, 0.18)) * s
    ys, xs = c.window(cy, cx, r)
    d2 = ((c.grid[ys, None] - cy) ** 2 + (c.grid[None, xs] - cx) ** 2) / (r * r)
    alpha = float(rng.uniform(0.3, 0.7)) * np.maximum(1 - d2, 0) ** 2  # compact bump
    c.paint((ys, xs), alpha, _hsv(rng.random(), rng.random(), rng.uniform(0.2, 1)))
  for _ in range(rng.integers(2, 6)):
    p0 = rng.uniform(0, s, 2)
    p1 = p0 + rng.uniform(0.15, 0.6) * s * _unit_vector(rng.uniform(0, 2 * np.pi))
    width = float(rng.uniform(1.0, 3.0)) * s / 224
    ys, xs = (_span(p0[k], p1[k], 3, s) for k in (0, 1))
    d = _segment_distance(c.grid[ys], c.grid[xs], p0, p1)
    alpha = float(rng.uniform(0.5, 1.0)) * np.clip(width / 2 + 0.5 - d, 0, 1)
    c.paint((ys, xs), alpha, _hsv(rng.random(), rng.random(), rng.random()))


def _span(a: float, b: float, margin: int, size: int) -> slice:
  return slice(int(max(0, min(a, b) - margin)), int(min(size, max(a, b) + margin)))


def _unit_vector(angle: float) -> np.ndarray:
  return np.array([np.sin(angle), np.cos(angle)])


def _segment_distance(gy, gx, p0, p1):
  """Distance from pixel centres (gy x gx) to the segment p0-p1, (y, x) points."""
  y0, x0, dy, dx = float(p0[0]), float(p0[1]), float(p1[0] - p0[0]), float(p1[1] - p0[1])
  y, x = gy[:, None] - y0, gx[None, :] - x0
  t = np.clip((y * dy + x * dx) / max(dy * dy + dx * dx, 1e-6), 0, 1)
  return np.sqrt((y - t * dy) ** 2 + (x - t * dx) ** 2)


def _shape_params(rng, size: int, label: int, area: float, centre=None):
  shape, texture = SHAPES[int(rng.integers(len(SHAPES)))], CLASS_NAMES[label]
  scale = float(np.sqrt(area * size * size / _unit_area(shape)))  # pixels per shape unit
  bound = BOUND[shape] * scale
  if centre is None:
    centre = rng.uniform(bound + 2, size - bound - 2, 2)
  return dict(shape=shape, texture=texture, scale=scale, bound=bound, centre=centre,
              angle=float(rng.uniform(0, 2 * np.pi)))


def _draw_shape(c: _Canvas, p: dict, opacity: float = 1.0, cut=None):
  """Paints a textured shape; returns (window, alpha in that window)."""
  rng, scale = c.rng, p["scale"]
  cy, cx = (float(x) for x in p["centre"])
  win = c.window(cy, cx, p["bound"])
  dy, dx = c.grid[win[0], None] - cy, c.grid[None, win[1]] - cx
  cos, sin = math.cos(p["angle"]), math.sin(p["angle"])
  u, v = dx * cos + dy * sin, dy * cos - dx * sin  # pixels, in the shape's frame
  alpha = np.clip(0.5 - scale * _sdf(p["shape"], u / scale, v / scale), 0, 1)
  if cut is not None:  # keep one side of a line through (near) the centre
    phi, offset = cut
    alpha *= np.clip(0.5 + u * math.cos(phi) + v * math.sin(phi) - offset * scale, 0, 1)
  pattern, degrees, period_scale = TEXTURES[p["texture"]]
  period = float(rng.uniform(*TEXTURE_PERIOD)) * period_scale * c.size / 224
  # Oriented classes fix the stripe direction in the image frame (+-8 degrees).
  phi = float(rng.uniform(0, np.pi)) if degrees is None else \
      math.radians(degrees + float(rng.uniform(-8, 8)))
  phase_a, phase_b = float(rng.random()), float(rng.random())
  light, dark = _colour_pair(rng)
  alpha = opacity * alpha
  # Texture and paint only the rows and columns the shape reaches: alpha 0 paints nothing.
  rows, cols = np.flatnonzero(alpha.any(1)), np.flatnonzero(alpha.any(0))
  if rows.size:
    ys, xs = slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)
    dy, dx = dy[ys], dx[:, xs]
    ca, sa = math.cos(phi) / period, math.sin(phi) / period
    mix = _texture(pattern, lambda: dy * ca - dx * sa + phase_a,
                   lambda: dx * ca + dy * sa + phase_b, lambda: np.sqrt(dx * dx + dy * dy) / period)
    colour = dark[:, None, None] + mix * (light - dark)[:, None, None]
    c.paint((slice(win[0].start + ys.start, win[0].start + ys.stop),
             slice(win[1].start + xs.start, win[1].start + xs.stop)), alpha[ys, xs], colour)
  return win, alpha


def _colour_pair(rng) -> tuple[np.ndarray, np.ndarray]:
  """Two saturated colours far apart in brightness; randomly swapped."""
  h = rng.random()
  light = _hsv(h, rng.uniform(0.4, 1.0), rng.uniform(0.75, 1.0))
  dark = _hsv(h + rng.uniform(0.25, 0.75), rng.uniform(0.4, 1.0), rng.uniform(0.05, 0.35))
  return (light, dark) if rng.random() < 0.5 else (dark, light)


def _place_distractor(rng, size, obj, bound):
  """A centre away from the object if possible (a few tries), else anywhere."""
  for _ in range(8):
    centre = rng.uniform(bound + 2, size - bound - 2, 2)
    if np.hypot(*(centre - obj["centre"])) > 0.9 * (obj["bound"] + bound):
      break
  return centre


def render_scene(seed: int, split: str, index: int, size: int = 224) -> Scene:
  """The scene for (seed, split, index): a pure function of those numbers."""
  rng = np.random.default_rng([seed, SPLIT_IDS[split], index])
  label = int(rng.integers(NUM_CLASSES))
  obj = _shape_params(rng, size, label, rng.uniform(*OBJECT_AREA))
  canvas = _Canvas(size, rng)
  _clutter(canvas)
  distractors = np.zeros((size, size), bool)
  for _ in range(rng.integers(DISTRACTORS[0], DISTRACTORS[1] + 1)):
    other = int(label + rng.integers(1, NUM_CLASSES)) % NUM_CLASSES  # never the object's class
    mode = rng.integers(3)
    area = rng.uniform(*(SMALL_AREA, FAINT_AREA, PARTIAL_AREA)[mode])
    p = _shape_params(rng, size, other, area, centre=np.zeros(2))
    p["centre"] = _place_distractor(rng, size, obj, p["bound"])
    opacity = float(rng.uniform(*FAINT_ALPHA)) if mode == 1 else 1.0
    cut = (float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(-0.2, 0.3))) if mode == 2 else None
    win, alpha = _draw_shape(canvas, p, opacity, cut)
    distractors[win] |= alpha > 0.5 * opacity
  win, alpha = _draw_shape(canvas, obj)  # object last: always complete and on top
  mask = np.zeros((size, size), bool)
  mask[win] = alpha > 0.5
  return Scene(_to_uint8(canvas.image), label, mask, _bbox(mask), distractors & ~mask)


def _to_uint8(planar: np.ndarray) -> np.ndarray:
  """Rounded, clipped [S, S, 3] uint8 from the planar canvas (which it overwrites)."""
  np.clip(np.add(planar, 0.5, out=planar), 0, 255, out=planar)
  image = np.empty(planar.shape[1:] + (3,), np.uint8)
  for k in range(3):   # one plane at a time: 2x faster than a transposed copy
    image[..., k] = planar[k]
  return image


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
  rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
  return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def patch_coverage(mask: np.ndarray, patch_size: int = 16) -> np.ndarray:
  """Fraction of each patch covered by a mask: [S, S] -> [S/p, S/p] float32."""
  s = mask.shape[0] // patch_size
  return mask[:s * patch_size, :s * patch_size].reshape(
      s, patch_size, s, patch_size).mean(axis=(1, 3), dtype=np.float32)


# ---------------------------------------------------------------- the source


class SyntheticShapes:
  """An ImageSource: scene `i` of (seed, split) is rendered on demand, so any
  index is available at once and memory stays small."""
  num_classes = NUM_CLASSES
  class_names = CLASS_NAMES

  def __init__(self, split: str = "train", num_examples: int | None = None, seed: int = 0,
               image_size: int = 224):
    if split not in SPLIT_IDS:
      raise ValueError(f"split must be one of {sorted(SPLIT_IDS)}, got {split!r}")
    self.split, self.seed, self.image_size = split, int(seed), int(image_size)
    self.num_examples = DEFAULT_SIZES[split] if num_examples is None else int(num_examples)

  def __len__(self) -> int:
    return self.num_examples

  def scene(self, index: int) -> Scene:
    if not 0 <= index < self.num_examples:
      raise IndexError(f"index {index} out of range for {self.num_examples} examples")
    return render_scene(self.seed, self.split, int(index), self.image_size)

  def __getitem__(self, index: int) -> Example:
    sc = self.scene(index)
    return Example(sc.image, sc.label, f"synthetic/{self.split}/{index}")

  def arrays(self, indices=None, workers: int = 0, progress: bool = True,
             coverage: bool = False):
    """(images uint8 [N,S,S,3], labels int32 [N]) in memory, e.g. for training;
    with ``coverage``, also each patch's fraction under the object [N, grid^2].

    workers > 1 renders in that many spawned processes (spawn, not fork: the
    parent may hold JAX threads).
    """
    indices = np.arange(len(self)) if indices is None else np.asarray(indices)
    chunks = np.array_split(np.arange(len(indices)), max(1, len(indices) // 256))
    jobs = [(self.seed, self.split, self.image_size, indices[c], coverage) for c in chunks]
    parts = []
    bar = tqdm(total=len(indices), desc=f"synthetic {self.split}", disable=not progress)
    with _pool(workers) as pool:
      for part in pool.map(_render_chunk, jobs):
        parts.append(part)
        bar.update(len(part[1]))
    bar.close()
    return tuple(np.concatenate(x) for x in zip(*parts))


def _render_chunk(job):
  seed, split, size, indices, coverage = job
  scenes = [render_scene(seed, split, int(i), size) for i in indices]
  out = (np.stack([s.image for s in scenes]), np.array([s.label for s in scenes], np.int32))
  if coverage:
    out += (np.stack([patch_coverage(s.mask).reshape(-1) for s in scenes]),)
  return out


def _pool(workers: int):
  """A context giving `.map`: in-process, or a pool of spawned processes."""
  if workers <= 1:
    return contextlib.nullcontext(types.SimpleNamespace(map=map))
  return concurrent.futures.ProcessPoolExecutor(
      workers, mp_context=multiprocessing.get_context("spawn"))
