"""Algorithm 2 end to end on images in memory: what `rcst run` executes.

The edge step, the decision of `methods.decide` (the sweep's rule), one
encoded payload per offloaded image, the server on what it decodes, and
Eq. 27 (`methods.combine`). The server is a model in this process or a
`rcst serve` across a link (`remote`: `rcst_edge.link.client.RemoteServer`); the
payloads and the rule are the same either way.
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from rcst_edge import transmit as edge_transmit
from rcst_edge.payload.geometry import Geometry
from rcst_jax.inference import edge as edge_lib
from rcst_jax.inference import methods, patches
from rcst_jax.inference.server import Server
from rcst_jax.models.checkpoints import Model


def collaborative_inference(images, edge: Model, server: Model | None,
                            point: methods.OperatingPoint, *, layer: str = "features",
                            batch_size: int = 16, server_batch: int = 16,
                            buckets: Sequence[int] = patches.BUCKETS, remote=None,
                            on_server_error: str = "edge", send: str = "each") -> dict:
  """Algorithm 2 on uint8 images [B, H, W, 3] at one operating point.

  ``layer`` is the Grad-CAM tap the calibration recorded; `batch_size`
  images per edge call. The edge decides with `methods.decide` (the sweep's
  rule), encodes each offloaded image's payload, and the server classifies
  what it decodes (patches coded by ``point.codec``). Returns final
  predictions, acceptance, kept-patch masks (all False for accepted images),
  the bytes of the payloads encoded and per-image seconds (the edge's batch
  time shared by its images, each payload's encoding).

  With ``remote`` (and ``server`` None) each payload goes to that server in
  turn (``send="batch"``: all of them in one `ClassifyBatch` call, which
  shares the call's wire bytes among them by size); the result adds per
  image the round trip, the server's reported time, the bytes on the wire
  each way (``wire_up``, ``wire_down``; a metered remote's only) and a
  ``status``: "edge", "server", "server_unreachable" (no answer within the
  client's retries, or the server is remembered as down) or
  "server_other_weights" (answered from weights other than the
  calibration's: not used). In the last two the edge's prediction stands;
  ``on_server_error="fail"`` raises instead.
  """
  if on_server_error not in ("edge", "fail"):
    raise ValueError(f"on_server_error must be 'edge' or 'fail', got {on_server_error!r}")
  if send not in ("each", "batch"):
    raise ValueError(f"send must be 'each' or 'batch', got {send!r}")
  images = np.asarray(images, np.uint8)
  geo = Geometry.of_server(server) if remote is None else remote.geometry
  if images.ndim != 4 or images.shape[1:] != (geo.image_size, geo.image_size, geo.channels):
    raise ValueError(f"images must be uint8 [B, {geo.image_size}, {geo.image_size}, "
                     f"{geo.channels}] (the server's geometry), got {images.shape}")
  t0 = time.perf_counter()
  e = edge_lib.edge_step_batched(edge, images, point.lambda_hat, point.q_hat, layer=layer,
                                 grid=geo.grid, batch_size=batch_size)
  off, keep, fallback = methods.decide(methods.PROPOSED, edge_lib.edge_view(e), [point.tau])
  edge_s = (time.perf_counter() - t0) / max(len(images), 1)
  out = transmit(images, off[0], keep[0], fallback, geo, point.codec, server=server,
                 remote=remote, server_batch=server_batch, buckets=buckets,
                 on_server_error=on_server_error, send=send)
  return {**out, "edge_s": np.full(len(images), edge_s), "p_max": e["p_max"],
          "probs": e["probs"], "aps_mask": e["aps_mask"], "patch_scores": e["patch_scores"],
          "cam": e["cam"]}


def transmit(images, off, keep, fallback, geo: Geometry, codec: str = "raw", *,
             server: Model | None = None, remote=None, server_batch: int = 16,
             buckets: Sequence[int] = patches.BUCKETS, on_server_error: str = "edge",
             send: str = "each") -> dict:
  """Algorithm 2 after any edge's decision (offloaded [n], keep [n, N],
  fallback [n]): one payload per offloaded image coded by ``codec``, the
  server (``server`` in process, or ``remote``: `rcst_edge.transmit`, as the
  JAX-free edge sends) on what it decodes, Eq. 27. The baselines' edge goes
  through it too (benchmarks/bench_link.py)."""
  if remote is not None:
    return edge_transmit.transmit_remote(images, off, keep, fallback, geo, codec, remote,
                                         on_server_error=on_server_error, send=send)
  payloads, encode_s = edge_transmit.encode_payloads(images, off, keep, geo, codec)
  server_pred = np.full(len(images), -1, np.int32)
  if payloads:
    logits = Server(server, server_batch, buckets).logits_from_payloads(list(payloads.values()))
    server_pred[list(payloads)] = logits.argmax(-1)
  status = np.where(off, "server", "edge")
  return edge_transmit.outcome(off, keep, fallback, server_pred, payloads, status,
                               {"encode_s": encode_s})
