"""Config files by name or path, with big_vision-style variants.

``imagenet``, ``demo:smoke``, ``demo:quick=300`` name the configs shipped in
the package (``rcst_jax.configs``, the repository's top-level ``configs/``);
a path (``my.py`` or ``my.py:arg``) is read as is. An existing file wins over
a name. Overrides follow absl: ``--config.x=y``.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from importlib import resources

from absl import flags
from ml_collections import config_flags

import rcst_jax.configs as pkg
from rcst_jax.errors import ConfigError


def names() -> list[str]:
  return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__))


def resolve(spec: str) -> str:
  """A config spec -> 'path/to/file.py[:arg]' for ml_collections."""
  if os.path.isfile(spec):
    return spec
  name, sep, arg = spec.partition(":")
  if os.path.isfile(name):
    return spec
  if name.endswith(".py") or os.sep in name:
    raise ConfigError(f"config file {name!r} does not exist")
  path = resources.files("rcst_jax.configs") / f"{name}.py"
  if not path.is_file():
    raise ConfigError(f"unknown config {name!r}: not a file, and not one of {names()}")
  return f"{path}{sep}{arg}"


def variants(name: str) -> dict[str, str]:
  return dict(getattr(importlib.import_module(f"rcst_jax.configs.{name}"), "VARIANTS", {"": ""}))


def parse(spec: str, overrides: list[str]):
  """ml_collections config + `--config.x=y` overrides (absl semantics)."""
  bad = [o for o in overrides if not o.startswith("--config.")]
  if bad:
    raise ConfigError(f"unrecognised arguments: {' '.join(bad)} (overrides are --config.x=y)")
  argv = ["rcst", f"--config={resolve(spec)}", *overrides]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "config file", flag_values=fv,
                                  lock_config=True, sys_argv=argv)
  try:
    fv(argv)
  except AttributeError as e:  # an unknown override key (ml_collections wraps a KeyError)
    if not (e.args and isinstance(e.args[0], KeyError)):
      raise
    msg = str(e.args[0].args[0]).replace(chr(10), "; ")
    raise ConfigError(f"bad override ({' '.join(overrides)}): unknown config key {msg}") from None
  except flags.Error as e:  # an ill-typed value, or a variant get_config refuses
    text = str(e).replace("\\n", "\n")
    lines = [x.strip() for x in text.splitlines()
             if x.strip() and not x.startswith((" ", "Traceback", "During handling"))]
    raise ConfigError(f"config {spec!r}: {'; '.join(lines) or text}") from None
  return fv.config
