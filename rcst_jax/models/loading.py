"""The three models of a run (edge, server, baseline edge), loaded from a config."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax.numpy as jnp

from rcst_jax.models.checkpoints import Model, load_model
from rcst_jax.settings import schema

DTYPES = {name: getattr(jnp, name) for name in schema.DTYPES}


@dataclasses.dataclass
class Models:
  edge: Model           # EfficientNet (proposed method)
  server: Model         # DeiT-Base on transmitted tokens
  baseline_edge: Model  # DeiT-Tiny (Im et al. baselines)
  # The edge that decides, when it is an `rcst export` file run by ONNX Runtime
  # (config.edge_onnx): calibrated and evaluated as deployed. None: `edge`.
  deployed_edge: Any = None

  @property
  def deciding_edge(self):
    return self.edge if self.deployed_edge is None else self.deployed_edge

  def named(self) -> dict[str, Model]:
    return {"edge": self.edge, "server": self.server, "baseline_edge": self.baseline_edge}


def load_models(config) -> Models:
  path = lambda name: os.path.join(config.models_dir, name)
  models = with_dtype(Models(load_model(path(config.edge)), load_model(path(config.server)),
                             load_model(path(config.baseline_edge))), config.dtype)
  onnx_path = config.get("edge_onnx")
  if onnx_path:
    models.deployed_edge = load_onnx_edge(onnx_path, models.edge, config.gradcam_layer)
  return models


def load_onnx_edge(path: str, edge: Model, layer: str):
  """The exported edge at ``path``, refused unless it was exported from ``edge``'s
  weights with the Grad-CAM layer ``layer`` (each refusal names both)."""
  from rcst_edge.errors import ConfigError
  from rcst_edge.onnx_edge import OnnxEdge
  from rcst_jax.models.checkpoints import variables_digest
  onnx = OnnxEdge(path)
  want = variables_digest(edge.variables)
  if onnx.meta.get("edge_digest") != want:
    raise ConfigError(f"{path} was exported from edge weights {onnx.meta.get('edge_digest')}, "
                      f"not from the config's edge ({want})")
  if onnx.meta.get("gradcam_layer") != layer:
    raise ConfigError(f"{path} computes Grad-CAM at {onnx.meta.get('gradcam_layer')!r}, the "
                      f"config at {layer!r}")
  return onnx


def with_dtype(models: Models, dtype: str) -> Models:
  """Same weights (float32), computation in `dtype` (bfloat16 is what TPUs prefer)."""
  if dtype not in DTYPES:
    raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
  cast = lambda m: dataclasses.replace(m, module=m.module.clone(dtype=DTYPES[dtype]))
  return Models(cast(models.edge), cast(models.server), cast(models.baseline_edge))
