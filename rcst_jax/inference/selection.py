"""Patch selection: the paper's Eqs. 24-25 and Im et al.'s baseline rules.

Selection works on a [B, N] score grid (N = P*P patches, row-major) and returns
boolean keep masks [B, N]; everything there is jnp and jit-able.

Empty selections. The paper's rule (select_threshold) never sends zero patches
(Eq. 25). The baselines of Im et al. can: their attention-sum rule
(`select_attention_sum`) keeps only the prefix whose cumulative sum is <= delta,
and their attention-threshold rule keeps cam >= delta. In their code
(iil-postech/semantic-attention, engine/__init__.py +
vision_transformer_server.py) an offloaded image with no kept patch is still
sent to the server, which gathers zero patch tokens and classifies from the CLS
token alone; it counts as 0 patches in the cost. That is our default,
"cls_only" (the payload is then a header-only message). `apply_empty_policy`
offers the two alternatives explicitly: "argmax" (keep the top patch, as Eq. 25
does) and "edge" (keep the edge prediction: the image counts as accepted and
costs nothing).
"""

from __future__ import annotations

import os
import zlib
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rcst_jax.settings.schema import EMPTY_POLICIES
from rcst_jax.stats.conformal import sequential_cumsum

# ---------------------------------------------------------------------------
# Selection rules: [B, N] scores -> [B, N] keep mask.


def _desc_rank(scores: jax.Array) -> jax.Array:
  """Rank of each entry in a stable descending sort (ties: lower index first)."""
  order = jnp.argsort(scores, axis=-1, descending=True, stable=True)
  return jnp.argsort(order, axis=-1)


def _argmax_mask(scores: jax.Array) -> jax.Array:
  n = scores.shape[-1]
  return jnp.arange(n) == jnp.argmax(scores, axis=-1)[..., None]


@jax.jit
def select_threshold(scores: jax.Array, tau) -> jax.Array:
  """Eq. 24: keep M_p >= tau; Eq. 25: if nothing qualifies, keep the argmax."""
  keep = scores >= tau
  some = keep.any(-1, keepdims=True)
  return (keep & some) | (_argmax_mask(scores) & ~some)  # boolean ops: exportable as they are


def min_entropy_accept(probs: jax.Array, eta) -> jax.Array:
  """Im et al.'s edge acceptance: -log2(max softmax) < eta (eta = 0.8 in the paper)."""
  return -jnp.log2(jnp.max(probs, axis=-1)) < eta


def key_bytes(key: str | bytes) -> bytes:
  """The raw bytes of an image key: a file name's own bytes, undecodable ones
  included (os.fsdecode keeps them as surrogate escapes); UTF-8 for others."""
  if isinstance(key, bytes):
    return key
  try:
    return os.fsencode(key)
  except UnicodeEncodeError:  # a lone surrogate that no file system produced
    return key.encode("utf-8", "surrogatepass")


def random_ranks(keys: Sequence[str | bytes], seed: int, num_patches: int) -> np.ndarray:
  """Per image, the rank of each patch in a random permutation [n, N].

  Seeded by (seed, the raw bytes of the image's key), so an image keeps its
  permutation whatever the chunking, sharding or bad items elsewhere; and
  nested across k: the k patches of select_random_k(k) are among those of k + 1.
  """
  key = jax.random.PRNGKey(int(seed))
  ids = jnp.asarray([zlib.crc32(key_bytes(k)) for k in keys], jnp.uint32)
  perm = jax.vmap(lambda i: jax.random.permutation(jax.random.fold_in(key, i), num_patches))(ids)
  return np.asarray(jnp.argsort(perm, axis=-1)).astype(np.int32)


@jax.jit
def select_random_k(ranks: jax.Array, k) -> jax.Array:
  """k patches per image, uniformly without replacement: rank < k (see random_ranks)."""
  return ranks < k


@jax.jit
def select_topk(scores: jax.Array, k) -> jax.Array:
  """The k highest scores per row (ties: lower patch index first)."""
  return _desc_rank(scores) < k


@jax.jit
def select_attention_sum(attn: jax.Array, delta) -> jax.Array:
  """Im et al.'s attention-sum rule: sort descending, keep the prefix with cumsum <= delta.

  The patch whose addition crosses delta is excluded, so zero patches are
  possible. The cumulative sum is a sequential float32 one (a Python loop's
  rounding), so exact-boundary cases decide the same way everywhere.
  """
  attn = jnp.asarray(attn, jnp.float32)
  order = jnp.argsort(attn, axis=-1, descending=True, stable=True)
  cum = sequential_cumsum(jnp.take_along_axis(attn, order, axis=-1))
  keep_sorted = cum <= delta
  rows = jnp.arange(attn.shape[0])[:, None]
  return jnp.zeros(attn.shape, bool).at[rows, order].set(keep_sorted)


def apply_empty_policy(offloaded: jax.Array, keep: jax.Array, scores: jax.Array,
                       policy: str = "cls_only"):
  """Resolves offloaded images whose keep mask is empty. Returns (offloaded, keep).

  "cls_only": unchanged; the server sees the CLS token only (Im et al.'s code).
  "argmax": keep the single highest-scoring patch (Eq. 25).
  "edge": the image is not offloaded; the edge prediction stands, cost 0.
  """
  empty = ~keep.any(-1)
  if policy == "cls_only":
    return offloaded, keep
  if policy == "argmax":
    return offloaded, jnp.where(empty[:, None], _argmax_mask(scores), keep)
  if policy == "edge":
    return offloaded & ~empty, keep
  raise ValueError(f"unknown empty-selection policy {policy!r}; choose from {EMPTY_POLICIES}")
