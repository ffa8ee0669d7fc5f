"""Algorithm 2 after the edge's decision, on the edge's side: one payload per
offloaded image, a `rcst serve` across the link, Eq. 27.

`rcst run` (rcst_jax.inference.collaborative.transmit) and the JAX-free edge
(`rcst-edge`) both send through these functions, so they encode the same
bytes and read the same answers.
"""

from __future__ import annotations

import time
import warnings

import numpy as np

from rcst_edge import errors
from rcst_edge.deployment import combine
from rcst_edge.payload import message as payload
from rcst_edge.payload.geometry import Geometry

# What leaves an offloaded image the edge's prediction (`on_server_error="edge"`).
_NOT_USED = (errors.ServerUnreachable, errors.ServerOtherWeights)


def encode_payloads(images, off, keep, geo: Geometry, codec: str) -> tuple[dict, np.ndarray]:
  """({image index: payload bytes} of the offloaded images, encode seconds [n])."""
  encode_s = np.zeros(len(images))
  payloads = {}
  for i in np.flatnonzero(off):
    t0 = time.perf_counter()
    payloads[i] = payload.encode_image_payload(images[i], keep[i], geo, codec)
    encode_s[i] = time.perf_counter() - t0
  return payloads, encode_s


def outcome(off, keep, fallback, server_pred, payloads: dict, status, timing: dict) -> dict:
  """Per image: final prediction (Eq. 27; an answer not used leaves the
  edge's), acceptance, what was sent and its bytes, and the timings."""
  nbytes = np.zeros(len(off), np.int64)
  nbytes[list(payloads)] = [len(p) for p in payloads.values()]
  answered = off & (server_pred >= 0)
  return {"pred": combine(answered, server_pred, fallback), "accepted": ~off,
          "offloaded": off, "edge_pred": fallback, "server_pred": server_pred, "keep": keep,
          "kept": keep.sum(-1), "bytes": nbytes, "status": np.asarray(status).astype(str),
          **timing}


def transmit_remote(images, off, keep, fallback, geo: Geometry, codec: str, remote, *,
                    on_server_error: str = "edge", send: str = "each") -> dict:
  """`outcome` of sending the offloaded images' payloads to ``remote``."""
  off, keep = np.asarray(off, bool), np.asarray(keep, bool)
  payloads, encode_s = encode_payloads(images, off, keep, geo, codec)
  server_pred = np.full(len(images), -1, np.int32)
  status = np.where(off, "server", "edge").astype(object)
  timing = {"encode_s": encode_s,
            **ask_remote(remote, payloads, server_pred, status, on_server_error, send)}
  return outcome(off, keep, fallback, server_pred, payloads, status, timing)


def ask_remote(remote, payloads: dict, server_pred, status, on_server_error: str,
               send: str = "each") -> dict:
  """The payloads to the remote server, each in turn (so each reply's wire
  bytes are its own) or all in one batch call; fills server_pred and the
  status of an image the server did not answer (or answered from other
  weights), returns the per-image link figures (wire bytes only if the
  remote counts them)."""
  n = len(status)
  out = {k: np.zeros(n) for k in ("rtt_s", "server_s", "queue_s", "decode_s")}
  if remote.metered:
    out.update(wire_up=np.zeros(n, np.int64), wire_down=np.zeros(n, np.int64))
  items = list(payloads.items())
  calls = [items] if send == "batch" and items else [[item] for item in items]
  for call in calls:
    try:
      replies = remote.classify_batch([data for _, data in call]) if send == "batch" \
          else [remote.classify(call[0][1])]
    except _NOT_USED as e:
      replies = [e] * len(call)
    for (i, _), r in zip(call, replies):
      if isinstance(r, _NOT_USED):
        if on_server_error == "fail":
          raise r
        other = isinstance(r, errors.ServerOtherWeights)
        status[i] = "server_other_weights" if other else "server_unreachable"
        if other:
          warnings.warn(f"{r}: those images keep the edge's prediction, marked "
                        "server_other_weights")
        continue
      if isinstance(r, Exception):  # refused: as `classify` raises it
        raise r
      server_pred[i] = int(r.logits.argmax())
      out["rtt_s"][i], out["server_s"][i], out["queue_s"][i] = r.rtt_s, r.compute_s, r.queue_s
      out["decode_s"][i] = r.decode_s
      if remote.metered:
        out["wire_up"][i], out["wire_down"][i] = r.wire_up, r.wire_down
  return out
