"""timm checkpoint -> Flax variables + metadata, strictly.

Every source key must be consumed and every shape must match; any mismatch
fails with the key's name and leaves nothing in the output directory.
"""

from __future__ import annotations

import jax
import numpy as np

from rcst_jax import checkpoints
from rcst_jax.models import create_model, default_cfg, family_of
from rcst_jax.state_dict import ConversionError, StateDictReader, load_state_dict


def split_name(name: str) -> tuple[str, str | None]:
  base, _, tag = name.partition(".")
  return base, (tag or None)


def _pretrained_cfg(name: str) -> dict:
  """timm's cfg for name[.tag] when timm knows it, else our registry's."""
  cfg = default_cfg(name)
  try:
    import timm
    pcfg = timm.models.get_pretrained_cfg(name) if "." in name else None
    if pcfg is None:
      pcfg = timm.models.get_pretrained_cfg(split_name(name)[0])
    if pcfg is not None:
      pcfg = pcfg.to_dict() if hasattr(pcfg, "to_dict") else dict(pcfg)
      for k in ("input_size", "crop_pct", "interpolation", "mean", "std", "num_classes"):
        if pcfg.get(k) is not None:
          cfg[k] = pcfg[k]
  except ImportError:
    pass
  return cfg


def timm_state_dict(name: str) -> dict[str, np.ndarray]:
  """Pretrained weights through timm (needs internet: works on Colab, not offline)."""
  try:
    import timm
  except ImportError as e:
    raise ConversionError("no --weights given and timm is not installed"
                          " (pip install 'rcst_jax[convert]')") from e
  model = timm.create_model(name, pretrained=True)
  return {k: v.detach().cpu().float().numpy() for k, v in model.state_dict().items()}


def convert_state_dict(name: str, state_dict, num_classes: int | None = None,
                       **arch_overrides):
  """Returns (module, variables, metadata) for a timm state dict."""
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
  return module, variables, meta


def convert(name: str, out: str, weights: str | None = None,
            num_classes: int | None = None, overwrite: bool = False) -> str:
  """`rcst convert`: reads weights (file or timm hub), writes a model directory."""
  state_dict = load_state_dict(weights) if weights else timm_state_dict(name)
  _, variables, meta = convert_state_dict(name, state_dict, num_classes=num_classes)
  meta["source"] = weights or "timm-hub"
  return checkpoints.save_model(out, jax.device_get(variables), meta, overwrite=overwrite)
