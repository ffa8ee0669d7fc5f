"""Metrics of a sweep from the engine's per-image arrays, one definition each.

Input: the engine's arrays (images along the last axis): labels [n],
offloaded / kept / server_pred / pred [P, n] for the P operating points, and
the edges' own outputs (edge_* for the proposed CNN, base_* for the baseline
DeiT). Costs come from `payload.message` (patch_ratio, payload_bytes, byte_ratio),
risk and APS statistics from `conformal`.
"""

from __future__ import annotations

import numpy as np

from rcst_edge.payload import codecs as codecs_lib
from rcst_edge.payload import message as payload
from rcst_edge.payload.geometry import Geometry
from rcst_jax.inference import methods, selection
from rcst_jax.stats import conformal

PER_IMAGE_COLUMNS = ("key", "label", "method", "param", "codec", "offloaded", "kept", "bytes",
                     "edge_pred", "p_max", "server_pred", "pred")


def key_text(key) -> str:
  """An image key as printable, reversible text: its raw bytes as UTF-8, with
  undecodable bytes as \\xNN and a literal backslash doubled (Python's
  codecs.escape_decode undoes it), so a file name that is not UTF-8 never
  breaks a text output."""
  raw = selection.key_bytes(key if isinstance(key, bytes) else str(key))
  return raw.replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace")


def _edge_arrays(arrays: dict, method: methods.Method):
  prefix = "base" if method.edge == methods.BASELINE else "edge"  # certified: the same CNN
  return arrays[f"{prefix}_pred"], arrays[f"{prefix}_p_max"]


def aggregate(arrays: dict, points, geometry: Geometry, alpha_crc: float | None = None,
              codecs=(codecs_lib.RAW,), certified_codec=None) -> list[dict]:
  """One dict per (codec, operating point), codec-major: accuracy with the
  patches the server decoded, patch and exact byte cost, offload rate, edge
  risk (accepted on the edge and wrong, Eq. 12), APS statistics. The
  Certified method's point at ``certified_codec`` is marked ``deployed``
  (the one its certificate covers)."""
  labels = arrays["labels"]
  n = len(labels)
  out = []
  for c, codec in enumerate(codecs):
    for j, point in enumerate(points):
      out.append(_point(arrays, c, j, point, codec, geometry, alpha_crc, n, labels))
      if point[0] is methods.CERTIFIED:
        out[-1]["deployed"] = codec == certified_codec
  return out


def _point(arrays, c: int, j: int, point, codec, geometry, alpha_crc, n, labels) -> dict:
  method, param = point
  off, kept = arrays["offloaded"][j].astype(bool), arrays["kept"][j].astype(np.int64)
  pred = arrays["codec_pred"][c, j]
  edge_pred, _ = _edge_arrays(arrays, method)
  calibrated = method is methods.PROPOSED  # the CRC-calibrated edge
  return {
      "method": method.name, "param_name": method.param, "param": param,
      "codec": str(codec),
      "accuracy": float(np.mean(pred == labels)),
      "cost": payload.patch_ratio(off, kept, geometry.num_patches),
      "cost_bytes": payload.byte_ratio(off, arrays["codec_bytes"][c, j], geometry),
      "offload_rate": float(off.mean()),
      "mean_patches": float(kept[off].mean()) if off.any() else 0.0,
      "edge_risk": conformal.acceptance_risk(~off, edge_pred != labels),
      "alpha_crc": alpha_crc if calibrated else None,
      "aps_set_size": conformal.mean_set_size(arrays["edge_aps_size"]) if calibrated else None,
      "aps_coverage": conformal.aps_coverage(arrays["edge_aps_cover"]) if calibrated else None,
      "n": n,
  }


def codecs_in(points) -> list[str]:
  """The codecs of a sweep's points, in sweep order (raw first)."""
  return list(dict.fromkeys(p.get("codec", "raw") for p in points))


def for_codec(points, codec: str = "raw") -> list[dict]:
  """The points of one codec; the Certified method's point is always the one
  its certificate covers (``deployed``), whatever codec that names."""
  codec = str(codec)
  out = []
  for p in points:
    if p["method"] == "certified" and "deployed" in p:
      if p["deployed"]:
        out.append(p)
    elif p.get("codec", "raw") == codec:
      out.append(p)
  return out


def per_image_rows(arrays: dict, points, geometry: Geometry, codecs=(codecs_lib.RAW,)):
  """Long format: one row per (test image, codec, operating point), PER_IMAGE_COLUMNS;
  bytes are the payload's as encoded with that codec (0 when answered on the edge)."""
  labels, keys = arrays["labels"], arrays["keys"]
  for c, codec in enumerate(codecs):
    for j, (method, param) in enumerate(points):
      off, kept = arrays["offloaded"][j].astype(bool), arrays["kept"][j].astype(np.int64)
      nbytes, server, pred = (arrays[k][c, j] for k in CODEC_ROWS)
      edge_pred, p_max = _edge_arrays(arrays, method)
      for i in range(len(labels)):
        yield (key_text(keys[i]), int(labels[i]), method.name,
               "" if param is None else f"{param:g}", str(codec), int(off[i]), int(kept[i]),
               int(nbytes[i]), int(edge_pred[i]), f"{p_max[i]:.6g}", int(server[i]),
               int(pred[i]))


CODEC_ROWS = ("codec_bytes", "codec_server_pred", "codec_pred")
