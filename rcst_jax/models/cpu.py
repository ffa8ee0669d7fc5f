"""What the model families share for their CPU inference forms."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def on_cpu() -> bool:
  """Whether the 'auto' switches pick their CPU forms."""
  return jax.default_backend() == "cpu"


def map_chunks(fn, args: tuple, n: int):
  """``fn(*args)`` over micro-batches of n rows (``lax.map``), the batch
  (axis 0 of every arg) padded to a multiple of n; every output has the
  batch as axis 0 and comes back unpadded."""
  b = args[0].shape[0]
  pad = -b % n
  split = lambda a: jnp.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1)).reshape(
      -1, n, *a.shape[1:])
  out = jax.lax.map(lambda chunk: fn(*chunk), tuple(split(a) for a in args))
  return jax.tree_util.tree_map(lambda y: y.reshape(-1, *y.shape[2:])[:b], out)
