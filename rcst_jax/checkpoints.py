"""Orbax checkpoints of Flax variables plus a small metadata file.

A model directory holds ``variables/`` (orbax PyTree checkpoint) and
``metadata.json`` (timm name and tag, architecture overrides, num_classes,
input size, crop_pct, interpolation, mean/std, optional class names).
Directories are written under a temporary name and renamed at the end, so a
failed save never leaves a partial model behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any

import jax
import numpy as np

METADATA_FILE = "metadata.json"
VARIABLES_DIR = "variables"
REQUIRED_METADATA = ("timm_name", "num_classes", "input_size", "crop_pct",
                     "interpolation", "mean", "std")


class CheckpointError(ValueError):
  """A model directory is missing, malformed, or does not fit its model."""


def _checkpointer():
  import orbax.checkpoint as ocp
  return ocp.PyTreeCheckpointer()


def save_variables(path: str, variables) -> None:
  """Writes a variables pytree with orbax at ``path`` (must not exist)."""
  variables = jax.tree_util.tree_map(np.asarray, variables)
  _checkpointer().save(os.path.abspath(path), variables)


def restore_variables(path: str, template=None):
  """Reads a variables pytree; with ``template`` (e.g. from jax.eval_shape)
  the tree structure and every shape are checked."""
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise CheckpointError(f"no orbax checkpoint at {path}")
  try:
    restored = _checkpointer().restore(path)
  except Exception as e:
    raise CheckpointError(f"{path}: cannot read orbax checkpoint ({e})") from e
  if template is not None:
    from rcst_jax.state_dict import ConversionError, check_against_template
    try:
      check_against_template(restored, _as_dict(template))
    except ConversionError as e:
      raise CheckpointError(f"{path}: checkpoint does not fit the model: {e}") from e
  return restored


def _as_dict(tree):
  # flax may hand out FrozenDicts; compare plain dicts.
  if hasattr(tree, "unfreeze"):
    tree = tree.unfreeze()
  if isinstance(tree, dict):
    return {k: _as_dict(v) for k, v in tree.items()}
  return tree


def save_model(directory: str, variables, metadata: dict, overwrite: bool = False) -> str:
  """Saves variables + metadata atomically into ``directory``."""
  missing = [k for k in REQUIRED_METADATA if k not in metadata]
  if missing:
    raise CheckpointError(f"metadata lacks {', '.join(missing)}")
  directory = os.path.abspath(directory)
  if os.path.exists(directory) and os.listdir(directory) and not overwrite:
    raise CheckpointError(f"{directory} exists and is not empty (use overwrite)")
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(directory) + "-", dir=parent)
  try:
    save_variables(os.path.join(tmp, VARIABLES_DIR), variables)
    with open(os.path.join(tmp, METADATA_FILE), "w") as f:
      json.dump(_jsonable(metadata), f, indent=2, sort_keys=True)
    if os.path.exists(directory):
      shutil.rmtree(directory)
    os.rename(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return directory


def _jsonable(x):
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, np.generic):
    return x.item()
  return x


def read_metadata(directory: str) -> dict:
  path = os.path.join(directory, METADATA_FILE)
  if not os.path.isfile(path):
    raise CheckpointError(f"{directory}: not a model directory (no {METADATA_FILE})")
  try:
    with open(path) as f:
      meta = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path}: malformed metadata ({e})") from e
  if not isinstance(meta, dict):
    raise CheckpointError(f"{path}: metadata must be a JSON object")
  missing = [k for k in REQUIRED_METADATA if k not in meta]
  if missing:
    raise CheckpointError(f"{path}: metadata lacks {', '.join(missing)}")
  return meta


@dataclasses.dataclass
class Model:
  """A loaded model: Flax module, its variables and its metadata.

  ``model(images_uint8)`` preprocesses nothing: it takes already cropped
  uint8 images [B, H, W, 3], normalises them with the model's mean/std and
  returns ``(logits, out)``.
  """
  module: Any
  variables: Any
  metadata: dict

  @property
  def num_classes(self) -> int:
    return int(self.metadata["num_classes"])

  @property
  def class_names(self) -> list[str] | None:
    return self.metadata.get("class_names")

  def normalize(self, images):
    from rcst_jax.data import normalize
    return normalize(images, self.metadata["mean"], self.metadata["std"])

  def __call__(self, images, **kwargs):
    return self.module.apply(self.variables, self.normalize(images), **kwargs)

  def inference(self) -> "Model":
    """The same model in its fastest inference form, made once and cached.

    EfficientNet: BatchNorm folded into the conv weights (same outputs up to
    float rounding); other families: this model. Not for training.
    """
    cached = self.__dict__.get("_inference")
    if cached is None or cached[0] is not self.variables or cached[1] is not self.module:
      from rcst_jax.models import inference_form
      module, variables = inference_form(self.module, self.variables)
      fast = self if module is self.module else Model(module, variables, self.metadata)
      self.__dict__["_inference"] = cached = (self.variables, self.module, fast)
    return cached[2]


def module_from_metadata(meta: dict, **overrides):
  from rcst_jax.models import create_model
  kwargs = dict(meta.get("arch_overrides", {}))
  kwargs["num_classes"] = int(meta["num_classes"])
  kwargs.update(overrides)
  return create_model(meta["timm_name"], **kwargs)


def load_model(directory: str, **module_overrides) -> Model:
  """Loads a converted or trained model directory (see ``save_model``)."""
  meta = read_metadata(directory)
  module = module_from_metadata(meta, **module_overrides)
  size = tuple(meta["input_size"])[-2:]
  template = jax.eval_shape(
      lambda: module.init(jax.random.PRNGKey(0), np.zeros((1, *size, 3), np.float32)))
  # Grad-CAM taps live in 'perturbations': zeros made at use, never stored.
  template = {k: v for k, v in _as_dict(template).items() if k != "perturbations"}
  variables = restore_variables(os.path.join(directory, VARIABLES_DIR), template)
  return Model(module, variables, meta)
