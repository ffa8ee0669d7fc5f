"""What an exported edge file holds: its inputs, outputs and metadata.

`rcst export` (rcst_jax.export.onnx_edge) writes these names and
`rcst_edge.onnx_edge` reads them; keeping them here means the two cannot
drift. Metadata values are strings (ONNX metadata_props), JSON where structured.
"""

from __future__ import annotations

import json

from rcst_edge.errors import RcstError

FORMAT, VERSION = "rcst_edge_onnx", 1
INPUTS = ("images", "lambda_hat", "q_hat", "tau")
OUTPUTS = ("probs", "p_max", "pred", "accept", "aps_mask", "aps_size", "cam", "patch_scores",
           "keep")
_JSON_KEYS = ("geometry", "transform", "mean", "std", "num_classes", "grid", "opset", "versions")


class EdgeFileError(RcstError):
  """An ONNX file that is not an rcst edge, or not the calibrated one."""


class MissingRuntime(RcstError):
  """A package the command needs is not installed (its message says which)."""


def metadata_props(**fields) -> dict[str, str]:
  props = {"rcst.format": FORMAT, "rcst.version": str(VERSION)}
  for k, v in fields.items():
    props[f"rcst.{k}"] = json.dumps(v) if k in _JSON_KEYS else str(v)
  return props


def read_props(props: dict[str, str], where: str) -> dict:
  """The metadata of an exported edge, decoded; EdgeFileError if it is not one."""
  if props.get("rcst.format") != FORMAT or props.get("rcst.version") != str(VERSION):
    raise EdgeFileError(f"{where} is not an rcst edge file (format "
                        f"{props.get('rcst.format')!r} v{props.get('rcst.version')!r}; "
                        f"want {FORMAT} v{VERSION}): export it with `rcst export`")
  out = {}
  for key, value in props.items():
    if key.startswith("rcst.") and key not in ("rcst.format", "rcst.version"):
      name = key.removeprefix("rcst.")
      out[name] = json.loads(value) if name in _JSON_KEYS else value
  return out
