"""The three models of a run (edge, server, baseline edge), loaded from a config."""

from __future__ import annotations

import dataclasses
import os

import jax.numpy as jnp

from rcst_jax.models.checkpoints import Model, load_model
from rcst_jax.settings import schema

DTYPES = {name: getattr(jnp, name) for name in schema.DTYPES}


@dataclasses.dataclass
class Models:
  edge: Model           # EfficientNet (proposed method)
  server: Model         # DeiT-Base on transmitted tokens
  baseline_edge: Model  # DeiT-Tiny (Im et al. baselines)

  def named(self) -> dict[str, Model]:
    return {"edge": self.edge, "server": self.server, "baseline_edge": self.baseline_edge}


def load_models(config) -> Models:
  path = lambda name: os.path.join(config.models_dir, name)
  return with_dtype(Models(load_model(path(config.edge)), load_model(path(config.server)),
                           load_model(path(config.baseline_edge))), config.dtype)


def with_dtype(models: Models, dtype: str) -> Models:
  """Same weights (float32), computation in `dtype` (bfloat16 is what TPUs prefer)."""
  if dtype not in DTYPES:
    raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
  cast = lambda m: dataclasses.replace(m, module=m.module.clone(dtype=DTYPES[dtype]))
  return Models(cast(models.edge), cast(models.server), cast(models.baseline_edge))
