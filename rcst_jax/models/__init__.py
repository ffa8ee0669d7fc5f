"""Model registry: timm names -> Flax modules of the two ported families.

Each family module (``efficientnet``, ``deit``) exposes:
  VARIANTS: dict timm_name -> {"arch": {...module kwargs...}, "cfg": {...pretrained cfg...}}
  create(name, **overrides) -> flax.linen.Module
  from_timm(reader: StateDictReader, module) -> Flax variables dict
Every module's ``__call__`` returns ``(logits, out)`` with ``out`` a dict of
named intermediates (big_vision convention).
"""

from __future__ import annotations

from rcst_jax.models import deit, efficientnet

FAMILIES = {"efficientnet": efficientnet, "deit": deit}


def family_of(name: str):
  base = name.split(".")[0]
  for fam in FAMILIES.values():
    if base in fam.VARIANTS:
      return fam
  known = sorted(n for fam in FAMILIES.values() for n in fam.VARIANTS)
  raise ValueError(f"unknown model {name!r}; supported: {', '.join(known)}")


def create_model(name: str, **overrides):
  """Builds the Flax module for a timm model name (a ``.tag`` suffix is ignored)."""
  return family_of(name).create(name.split(".")[0], **overrides)


def inference_form(module, variables):
  """(module, variables) rewritten for fast inference, or unchanged.

  EfficientNet with BatchNorm statistics: BatchNorm folded into the convs.
  """
  if (isinstance(module, efficientnet.EfficientNet) and not module.fold_bn
      and "batch_stats" in variables):
    return efficientnet.fold_batchnorm(module, variables)
  return module, variables


def default_cfg(name: str) -> dict:
  """timm's pretrained cfg for the name: input_size, crop_pct, interpolation, mean, std, num_classes."""
  return dict(family_of(name).VARIANTS[name.split(".")[0]]["cfg"])


def model_names() -> list[str]:
  return sorted(n for fam in FAMILIES.values() for n in fam.VARIANTS)
