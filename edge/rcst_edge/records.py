"""The JSON lines `rcst run` and `rcst-edge` print: one per image, and one per
file that could not be read. Built in one place so both print the same fields
for the same decision."""

from __future__ import annotations

import json

import numpy as np

from rcst_edge.images import BadItemError


def read_images(paths, transform):
  """(readable paths, their images, how many failed) with the run's transform;
  a bad file is reported as a JSON line, not fatal."""
  good, images, failed = [], [], 0
  for path in paths:
    try:
      images.append(transform(path))
      good.append(path)
    except (BadItemError, OSError, ValueError) as e:
      failed += 1
      print(json.dumps({"image": path, "error": str(e)}), flush=True)
  return good, images, failed


_MS = ("edge_s", "encode_s", "rtt_s", "server_s", "queue_s", "decode_s")


def run_record(path: str, out: dict, i: int, codec: str, names=None) -> dict:
  """Image ``i`` of a batch's outcome (`rcst_edge.transmit.outcome` plus the
  edge's p_max and APS mask). The link's times only for a remote server, its
  wire bytes only when metered (nothing else counted them)."""
  pred = int(out["pred"][i])
  link = {k.replace("_s", "_ms"): round(float(out[k][i]) * 1e3, 3) for k in _MS if k in out}
  if "wire_up" in out:
    link.update(wire_bytes_up=int(out["wire_up"][i]), wire_bytes_down=int(out["wire_down"][i]))
  return {"image": path, "accepted_on_edge": bool(out["accepted"][i]),
          "prediction": pred, "edge_prediction": int(out["edge_pred"][i]),
          "label": names[pred] if names else None, "p_max": float(out["p_max"][i]),
          "aps_set": [int(c) for c in np.flatnonzero(out["aps_mask"][i])],
          "patches_sent": int(out["kept"][i]), "codec": codec,
          "bytes_sent": int(out["bytes"][i]), "status": str(out["status"][i]), **link,
          "sent_indices": [int(j) for j in np.flatnonzero(out["keep"][i])]}


def print_batch(paths, out: dict, codec: str, names=None) -> None:
  for i, path in enumerate(paths):
    print(json.dumps(run_record(path, out, i, codec, names)), flush=True)
