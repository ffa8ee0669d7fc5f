"""rcst_jax: risk-calibrated semantic transmission in JAX/Flax.

The public API is five names, imported on first use so that `import rcst_jax`
loads no JAX: `load_model`, `calibrate` (Algorithm 1), `Calibration` (the
calibration file and its operating point), `OperatingPoint` and
`collaborative_inference` (Algorithm 2). Everything else is reached by module.
"""

import importlib

__version__ = "0.1.0"

_API = {
    "load_model": "rcst_jax.models.checkpoints",
    "calibrate": "rcst_jax.calibration.algorithm1",
    "Calibration": "rcst_jax.calibration.artifact",
    "OperatingPoint": "rcst_jax.inference.methods",
    "collaborative_inference": "rcst_jax.inference.collaborative",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
  if name not in _API:
    raise AttributeError(f"module 'rcst_jax' has no attribute {name!r}")
  value = getattr(importlib.import_module(_API[name]), name)
  globals()[name] = value  # the next lookup skips this function
  return value


def __dir__():
  return sorted(__all__)
