"""Reading timm state dicts safely and consuming them strictly.

Weights are read from safetensors, or from torch files with
``weights_only=True``: never an unrestricted pickle.
"""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np
from safetensors.numpy import load_file

from rcst_edge.errors import RcstError


class ConversionError(RcstError):
  """A checkpoint does not fit the model it is converted into."""


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Loads a flat ``{name: array}`` state dict from .safetensors or a torch file."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ConversionError(f"weights file not found: {path}")
  if path.endswith(".safetensors"):
    try:
      return dict(load_file(path))
    except Exception as e:  # safetensors raises its own error types
      raise ConversionError(f"{path}: not a readable safetensors file ({e})") from e
  try:
    import torch
  except ImportError as e:
    raise ConversionError(
        f"{path}: reading torch files needs torch (pip install 'rcst_jax[convert]'),"
        " or convert the file to .safetensors") from e
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:
    raise ConversionError(
        f"{path}: not loadable as a torch state dict with weights_only=True ({e})") from e
  # Training checkpoints often wrap the weights; accept the usual wrappers.
  if isinstance(obj, Mapping):
    for wrapper in ("state_dict", "model", "model_ema", "state_dict_ema"):
      if wrapper in obj and isinstance(obj[wrapper], Mapping):
        obj = obj[wrapper]
        break
  if not isinstance(obj, Mapping) or not obj:
    raise ConversionError(f"{path}: not a state dict (got {type(obj).__name__})")
  out = {}
  for k, v in obj.items():
    if not isinstance(k, str) or not hasattr(v, "detach"):
      raise ConversionError(
          f"{path}: not a state dict of tensors (entry {k!r} is {type(v).__name__})")
    out[k] = v.detach().cpu().float().numpy() if v.is_floating_point() else v.cpu().numpy()
  return out


class StateDictReader:
  """Hands out state-dict entries by name and remembers which were used.

  Converters call :meth:`take` for every tensor they need; :meth:`finish`
  then fails if any source key was left over. Together with the shape check
  in ``take`` this makes conversion all-or-nothing.
  """

  IGNORED_SUFFIXES = ("num_batches_tracked",)

  def __init__(self, state_dict: Mapping[str, np.ndarray]):
    self._sd = {k: np.asarray(v) for k, v in state_dict.items()
                if not k.endswith(self.IGNORED_SUFFIXES)}
    self._used: set[str] = set()

  def __contains__(self, key: str) -> bool:
    return key in self._sd

  def take(self, key: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    if key not in self._sd:
      raise ConversionError(f"missing key in checkpoint: {key!r}")
    if key in self._used:
      raise ConversionError(f"key consumed twice: {key!r}")
    value = self._sd[key]
    if shape is not None and tuple(value.shape) != tuple(shape):
      raise ConversionError(
          f"shape mismatch for {key!r}: checkpoint has {tuple(value.shape)},"
          f" model expects {tuple(shape)}")
    self._used.add(key)
    return _checked(key, value)

  def finish(self) -> None:
    unused = sorted(set(self._sd) - self._used)
    if unused:
      shown = ", ".join(repr(k) for k in unused[:10])
      more = f" (and {len(unused) - 10} more)" if len(unused) > 10 else ""
      raise ConversionError(f"unexpected keys in checkpoint: {shown}{more}")


def _checked(key: str, value: np.ndarray) -> np.ndarray:
  """float32 copy of a weight, refused if it is not a finite float (a quantised or
  corrupted checkpoint would otherwise convert into a model that silently lies)."""
  if value.dtype.kind != "f":
    raise ConversionError(
        f"{key!r}: expected a floating-point tensor, got dtype {value.dtype}"
        " (quantised or integer checkpoints are not supported)")
  out = value.astype(np.float32)
  finite = np.isfinite(out)
  if not finite.all():
    n = int(out.size - finite.sum())
    why = "NaN or inf" if not np.isfinite(value).all() else "too large for float32"
    raise ConversionError(f"{key!r}: {n} of {out.size} values are not finite ({why})")
  if key.endswith("running_var") and (out < 0).any():
    raise ConversionError(f"{key!r}: BatchNorm running variance is negative"
                          f" (min {float(out.min())})")
  return out


def check_against_template(variables, template, prefix: str = "") -> None:
  """Fails unless ``variables`` has exactly the tree and shapes of ``template``.

  ``template`` is typically ``jax.eval_shape(module.init, ...)``.
  """
  if isinstance(template, Mapping):
    if not isinstance(variables, Mapping):
      raise ConversionError(f"{prefix or '<root>'}: expected a mapping")
    missing = sorted(set(template) - set(variables))
    extra = sorted(set(variables) - set(template))
    if missing:
      raise ConversionError(f"converted tree lacks {prefix}{missing[0]}")
    if extra:
      raise ConversionError(f"converted tree has unexpected {prefix}{extra[0]}")
    for k in template:
      check_against_template(variables[k], template[k], f"{prefix}{k}/")
    return
  if tuple(np.shape(variables)) != tuple(template.shape):
    raise ConversionError(
        f"converted {prefix.rstrip('/')} has shape {tuple(np.shape(variables))},"
        f" model expects {tuple(template.shape)}")
