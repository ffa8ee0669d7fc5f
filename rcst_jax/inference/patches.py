"""Gathering selected patches and fixed-shape padding of patch selections.

Patches are numbered row-major over the (H/p) x (W/p) grid, as ViT token
order is (`payload.patches.patchify`, shared with the wire format). A
selection of K patches travels to the server as
``(patches [B,K,p,p,3], idx [B,K], valid [B,K])``.

Bucketing: jit compiles once per input shape, and K varies per image. We pad
K up to the next size in ``BUCKETS``, so a whole evaluation compiles at most
``len(BUCKETS)`` server programs per batch size. The sizes step by about
1/8 of their value (multiples of 8 from 24 on) and are dense below 8, so the
padded sequence, CLS included, is at most 27 % longer than the real one
(K = 11 -> 12 ... K = 12 -> 16), 6.9 % on average over K = 1..196, and below
K = 9 at most one slot is padding (high tau keeps only a few patches).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import jax.numpy as jnp
import numpy as np

from rcst_edge.payload.patches import patchify

BUCKETS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 56, 64, 80, 96,
           112, 128, 144, 160, 176, 196)


def gather_patches(images, idx, p: int = 16):
  """The patches of ``images`` [B,H,W,C] at grid indices ``idx`` [B,K] -> [B,K,p,p,C]."""
  all_patches = patchify(images, p)
  return jnp.take_along_axis(all_patches, jnp.asarray(idx)[:, :, None, None, None], axis=1)


def bucket_for(k: int, buckets: Sequence[int] = BUCKETS) -> int:
  """Smallest bucket >= k (k = 0 uses the smallest bucket, all slots padding)."""
  k = int(k)
  if k < 0:
    raise ValueError(f"negative patch count {k}")
  for size in sorted(buckets):
    if size >= k:
      return int(size)
  raise ValueError(f"{k} patches exceed the largest bucket {max(buckets)}")


def as_keep_mask(selection, num_patches: int | None = None):
  """A bool keep-mask [B,N], or a list of per-image index arrays, -> bool [B,N]."""
  if isinstance(selection, (list, tuple)):
    if num_patches is None:
      raise ValueError("num_patches is needed to turn index lists into a mask")
    keep = np.zeros((len(selection), num_patches), bool)
    for row, ids in zip(keep, selection):
      ids = np.asarray(ids, np.int64).reshape(-1)
      if ids.size and (ids.min() < 0 or ids.max() >= num_patches):
        raise ValueError(f"patch index out of range [0, {num_patches})")
      row[ids] = True
    return keep
  keep = selection
  if keep.dtype != bool:
    raise ValueError(f"keep mask must be bool, got {keep.dtype}")
  return keep


def pad_selection(selection, size: int | None = None, buckets: Sequence[int] = BUCKETS,
                  num_patches: int | None = None):
  """Keep-mask [B,N] (or per-image index lists) -> (idx [B,S], valid [B,S]).

  Kept patches come first in ascending patch index; padding slots hold index
  0 and valid False. ``size`` defaults to the bucket of the largest row
  count, which needs concrete values; pass ``size`` to use under jit.
  A host (numpy) mask is padded in numpy: a sweep meets a new row count per
  bucket and call, and eager jnp would compile every op for every one
  (~1,000 small compilations, ~29 s, in one demo run).
  """
  keep = as_keep_mask(selection, num_patches)
  n = keep.shape[1]
  if size is None:
    size = bucket_for(int(np.max(np.sum(np.asarray(keep), axis=1), initial=0)), buckets)
  xp = np if isinstance(keep, np.ndarray) else jnp
  if size > n:  # a bucket wider than the grid: pad with never-kept columns
    keep = xp.pad(keep, ((0, 0), (0, size - n)))
  # A stable sort on "not kept" puts kept indices first, still ascending.
  order = xp.argsort(~keep, axis=1, stable=True)[:, :size]
  valid = xp.arange(size)[None, :] < keep.sum(axis=1, keepdims=True)
  return xp.where(valid, order, 0).astype(xp.int32), valid


def group_by_bucket(selection, buckets: Sequence[int] = BUCKETS,
                    num_patches: int | None = None) -> dict[int, np.ndarray]:
  """{bucket: row indices} so each group can run with one static shape."""
  counts = np.asarray(as_keep_mask(selection, num_patches)).sum(axis=1)
  sizes = np.array([bucket_for(c, buckets) for c in counts], dtype=np.int64)
  return {int(s): np.flatnonzero(sizes == s) for s in np.unique(sizes)}


def iter_buckets(selection, buckets: Sequence[int] = BUCKETS, num_patches: int | None = None
                 ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """Yields (rows, idx [R,S], valid [R,S]) per bucket, smallest bucket first (numpy)."""
  keep = np.asarray(as_keep_mask(selection, num_patches))
  for size, rows in sorted(group_by_bucket(keep, buckets).items()):
    idx, valid = pad_selection(keep[rows], size)
    yield rows, idx, valid
