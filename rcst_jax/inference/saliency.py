"""APS-guided Grad-CAM (paper Eqs. 17-23) and saliency-to-patch pooling.

Grad-CAM channel weights are linear in the target, so the aggregated target
g = sum_c w_c z_c (Eq. 20) needs a single backward pass: its map before the
ReLU is the w-weighted sum of the per-class maps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rcst_jax.core import spmd


def aps_weights(probs: jax.Array, aps_mask: jax.Array) -> jax.Array:
  """w_c = pi_c / sum_{c' in S} pi_c' on the APS set, 0 elsewhere (Eq. 19)."""
  masked = jnp.where(aps_mask, probs, 0.0)
  return masked / jnp.maximum(masked.sum(-1, keepdims=True), jnp.finfo(probs.dtype).tiny)


def forward_with_taps(module, variables, x, layer: str, **kwargs):
  """Forward pass whose output `vjp` gives d(.)/d(out[layer]).

  Uses Flax's perturbation collection: a zero variable added to the named
  intermediate, so the gradient w.r.t. it is the gradient w.r.t. the map.
  Returns (logits, feature_map, vjp_fn) for one forward pass.
  """
  template = jax.eval_shape(
      lambda: module.init(jax.random.PRNGKey(0), x, **kwargs))["perturbations"]
  # Models name the tap of out[key] '<key>_tap' (it may not reuse a submodule's name).
  tap = f"{layer}_tap"
  if tap not in template:
    raise ValueError(f"layer {layer!r} is not a Grad-CAM tap; available: "
                     f"{sorted(k.removesuffix('_tap') for k in template)}")
  zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), template)
  # Per-image maps vary over a shard_map's axes as x does (rcst_jax.core.spmd): left
  # device-invariant, their gradient would be summed over the devices' images.
  zeros = spmd.vary_like(zeros, x)
  plain = {k: v for k, v in variables.items() if k != "perturbations"}

  def run(perturbations):
    logits, out = module.apply({**plain, "perturbations": perturbations}, x, **kwargs)
    return logits, out[layer]

  (logits, fmap), vjp_fn = jax.vjp(run, zeros)
  return logits, fmap, lambda target_weights: vjp_fn(
      (target_weights.astype(logits.dtype), jnp.zeros_like(fmap)))[0][tap]


def grad_cam(fmap: jax.Array, grads: jax.Array) -> jax.Array:
  """ReLU(sum_c' beta_c' A_c') with beta = spatial mean of the gradient (Eqs. 21-22).

  fmap, grads: [B, h, w, C'] (NHWC). Returns [B, h, w].
  """
  beta = grads.mean(axis=(1, 2), keepdims=True)
  return jax.nn.relu((beta * fmap).sum(-1))


def minmax_normalize(m: jax.Array) -> jax.Array:
  """Per-image min-max to [0, 1]; a constant map becomes zeros, never NaN.

  "Constant" allows float rounding: bilinear resampling of a flat map is flat
  only up to a few ulps, which plain min-max would blow up to [0, 1] noise.
  """
  lo = m.min(axis=(1, 2), keepdims=True)
  hi = m.max(axis=(1, 2), keepdims=True)
  span = hi - lo
  flat = span <= 1e-5 * jnp.maximum(jnp.abs(hi), jnp.abs(lo))
  ok = (span > 0) & ~flat
  return jnp.where(ok, (m - lo) / jnp.where(ok, span, 1.0), 0.0)


def upsample(m: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Bilinear with half-pixel centres (torch align_corners=False, cv2.resize)."""
  return jax.image.resize(m, (m.shape[0], *size), method="bilinear", antialias=False)


def adaptive_avg_pool(m: jax.Array, grid: int) -> jax.Array:
  """torch.nn.AdaptiveAvgPool2d semantics on [B, H, W] -> [B, grid, grid]."""
  def pool_axis(x, axis, n_in):
    starts = [(i * n_in) // grid for i in range(grid)]
    ends = [-(-((i + 1) * n_in) // grid) for i in range(grid)]
    if n_in % grid == 0:  # equal bins: a reshape-mean
      shape = list(x.shape)
      shape[axis:axis + 1] = [grid, n_in // grid]
      return x.reshape(shape).mean(axis + 1)
    return jnp.stack([jnp.take(x, jnp.arange(s, e), axis=axis).mean(axis)
                      for s, e in zip(starts, ends)], axis=axis)
  return pool_axis(pool_axis(m, 1, m.shape[1]), 2, m.shape[2])


def patch_scores(cam: jax.Array, image_size: tuple[int, int], grid: int) -> jax.Array:
  """Eqs. 22-23: upsample, normalise, pool to the P x P grid, normalise again.

  cam: [B, h, w] -> [B, grid*grid] patch importances in [0, 1] (row-major).
  """
  full = minmax_normalize(upsample(cam, image_size))
  pooled = minmax_normalize(adaptive_avg_pool(full, grid))
  return pooled.reshape(cam.shape[0], grid * grid)


def aps_grad_cam(module, variables, x, aps_mask_fn, layer: str = "features",
                 grid: int = 14, **kwargs):
  """One forward + one backward: logits, probs, APS set, Grad-CAM, patch scores.

  ``aps_mask_fn(probs) -> bool [B, C]`` builds the candidate set from the same
  forward pass's softmax (non-differentiated).
  """
  logits, fmap, vjp = forward_with_taps(module, variables, x, layer, **kwargs)
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  mask = aps_mask_fn(probs)
  weights = aps_weights(probs, mask)
  cam = grad_cam(fmap.astype(jnp.float32), vjp(weights).astype(jnp.float32))
  return {
      "logits": logits, "probs": probs, "aps_mask": mask, "cam": cam,
      "patch_scores": patch_scores(cam, x.shape[1:3], grid),
  }
