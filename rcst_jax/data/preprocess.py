"""The batching every source shares, and normalisation on device.

The eval transform itself (resize, centre crop, the bad-image checks) is
JAX-free, for the edge: rcst_edge/images.py.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
from typing import Iterable, Iterator, NamedTuple, Protocol, Sequence

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from rcst_edge.images import (  # noqa: F401  (the data layer's names for them)
  IMAGENET_MEAN,
  IMAGENET_STD,
  INTERPOLATIONS,
  MAX_ASPECT,
  MAX_PIXELS,
  BadImageError,
  BadItemError,
  BadLabelError,
  ImageSizeError,
  Preprocess,
  array_to_rgb,
  center_crop,
  check_size,
  open_rgb,
  resize_short_side,
)


def normalize(images, mean=IMAGENET_MEAN, std=IMAGENET_STD):
  """uint8 [..., 3] -> float32 (x / 255 - mean) / std, on device."""
  x = jnp.asarray(images, jnp.float32) / 255.0
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


# ---------------------------------------------------------------- sources


class Example(NamedTuple):
  image: np.ndarray  # uint8 [crop, crop, 3], already preprocessed
  label: int
  key: str  # stable identifier (file name or dataset/split/index)


class ImageSource(Protocol):
  """Random access, so evaluation can shard and resume from an index.

  ``source[i]`` returns an Example or raises BadItemError.
  """
  num_classes: int

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> Example: ...


class Held:
  """An ImageSource that keeps the items it has read (bad ones too, as their
  errors) up to ``max_bytes`` of images: for a set a run reads more than once,
  such as the calibration images a certificate reads three times, so each is
  decoded or rendered once. Same items, same errors, same order as the source."""

  def __init__(self, source: ImageSource, max_bytes: int = 1 << 30):
    self.source, self.max_bytes, self.nbytes = source, int(max_bytes), 0
    self.num_classes = getattr(source, "num_classes", None)
    self._held: dict = {}

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> Example:
    index = int(index)
    got = self._held.get(index)
    if got is None:
      try:
        got = self.source[index]
      except BadItemError as e:
        got = e
      size = got.image.nbytes if isinstance(got, Example) else 0
      if self.nbytes + size <= self.max_bytes:
        self._held[index], self.nbytes = got, self.nbytes + size
    if isinstance(got, BadItemError):
      raise got
    return got


class Batch(NamedTuple):
  images: np.ndarray  # uint8 [B, H, W, 3]; zeros where not valid
  labels: np.ndarray  # int32 [B]; -1 where not valid
  keys: list[str]     # '' where not valid
  valid: np.ndarray   # bool [B]; False only in the padded tail of the last batch


def _fetch(source: ImageSource, index: int) -> Example | BadItemError:
  """One item, or the error that says why it is skipped."""
  try:
    ex = source[int(index)]
  except BadItemError as e:
    return e
  num_classes = getattr(source, "num_classes", None)
  if not isinstance(ex.label, (int, np.integer)) or ex.label < 0 or (
      num_classes is not None and ex.label >= num_classes):
    return BadLabelError(f"{ex.key}: label {ex.label!r} outside [0, {num_classes})")
  return ex


def _fetch_all(source, indices: Sequence[int], chunk: int, workers: int):
  """Yields fetched items in order; threads help because PIL releases the GIL."""
  if workers <= 1:
    for i in indices:
      yield _fetch(source, i)
    return
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    # Chunked map keeps at most a few batches of decoded images in memory.
    for start in range(0, len(indices), chunk):
      yield from pool.map(lambda i: _fetch(source, i), indices[start:start + chunk])


def _stack(examples: list[Example], batch_size: int) -> Batch:
  n = len(examples)
  images = np.zeros((batch_size,) + examples[0].image.shape, np.uint8)
  images[:n] = np.stack([e.image for e in examples])
  labels = np.full((batch_size,), -1, np.int32)
  labels[:n] = [e.label for e in examples]
  keys = [e.key for e in examples] + [""] * (batch_size - n)
  return Batch(images, labels, keys, np.arange(batch_size) < n)


def batches(source: ImageSource, indices: Iterable[int] | None = None, batch_size: int = 64,
            *, skipped: collections.Counter | None = None, workers: int = 0,
            progress: bool = True, desc: str | None = None) -> Iterator[Batch]:
  """Yields full batches (the last one padded, see `valid`) of good items.

  Bad items (undecodable, label outside [0, num_classes)) are skipped and
  counted in `skipped` by reason: one bad file must not end a 50k-image run.
  """
  indices = list(range(len(source)) if indices is None else indices)
  skipped = collections.Counter() if skipped is None else skipped
  items = tqdm(_fetch_all(source, indices, 2 * batch_size, workers), total=len(indices),
               desc=desc, disable=not progress, leave=False)
  buf: list[Example] = []
  for item in items:
    if isinstance(item, BadItemError):
      skipped[item.reason] += 1
      if sum(skipped.values()) <= 5:
        logging.warning("skipping item: %s", item)
      continue
    buf.append(item)
    if len(buf) == batch_size:
      yield _stack(buf, batch_size)
      buf = []
  if buf:
    yield _stack(buf, batch_size)
