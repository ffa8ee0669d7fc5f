"""Patch layout, bucket rules and padded selections."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rcst_edge.payload.patches import patchify
from rcst_jax.inference import patches as P


def _images(b=2, h=64, w=48, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (b, h, w, 3), dtype=np.uint8)


def test_patchify_is_row_major_and_round_trips():
  img = _images()
  x = np.asarray(patchify(img, 16))
  assert x.shape == (2, 12, 16, 16, 3)
  back = np.zeros_like(img)
  for n in range(12):
    r, c = divmod(n, 3)  # 4 x 3 grid
    np.testing.assert_array_equal(x[:, n], img[:, 16 * r:16 * r + 16, 16 * c:16 * c + 16])
    back[:, 16 * r:16 * r + 16, 16 * c:16 * c + 16] = x[:, n]
  np.testing.assert_array_equal(back, img)
  with pytest.raises(ValueError):
    patchify(img[:, :60], 16)


def test_gather():
  img = _images()
  idx = np.array([[11, 0, 5], [2, 2, 7]])
  got = np.asarray(P.gather_patches(img, idx, 16))
  for b in range(2):
    for j, n in enumerate(idx[b]):
      r, c = divmod(int(n), 3)
      np.testing.assert_array_equal(got[b, j], img[b, 16 * r:16 * r + 16, 16 * c:16 * c + 16])



def test_bucket_rules():
  assert P.bucket_for(0) == 1 and P.bucket_for(1) == 1
  assert P.bucket_for(9) == 10 and P.bucket_for(11) == 12 and P.bucket_for(13) == 16
  assert P.bucket_for(177) == 196 and P.bucket_for(196) == 196
  assert all(P.bucket_for(b) == b for b in P.BUCKETS)
  assert P.bucket_for(5, buckets=(10, 3, 6)) == 6  # order of the tuple does not matter
  with pytest.raises(ValueError):
    P.bucket_for(197)
  with pytest.raises(ValueError):
    P.bucket_for(-1)
  # The module's documented waste: padded sequence (CLS included) at most 27 %
  # longer than the real one, 6.9 % on average over K = 1..196, and below K = 9
  # at most one padding slot.
  ratio = [(P.bucket_for(k) + 1) / (k + 1) for k in range(1, 197)]
  assert max(ratio) < 1.27 and np.mean(ratio) < 1.07
  assert max(P.bucket_for(k) - k for k in range(0, 9)) <= 1
  assert list(P.BUCKETS) == sorted(set(P.BUCKETS)) and P.BUCKETS[-1] == 196


def test_pad_selection_layout():
  keep = np.zeros((3, 196), bool)
  keep[0, [150, 3, 77]] = True
  keep[1, :11] = True
  idx, valid = P.pad_selection(keep)
  assert idx.shape == valid.shape == (3, 12) and idx.dtype == jnp.int32
  np.testing.assert_array_equal(idx[0], [3, 77, 150] + [0] * 9)
  np.testing.assert_array_equal(valid[0], [True] * 3 + [False] * 9)
  np.testing.assert_array_equal(idx[1], list(range(11)) + [0])
  np.testing.assert_array_equal(idx[2], 0)
  assert not np.any(valid[2])

  # Index lists give the same thing (sorted, de-duplicated).
  idx2, valid2 = P.pad_selection([[150, 3, 77, 3], np.arange(11), []], num_patches=196)
  np.testing.assert_array_equal(idx2, idx)
  np.testing.assert_array_equal(valid2, valid)

  # A fixed size works under jit (jnp) as on the host (numpy); wider pads.
  jitted = jax.jit(P.pad_selection, static_argnums=1)
  idx3, valid3 = jitted(jnp.asarray(keep), 16)
  np.testing.assert_array_equal(idx3[:, :12], idx)
  assert not np.any(valid3[:, 12:])
  rand = np.random.default_rng(0).random((20, 196)) < np.linspace(0, 1, 20)[:, None]
  for size in (196, 200):
    host, traced = P.pad_selection(rand, size), jitted(jnp.asarray(rand), size)
    assert isinstance(host[0], np.ndarray)
    for a, b in zip(host, traced):
      np.testing.assert_array_equal(a, np.asarray(b))
  small = np.ones((1, 4), bool)
  idx4, valid4 = P.pad_selection(small, 8)
  np.testing.assert_array_equal(idx4, [[0, 1, 2, 3, 0, 0, 0, 0]])
  np.testing.assert_array_equal(valid4, [[True] * 4 + [False] * 4])

  with pytest.raises(ValueError):
    P.pad_selection([[196]], num_patches=196)
  with pytest.raises(ValueError):
    P.pad_selection(keep.astype(np.int32))


def test_group_by_bucket_partitions_the_batch():
  rng = np.random.default_rng(0)
  counts = np.array([0, 1, 5, 8, 9, 30, 31, 196, 100, 12])
  keep = np.zeros((len(counts), 196), bool)
  for row, k in zip(keep, counts):
    row[rng.choice(196, k, replace=False)] = True
  groups = P.group_by_bucket(keep)
  assert sorted(np.concatenate(list(groups.values())).tolist()) == list(range(len(counts)))
  for size, rows in groups.items():
    assert all(P.bucket_for(counts[r]) == size for r in rows)
  assert set(groups) == {1, 5, 8, 10, 12, 32, 112, 196}

  seen = []
  for rows, idx, valid in P.iter_buckets(keep):
    seen.append(idx.shape[1])
    np.testing.assert_array_equal(np.asarray(valid).sum(1), counts[rows])
    for r, i, v in zip(rows, np.asarray(idx), np.asarray(valid)):
      np.testing.assert_array_equal(i[v], np.flatnonzero(keep[r]))
  assert seen == sorted(groups)
