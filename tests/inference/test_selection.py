"""Patch selection rules (Eqs. 24-25; Im et al.'s top-k, random and attention sum)
against the rules written out by hand, and the empty-selection policies."""


import jax
import jax.numpy as jnp
import numpy as np
import paper_rules
import pytest

from rcst_jax.inference import selection

N = 196


def _attention(rng, b, n=N, ties=False):
  """CLS-attention-like maps: positive, peaked, renormalised to sum 1 in float32."""
  a = rng.gamma(0.3, size=(b, n))
  if ties:
    a = np.round(a * 4) + 0.01
  a = (a / a.sum(-1, keepdims=True)).astype(np.float32)
  return a


# ---------------------------------------------------------------------------
# Selection rules.


def test_select_threshold_and_argmax_fallback(rng):
  s = rng.random((64, N)).astype(np.float32)
  s[:8] *= 0.5  # nothing reaches tau = 0.6 in these rows
  keep = np.asarray(selection.select_threshold(s, 0.6))
  np.testing.assert_array_equal(keep[8:], s[8:] >= 0.6)
  for i in range(8):
    assert keep[i].sum() == 1 and keep[i, np.argmax(s[i])]
  # tau = 0 keeps everything; ties at the max fall back to the first index.
  assert np.asarray(selection.select_threshold(s, 0.0)).all()
  z = np.zeros((1, N), np.float32)
  z[0, [7, 9]] = 0.3
  assert np.flatnonzero(np.asarray(selection.select_threshold(z, 0.5))[0]).tolist() == [7]


@pytest.mark.parametrize("ties", [False, True])
def test_attention_sum_equals_the_hand_written_float32_prefix_rule(rng, ties):
  a = _attention(rng, 200, ties=ties)
  deltas = [0.0, 1e-4, 0.05, 0.5, 0.9, 0.97, 0.999, 1.0]
  # Boundary deltas exactly equal to a float32 prefix sum of some row.
  for i in range(5):
    srt = np.sort(a[i])[::-1]
    acc = np.float32(0)
    for v in srt[:20]:
      acc = np.float32(acc + v)
    deltas.append(float(acc))
  sel = jax.jit(selection.select_attention_sum)
  zero_rows = 0
  for d in deltas:
    keep = np.asarray(sel(a, d))
    want = paper_rules.attention_sum_keep(a, d)
    np.testing.assert_array_equal(keep, want, err_msg=f"delta={d}")
    zero_rows += int((~keep.any(-1)).sum())
  assert zero_rows > 0  # small deltas exercise the zero-patch case


def test_attention_sum_excludes_crossing_patch():
  a = np.array([[0.5, 0.3, 0.2]], np.float32)
  for delta, want in [(0.79, [[True, False, False]]), (0.8, [[True, True, False]]),
                      (0.49, [[False, False, False]])]:
    assert np.asarray(selection.select_attention_sum(a, delta)).tolist() == want
    assert paper_rules.attention_sum_keep(a, delta).tolist() == want  # the transcription too


@pytest.mark.parametrize("ties", [False, True])
def test_threshold_and_topk_equal_the_hand_written_rules(rng, ties):
  """Eqs. 24-25 and Im et al.'s top-k against plain-numpy transcriptions, with
  rows where nothing reaches tau and (ties=True) many equal scores."""
  s = rng.random((40, N)).astype(np.float32)
  if ties:
    s = np.round(s * 4) / 4
  s[:6] *= 0.3
  for tau in (0.0, 0.25, 0.5, 0.6, 0.75, 1.0, 1.5):
    np.testing.assert_array_equal(np.asarray(selection.select_threshold(s, tau)),
                                  paper_rules.threshold_keep(s, tau), err_msg=f"tau={tau}")
  for k in (0, 1, 7, 50, N):
    np.testing.assert_array_equal(np.asarray(selection.select_topk(s, k)),
                                  paper_rules.topk_keep(s, k), err_msg=f"k={k}")


def test_topk_and_random_k(rng):
  s = rng.random((32, N)).astype(np.float32)
  for k in [0, 1, 50, N]:
    keep = np.asarray(selection.select_topk(s, k))
    assert (keep.sum(-1) == k).all()
    if 0 < k < N:
      assert (np.where(keep, s, np.inf).min(-1) > np.where(keep, -np.inf, s).max(-1)).all()
    r = np.asarray(selection.select_random_k(selection.random_ranks([f"img{i}" for i in range(32)], k, N), k))
    assert (r.sum(-1) == k).all()
  ties = np.zeros((1, N), np.float32)
  assert np.flatnonzero(np.asarray(selection.select_topk(ties, 3))[0]).tolist() == [0, 1, 2]
  keys = [f"img{i}" for i in range(32)]
  ranks = selection.random_ranks(keys, 3, N)
  assert (np.sort(ranks, -1) == np.arange(N)).all()  # a permutation per image
  a = np.asarray(selection.select_random_k(ranks, 20))
  # Same key, same patches, whatever the batch it is in; nested across k.
  np.testing.assert_array_equal(a[5], np.asarray(selection.select_random_k(
      selection.random_ranks(keys[5:6], 3, N), 20))[0])
  assert (np.asarray(selection.select_random_k(ranks, 21)) >= a).all()
  assert not np.array_equal(a, np.asarray(selection.select_random_k(selection.random_ranks(keys, 4, N), 20)))
  assert not np.array_equal(a[0], a[1])  # rows differ
  # Uniform: each patch kept with probability k/N.
  rows = np.asarray(selection.select_random_k(selection.random_ranks([str(i) for i in range(4000)], 5, N), 49))
  freq = rows.mean(0)
  assert np.abs(freq - 0.25).max() < 6 * np.sqrt(0.25 * 0.75 / len(rows))


def test_min_entropy_accept():
  probs = jnp.asarray([[0.6, 0.4], [0.5, 0.5], [2 ** -0.8 + 1e-4, 1 - 2 ** -0.8 - 1e-4],
                       [2 ** -0.8 - 1e-4, 1 - 2 ** -0.8 + 1e-4]])
  # -log2(p_max) < 0.8  <=>  p_max > 2**-0.8 = 0.574
  assert np.asarray(selection.min_entropy_accept(probs, 0.8)).tolist() == [True, False, True, False]


def test_empty_policies(rng):
  a = _attention(rng, 6)
  keep = np.asarray(selection.select_attention_sum(a, 0.0))  # all empty
  off = jnp.asarray([True, True, False, True, False, True])
  o, k = selection.apply_empty_policy(off, keep, a, "cls_only")
  assert np.array_equal(o, off) and not np.asarray(k).any()
  o, k = selection.apply_empty_policy(off, keep, a, "argmax")
  assert np.array_equal(o, off) and (np.asarray(k).sum(-1) == 1).all()
  assert np.asarray(k)[np.arange(6), a.argmax(-1)].all()
  o, _ = selection.apply_empty_policy(off, keep, a, "edge")
  assert not np.asarray(o).any()
  with pytest.raises(ValueError, match="policy"):
    selection.apply_empty_policy(off, keep, a, "drop")
