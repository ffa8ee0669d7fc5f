"""timm checkpoint -> Flax variables + metadata, strictly.

Every source key must be consumed and every shape must match; any mismatch
fails with the key's name and leaves nothing in the output directory.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from rcst_jax.models import checkpoints, create_model, default_cfg, family_of, model_names
from rcst_jax.models.state_dict import ConversionError, StateDictReader, load_state_dict


def split_name(name: str) -> tuple[str, str | None]:
  base, _, tag = name.partition(".")
  return base, (tag or None)


def check_name(name: str) -> None:
  """Refuses a timm name we cannot build, or a tag whose preprocessing we cannot know."""
  base, tag = split_name(name)
  if base not in model_names():
    raise ConversionError(f"unknown timm model {base!r}; supported: {', '.join(model_names())}")
  if tag is None:
    return
  try:
    import timm
  except ImportError:
    known = default_cfg(base).get("tag")
    if tag != known:
      raise ConversionError(
          f"cannot check tag {tag!r} of {base} without timm (its preprocessing may differ from"
          f" the default tag {known!r}); install timm or drop the tag") from None
    return
  known = sorted(n.partition(".")[2] for n in timm.list_pretrained(f"{base}.*"))
  if tag not in known:
    raise ConversionError(f"unknown tag {tag!r} for {base}; timm knows: {', '.join(known)}")


def _pretrained_cfg(name: str) -> dict:
  """timm's cfg for name[.tag] when timm knows it, else our registry's."""
  cfg = default_cfg(name)
  try:
    import timm
  except ImportError:
    return cfg
  try:
    pcfg = timm.models.get_pretrained_cfg(name) if "." in name else None
    if pcfg is None:
      pcfg = timm.models.get_pretrained_cfg(split_name(name)[0])
  except RuntimeError as e:  # timm: 'Invalid pretrained tag'
    raise ConversionError(f"{name}: {e}") from e
  if pcfg is not None:
    pcfg = pcfg.to_dict() if hasattr(pcfg, "to_dict") else dict(pcfg)
    for k in ("input_size", "crop_pct", "interpolation", "mean", "std", "num_classes"):
      if pcfg.get(k) is not None:
        cfg[k] = pcfg[k]
  return cfg


def timm_state_dict(name: str) -> dict[str, np.ndarray]:
  """Pretrained weights through timm (needs internet: works on Colab, not offline)."""
  try:
    import timm
  except ImportError as e:
    raise ConversionError("no --weights given and timm is not installed"
                          " (pip install 'rcst_jax[convert]')") from e
  try:
    model = timm.create_model(name, pretrained=True)
  except Exception as e:  # hub/network errors come in many types
    raise ConversionError(
        f"no --weights given and timm could not download {name} ({type(e).__name__}: {e});"
        " offline? pass --weights FILE (.safetensors or a torch state dict)") from e
  return {k: v.detach().cpu().float().numpy() for k, v in model.state_dict().items()}


def convert_state_dict(name: str, state_dict, num_classes: int | None = None,
                       **arch_overrides):
  """Returns (module, variables, metadata) for a timm state dict."""
  check_name(name)
  base, tag = split_name(name)
  cfg = _pretrained_cfg(name)
  num_classes = int(num_classes if num_classes is not None else cfg["num_classes"])
  module = create_model(base, num_classes=num_classes, **arch_overrides)
  reader = StateDictReader(state_dict)
  variables = family_of(base).from_timm(reader, module)
  meta = {
      "timm_name": base, "tag": tag, "family": family_of(base).__name__.rsplit(".", 1)[-1],
      "num_classes": num_classes, "input_size": list(cfg["input_size"]),
      "crop_pct": float(cfg["crop_pct"]), "interpolation": cfg["interpolation"],
      "mean": list(cfg["mean"]), "std": list(cfg["std"]),
      "arch_overrides": arch_overrides,
      "label_set": "imagenet1k" if num_classes == 1000 else None,
  }
  checkpoints.validate_metadata(meta, f"converted metadata of {name}")
  return module, variables, meta


def convert(name: str, out: str, weights: str | None = None,
            num_classes: int | None = None, overwrite: bool = False) -> str:
  """`rcst convert`: reads weights (file or timm hub), writes a model directory.

  Name, tag, num_classes and the output directory are checked before any
  weights are read, so a refused call costs nothing and changes nothing.
  """
  check_name(name)
  if num_classes is not None and (isinstance(num_classes, bool) or num_classes < 1):
    raise ConversionError(f"num_classes must be a positive integer, got {num_classes!r}")
  protect = [os.path.abspath(weights)] if weights else []
  checkpoints.check_output_dir(out, overwrite, protect)
  state_dict = load_state_dict(weights) if weights else timm_state_dict(name)
  _, variables, meta = convert_state_dict(name, state_dict, num_classes=num_classes)
  meta["source"] = weights or "timm-hub"
  return checkpoints.save_model(out, jax.device_get(variables), meta, overwrite=overwrite,
                                protect=protect)
