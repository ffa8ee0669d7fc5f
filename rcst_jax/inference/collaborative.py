"""Algorithm 2 end to end on images in memory: what `rcst run` executes.

The edge step, the decision of `methods.decide` (the sweep's rule), one
encoded payload per offloaded image, the server on what it decodes, and
Eq. 27 (`methods.combine`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from rcst_jax.geometry import Geometry
from rcst_jax.inference import edge as edge_lib
from rcst_jax.inference import methods, patches, payload
from rcst_jax.inference.server import Server
from rcst_jax.models.checkpoints import Model


def collaborative_inference(images, edge: Model, server: Model, point: methods.OperatingPoint,
                            *, layer: str = "features", batch_size: int = 16,
                            server_batch: int = 16,
                            buckets: Sequence[int] = patches.BUCKETS) -> dict:
  """Algorithm 2 on uint8 images [B, H, W, 3] at one operating point.

  ``layer`` is the Grad-CAM tap the calibration recorded; `batch_size`
  images per edge call. The edge decides with `methods.decide` (the sweep's
  rule), encodes each offloaded image's payload, and the server classifies
  what it decodes (patches coded by ``point.codec``). Returns final
  predictions, acceptance, kept-patch masks (all False for accepted images)
  and the bytes of the payloads encoded.
  """
  images = np.asarray(images, np.uint8)
  geo = Geometry.of_server(server)
  if images.ndim != 4 or images.shape[1:] != (geo.image_size, geo.image_size, geo.channels):
    raise ValueError(f"images must be uint8 [B, {geo.image_size}, {geo.image_size}, "
                     f"{geo.channels}] (the server's geometry), got {images.shape}")
  e = edge_lib.edge_step_batched(edge, images, point.lambda_hat, point.q_hat, layer=layer,
                                 grid=geo.grid, batch_size=batch_size)
  off, keep, fallback = methods.decide(methods.PROPOSED, edge_lib.edge_view(e), [point.tau])
  off, keep = off[0], keep[0]
  # Edge side: one payload per offloaded image; server side: decode and classify.
  payloads = {i: payload.encode_image_payload(images[i], keep[i], geo, point.codec)
              for i in np.flatnonzero(off)}
  server_pred = np.full(len(images), -1, np.int32)
  if payloads:
    logits = Server(server, server_batch, buckets).logits_from_payloads(list(payloads.values()))
    server_pred[list(payloads)] = logits.argmax(-1)
  nbytes = np.zeros(len(images), np.int64)
  nbytes[list(payloads)] = [len(p) for p in payloads.values()]
  return {"pred": methods.combine(off, server_pred, fallback), "accepted": ~off,
          "offloaded": off, "edge_pred": fallback, "server_pred": server_pred, "keep": keep,
          "kept": keep.sum(-1), "bytes": nbytes, "p_max": e["p_max"], "probs": e["probs"],
          "aps_mask": e["aps_mask"], "patch_scores": e["patch_scores"], "cam": e["cam"]}
