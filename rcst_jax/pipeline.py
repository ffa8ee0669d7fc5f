"""Algorithm 2: the edge step, the token-subset server, and the two together.

edge_step:  uint8 images -> edge softmax, CRC acceptance, APS set,
            APS-guided Grad-CAM and P x P patch scores (one jitted function,
            one forward and one backward pass per batch).
Server:     kept uint8 patches + indices -> DeiT on those tokens alone,
            batched by kept-token bucket so jit compiles a few shapes only.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rcst_jax import conformal, patches, saliency, transmit
from rcst_jax.checkpoints import Model
from rcst_jax.data import normalize


@functools.partial(jax.jit, static_argnames=("module", "mean", "std", "layer", "grid"))
def _edge_step(variables, images, lambda_hat, q_hat, *, module, mean, std, layer, grid):
  x = normalize(images, mean, std)
  res = saliency.aps_grad_cam(module, variables, x,
                              lambda probs: conformal.aps_set(probs, q_hat)[0],
                              layer=layer, grid=grid)
  probs = res["probs"]
  p_max = probs.max(-1)
  res.update(p_max=p_max, pred=jnp.argmax(probs, -1).astype(jnp.int32),
             accept=p_max >= lambda_hat, aps_size=res["aps_mask"].sum(-1).astype(jnp.int32))
  del res["logits"]
  return res


def edge_step(edge: Model, images, lambda_hat, q_hat, *, layer: str = "features",
              grid: int = 14) -> dict:
  """The complete edge computation for a batch of uint8 images [B, H, W, 3].

  Returns probs [B,C], p_max, pred, accept (p_max >= lambda_hat, Eq. 15),
  aps_mask [B,C] (Eqs. 17-18), aps_size, cam [B,h,w] (Eq. 22 before Up) and
  patch_scores [B, grid*grid] (Eq. 23).
  """
  edge = edge.inference()  # e.g. BatchNorm folded; computed once per Model
  return _edge_step(edge.variables, images, jnp.float32(lambda_hat), jnp.float32(q_hat),
                    module=edge.module, mean=tuple(edge.metadata["mean"]),
                    std=tuple(edge.metadata["std"]), layer=layer, grid=grid)


@functools.partial(jax.jit, static_argnames=("module", "patch"))
def _server_logits(variables, images, idx, valid, *, module, patch):
  # Only the gathered patches enter the server.
  sent = patches.gather_patches(images, idx, patch)
  return module.apply(variables, sent, idx, valid, method="tokens")[0]


@dataclasses.dataclass
class Server:
  """Token-subset server inference, bucketed by kept-token count.

  ``batch_size`` rows per call (padded), so each bucket compiles once.
  ``sharding``: optional NamedSharding for the batch axis (multi-device).
  """
  model: Model
  batch_size: int = 64
  buckets: Sequence[int] = patches.BUCKETS
  sharding: object = None

  @property
  def patch(self) -> int:
    return int(self.model.module.patch_size)

  def logits(self, images: np.ndarray, keep: np.ndarray, rows=None) -> np.ndarray:
    """keep [R,N] bool -> logits [R,C] for images[rows] ([B,H,W,3] uint8; only
    kept patches are read). ``rows`` maps keep rows to images (default: 1:1)."""
    images, keep = np.asarray(images), np.asarray(keep, bool)
    rows_to_image = np.arange(len(keep)) if rows is None else np.asarray(rows)
    out = np.zeros((len(keep), self.model.num_classes), np.float32)
    for rows, idx, valid in patches.iter_buckets(keep, self.buckets):
      for start in range(0, len(rows), self.batch_size):
        sel = rows[start:start + self.batch_size]
        pad = self.batch_size - len(sel)
        args = [np.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)) for a in
                (images[rows_to_image[sel]], np.asarray(idx)[start:start + len(sel)],
                 np.asarray(valid)[start:start + len(sel)])]
        if self.sharding is not None:
          args = [jax.device_put(a, self.sharding) for a in args]
        res = _server_logits(self.model.variables, *args, module=self.model.module,
                             patch=self.patch)
        out[sel] = np.asarray(res)[:len(sel)]
    return out


def collaborative_inference(images, edge: Model, server: Model,
                            calibration: conformal.Calibration, tau: float, *,
                            layer: str = "features", server_batch: int = 64,
                            buckets: Sequence[int] = patches.BUCKETS) -> dict:
  """Algorithm 2 on a batch of uint8 images [B, 224, 224, 3].

  Returns final predictions, which images the edge accepted, the kept-patch
  masks (all False for accepted images), and the exact payload bytes sent.
  """
  images = np.asarray(images, np.uint8)
  grid = images.shape[1] // int(server.module.patch_size)
  e = jax.device_get(edge_step(edge, images, calibration.lambda_hat, calibration.q_hat,
                               layer=layer, grid=grid))
  accept = np.asarray(e["accept"])
  keep = np.array(transmit.select_threshold(e["patch_scores"], tau))  # Eqs. 24-25
  keep[accept] = False
  final = np.asarray(e["pred"]).copy()
  server_pred = np.full(len(images), -1, np.int32)
  off = np.flatnonzero(~accept)
  if off.size:
    logits = Server(server, server_batch, buckets).logits(images[off], keep[off])
    server_pred[off] = logits.argmax(-1)
    final[off] = server_pred[off]  # Eq. 27
  kept = keep.sum(-1)
  n_patches = grid * grid
  bytes_sent = np.where(accept, 0, np.asarray(transmit.payload_bytes(
      kept, N=n_patches, patch=int(server.module.patch_size)))).astype(np.int64)
  return {"pred": final, "accepted": accept, "edge_pred": np.asarray(e["pred"]),
          "server_pred": server_pred, "keep": keep, "kept": kept, "bytes": bytes_sent,
          "p_max": np.asarray(e["p_max"]), "aps_mask": np.asarray(e["aps_mask"]),
          "patch_scores": np.asarray(e["patch_scores"]), "cam": np.asarray(e["cam"])}
