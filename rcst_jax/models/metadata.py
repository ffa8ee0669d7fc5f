"""A model directory's metadata.json: what it must hold, checked on every read.

timm name and tag, architecture overrides, num_classes, input size,
crop_pct, interpolation, mean/std, optional class names and label set, the
format marker and the variables' digest. Every value outside its domain is
named in a MetadataError, so a hand-edited file never reaches a model.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from rcst_edge.errors import RcstError
from rcst_jax.data.preprocess import INTERPOLATIONS
from rcst_jax.models import model_names

METADATA_FILE = "metadata.json"
VARIABLES_DIR = "variables"
FORMAT = "rcst_jax.model"  # marks a directory save_model wrote (and may replace)
REQUIRED_METADATA = ("timm_name", "num_classes", "input_size", "crop_pct",
                     "interpolation", "mean", "std")
LABEL_SETS = (None, "imagenet1k")


class CheckpointError(RcstError):
  """A model directory is missing, malformed, or does not fit its model."""


class MetadataError(CheckpointError):
  """A metadata.json value is outside its domain (named in the message)."""


def _number(meta, key, where):
  v = meta[key]
  if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
    raise MetadataError(f"{where}: {key} must be a finite number, got {v!r}")
  return float(v)


def _triple(meta, key, where):
  v = meta[key]
  if not isinstance(v, (list, tuple)) or len(v) != 3 or any(
      isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) for x in v):
    raise MetadataError(f"{where}: {key} must be 3 finite numbers (one per RGB channel),"
                        f" got {v!r}")
  return v


def validate_metadata(meta: Any, where: str = "metadata") -> dict:
  """Checks every value a model's behaviour depends on; raises MetadataError naming it.

  No value is defaulted here: a model that loads is one whose preprocessing and
  labels are exactly what its metadata says.
  """
  if not isinstance(meta, dict):
    raise MetadataError(f"{where}: metadata must be a JSON object, got {type(meta).__name__}")
  missing = [k for k in REQUIRED_METADATA if k not in meta]
  if missing:
    raise MetadataError(f"{where}: metadata lacks {', '.join(missing)}")
  if meta.get("format", FORMAT) != FORMAT:
    raise MetadataError(f"{where}: format is {meta['format']!r}, expected {FORMAT!r}")
  name = meta["timm_name"]
  if not isinstance(name, str) or name.split(".")[0] not in model_names():
    raise MetadataError(f"{where}: unknown timm_name {name!r}; supported: {', '.join(model_names())}")
  n = meta["num_classes"]
  if isinstance(n, bool) or not isinstance(n, int) or n < 1:
    raise MetadataError(f"{where}: num_classes must be a positive integer, got {n!r}")
  size = meta["input_size"]
  if (not isinstance(size, (list, tuple)) or len(size) != 3 or size[0] != 3
      or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in size)
      or size[1] != size[2]):
    raise MetadataError(f"{where}: input_size must be [3, S, S] with a positive integer S"
                        f" (square centre crop), got {size!r}")
  crop_pct = _number(meta, "crop_pct", where)
  if not 0 < crop_pct <= 1:
    raise MetadataError(f"{where}: crop_pct must lie in (0, 1], got {meta['crop_pct']!r}")
  if meta["interpolation"] not in INTERPOLATIONS:
    raise MetadataError(f"{where}: unknown interpolation {meta['interpolation']!r};"
                        f" one of {', '.join(INTERPOLATIONS)}")
  _triple(meta, "mean", where)
  std = _triple(meta, "std", where)
  if any(x <= 0 for x in std):
    raise MetadataError(f"{where}: std must be > 0 in every channel, got {std!r}")
  names = meta.get("class_names")
  if names is not None:
    if not isinstance(names, (list, tuple)) or not all(isinstance(x, str) for x in names):
      raise MetadataError(f"{where}: class_names must be a list of strings")
    if len(names) != n:
      raise MetadataError(f"{where}: class_names has {len(names)} entries but num_classes"
                          f" is {n}")
  label_set = meta.get("label_set")
  if label_set not in LABEL_SETS:
    raise MetadataError(f"{where}: unknown label_set {label_set!r}; one of {LABEL_SETS}")
  if label_set == "imagenet1k" and n != 1000:
    raise MetadataError(f"{where}: label_set 'imagenet1k' needs num_classes 1000, got {n}")
  overrides = meta.get("arch_overrides", {})
  if not isinstance(overrides, dict):
    raise MetadataError(f"{where}: arch_overrides must be an object, got {overrides!r}")
  digest = meta.get("variables_digest")
  if digest is not None and not (isinstance(digest, str) and digest.startswith("blake2b:")):
    raise MetadataError(f"{where}: variables_digest must be 'blake2b:<hex>', got {digest!r}")
  return meta


def read_metadata(directory: str) -> dict:
  """metadata.json of a model directory, validated (MetadataError names the bad value)."""
  path = os.path.join(directory, METADATA_FILE)
  if not os.path.isdir(directory):
    raise CheckpointError(f"{directory}: no such model directory")
  if not os.path.isfile(path):
    raise CheckpointError(f"{directory}: not a model directory (no {METADATA_FILE})")
  try:
    with open(path) as f:
      meta = json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{path}: malformed metadata ({e})") from e
  return validate_metadata(meta, path)
