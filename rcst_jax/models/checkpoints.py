"""Orbax checkpoints of Flax variables plus a small metadata file.

A model directory holds ``variables/`` (orbax PyTree checkpoint) and
``metadata.json`` (timm name and tag, architecture overrides, num_classes,
input size, crop_pct, interpolation, mean/std, optional class names).
Directories are written under a temporary name and renamed at the end, so a
failed save never leaves a partial model behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
import shutil
import tempfile
import warnings
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from rcst_jax.core import fileio
from rcst_jax.data import normalize
from rcst_jax.models import create_model, inference_form
from rcst_jax.models.metadata import (  # re-exported: the model directory's API
  FORMAT,
  METADATA_FILE,
  VARIABLES_DIR,
  CheckpointError,
  MetadataError,
  read_metadata,
  validate_metadata,
)
from rcst_jax.models.state_dict import ConversionError, check_against_template


class IntegrityWarning(UserWarning):
  """A model directory without a digest: its variables cannot be verified."""


def _checkpointer():
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


# ---------------------------------------------------------------- integrity


def _leaves(tree, prefix=""):
  if isinstance(tree, Mapping) or hasattr(tree, "unfreeze"):
    for k in tree:
      yield from _leaves(tree[k], f"{prefix}{k}/")
  else:
    yield prefix.rstrip("/"), tree


def variables_digest(variables) -> str:
  """'blake2b:<hex>' over the sorted leaf paths, dtypes, shapes and little-endian bytes."""
  h = hashlib.blake2b(digest_size=32)
  for path, leaf in sorted(_leaves(variables), key=lambda kv: kv[0]):
    a = np.asarray(leaf)
    a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
    h.update(f"{path}\0{a.dtype.str}\0{a.shape}\0".encode())
    h.update(a.tobytes())
  return "blake2b:" + h.hexdigest()


def verify_digest(directory: str, variables, metadata: dict) -> None:
  """Fails if the variables differ from the digest save_model recorded; warns if none."""
  expected = metadata.get("variables_digest")
  if expected is None:
    warnings.warn(f"{directory}: metadata.json has no variables_digest, so the integrity of"
                  " its variables cannot be checked (re-save the model to add one)",
                  IntegrityWarning, stacklevel=3)
    return
  actual = variables_digest(variables)
  if actual != expected:
    raise CheckpointError(
        f"{directory}: variables do not match the variables_digest in {METADATA_FILE}"
        f" (expected {expected}, got {actual}); the checkpoint is corrupted or was modified")


# ---------------------------------------------------------------- metadata


# ---------------------------------------------------------------- output directories


def is_model_dir(directory: str) -> bool:
  """A directory save_model wrote: only metadata.json (with our format marker) and variables/."""
  try:
    entries = set(os.listdir(directory))
    with open(os.path.join(directory, METADATA_FILE)) as f:
      meta = json.load(f)
  except (OSError, ValueError):
    return False
  return (isinstance(meta, dict) and meta.get("format") == FORMAT
          and entries <= {METADATA_FILE, VARIABLES_DIR})


def check_output_dir(directory: str, overwrite: bool = False, protect=()) -> str:
  """Refuses a model directory we may not (re)place (fileio.check_output_dir);
  only a model directory written by save_model is ever replaced."""
  return fileio.check_output_dir(
      directory, overwrite, protect, ours=is_model_dir, what="the model",
      ours_means=f"a model directory written by rcst (needs only {METADATA_FILE} with "
      f"\"format\": \"{FORMAT}\" and {VARIABLES_DIR}/)")


def save_model(directory: str, variables, metadata: dict, overwrite: bool = False,
               protect=()) -> str:
  """Saves variables + metadata (with format marker and digest) atomically.

  The model is written under a temporary name and renamed into place; a
  replaced model directory is moved aside first and deleted only once the new
  one is in place. See check_output_dir for what is never replaced.
  """
  metadata = {**_jsonable(metadata), "format": FORMAT}
  variables = jax.tree_util.tree_map(np.asarray, variables)
  metadata["variables_digest"] = variables_digest(variables)
  validate_metadata(metadata)
  directory = check_output_dir(directory, overwrite, protect)
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(directory) + "-", dir=parent)
  old = None
  try:
    os.chmod(tmp, 0o777 & ~fileio.umask())  # mkdtemp's 0700 is for the temporary name only
    save_variables(os.path.join(tmp, VARIABLES_DIR), variables)
    fileio.atomic_write_text(os.path.join(tmp, METADATA_FILE),
                             fileio.dumps(metadata, indent=2, sort_keys=True) + "\n")
    if os.path.isdir(directory) and os.listdir(directory):
      check_output_dir(directory, overwrite, protect)  # again: it may have changed meanwhile
      old = os.path.join(parent, f".old-{os.path.basename(directory)}-{secrets.token_hex(4)}")
      os.rename(directory, old)
    try:
      os.rename(tmp, directory)
    except BaseException:
      if old is not None:
        os.rename(old, directory)
        old = None
      raise
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)
  return directory


def _jsonable(x):
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, np.generic):
    return x.item()
  return x


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
      module, variables = inference_form(self.module, self.variables)
      fast = self if module is self.module else Model(module, variables, self.metadata)
      self.__dict__["_inference"] = cached = (self.variables, self.module, fast)
    return cached[2]


def module_from_metadata(meta: dict, **overrides):
  kwargs = dict(meta.get("arch_overrides", {}))
  kwargs["num_classes"] = int(meta["num_classes"])
  kwargs.update(overrides)
  try:
    return create_model(meta["timm_name"], **kwargs)
  except (TypeError, ValueError) as e:  # unknown override keys or values
    raise MetadataError(f"{meta['timm_name']}: bad arch_overrides {meta.get('arch_overrides')}"
                        f" ({e})") from e


def load_model(directory: str, **module_overrides) -> Model:
  """Loads a converted or trained model directory (see ``save_model``).

  Metadata is validated, the variables must fit the module, and their digest
  must match the one recorded at save time.
  """
  meta = read_metadata(directory)
  try:
    module = module_from_metadata(meta, **module_overrides)
  except MetadataError as e:
    raise MetadataError(f"{os.path.join(directory, METADATA_FILE)}: {e}") from e
  size = tuple(meta["input_size"])[-2:]
  template = jax.eval_shape(
      lambda: module.init(jax.random.PRNGKey(0), np.zeros((1, *size, 3), np.float32)))
  # Grad-CAM taps live in 'perturbations': zeros made at use, never stored.
  template = {k: v for k, v in _as_dict(template).items() if k != "perturbations"}
  variables = restore_variables(os.path.join(directory, VARIABLES_DIR), template)
  verify_digest(os.path.abspath(directory), variables, meta)
  # On the device once: numpy variables are copied in again by every jitted
  # call (about 1 ms for the demo server's 2 MB on CPU, more than its
  # batch-1 compute).
  return Model(module, jax.device_put(variables), meta)
