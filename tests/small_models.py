"""Small randomly initialised edge / server / baseline models for fast tests."""

import jax
import numpy as np

from rcst_jax.models import create_model
from rcst_jax.models.checkpoints import Model

NUM_CLASSES = 12
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

EDGE = ("efficientnet_b0", dict(channel_multiplier=0.25, depth_multiplier=0.25))
SERVER = ("deit_tiny_patch16_224", dict(embed_dim=48, depth=2, num_heads=3))
BASELINE = ("deit_tiny_patch16_224", dict(embed_dim=48, depth=1, num_heads=3))


def make(name, overrides, seed, num_classes=NUM_CLASSES, **extra):
  module = create_model(name, num_classes=num_classes, **overrides, **extra)
  variables = jax.jit(module.init)(jax.random.PRNGKey(seed), np.zeros((1, 224, 224, 3), np.float32))
  variables = {k: v for k, v in variables.items() if k != "perturbations"}
  meta = {"timm_name": name, "tag": "test", "num_classes": num_classes,
          "input_size": [3, 224, 224], "crop_pct": 1.0, "interpolation": "bicubic",
          "mean": list(MEAN), "std": list(STD), "arch_overrides": dict(overrides),
          "class_names": [f"class{i}" for i in range(num_classes)]}
  return Model(module, variables, meta)


def edge(seed=0, **kw):
  return make(*EDGE, seed, **kw)


def server(seed=1, **kw):
  return make(*SERVER, seed, **kw)


def baseline(seed=2, **kw):
  return make(*BASELINE, seed, **kw)
