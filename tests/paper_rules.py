"""The paper's decision rules written out in plain numpy, one image at a time.

Tests compare the library against these, never against the selection / APS
functions the method table binds (a test that calls the function under test
for its expected value cannot fail). Each rule is a direct transcription:
float32 throughout, as the edge computes, sequential float32 sums in a
Python loop, stable descending sorts (ties: lower index first).
"""

import numpy as np


def _desc_order(row):
  """Indices of ``row`` from largest to smallest; ties keep the lower index first."""
  row = np.asarray(row)
  return sorted(range(len(row)), key=lambda j: (-float(row[j]), j))


def accepts(p_max, lam):
  """Eq. 15: the edge answers iff p_max >= lambda, both as float32."""
  return np.asarray(p_max, np.float32) >= np.float32(lam)


def threshold_keep(scores, tau):
  """Eqs. 24-25, per image: keep the patches scoring >= tau; if none
  qualifies, keep only the highest-scoring one (the first on ties)."""
  out = []
  for row in np.asarray(scores, np.float32):
    keep = np.array([v >= np.float32(tau) for v in row], bool)
    if not keep.any():
      best = 0
      for j, v in enumerate(row):
        if v > row[best]:
          best = j
      keep[best] = True
    out.append(keep)
  return np.stack(out)


def topk_keep(scores, k):
  """Top-K (Im et al.): the k highest scores per image, ties to the lower index."""
  out = []
  for row in np.asarray(scores, np.float32):
    keep = np.zeros(len(row), bool)
    keep[_desc_order(row)[:int(k)]] = True
    out.append(keep)
  return np.stack(out)


def attention_sum_keep(attn, delta):
  """Attention-sum (Im et al.'s sel_sum_th): sort descending, add one patch at
  a time in float32, keep the prefix whose running sum is <= delta (the patch
  that crosses delta and all after it are dropped; zero patches possible)."""
  out = []
  for row in np.asarray(attn, np.float32):
    keep = np.zeros(len(row), bool)
    acc = np.float32(0)
    for j in _desc_order(row):
      acc = np.float32(acc + row[j])
      if not acc <= np.float32(delta):
        break
      keep[j] = True
    out.append(keep)
  return np.stack(out)


def aps_set(probs, q_hat):
  """APS set (Eqs. 17-18), non-randomised: classes by decreasing probability
  (lower class index first on ties), cumulative float32 mass one class at a
  time; the smallest k whose mass exceeds q_hat, the crossing class included
  (all classes if none does). Returns (mask [B, C], k [B])."""
  probs = np.asarray(probs, np.float32)
  q = np.broadcast_to(np.asarray(q_hat, np.float32), (len(probs),))
  masks, ks = [], []
  for row, qi in zip(probs, q):
    order = _desc_order(row)
    k, acc = len(row), np.float32(0)
    for j, c in enumerate(order):
      acc = np.float32(acc + row[c])
      if acc > qi:
        k = j + 1
        break
    mask = np.zeros(len(row), bool)
    mask[order[:k]] = True
    masks.append(mask)
    ks.append(k)
  return np.stack(masks), np.asarray(ks)


def aps_weights(probs, mask):
  """Eq. 19: w_c = pi_c / sum of pi over the APS set, 0 outside it."""
  probs = np.asarray(probs, np.float64)
  masked = np.where(mask, probs, 0.0)
  return masked / masked.sum(-1, keepdims=True)
