"""Config files by name or path, with big_vision-style variants.

``imagenet``, ``demo:smoke``, ``demo:quick=300`` name the configs shipped in
the package (``rcst_jax.configs``, the repository's top-level ``configs/``);
a path (``my.py`` or ``my.py:arg``) is read as is. An existing file wins over
a name. Overrides follow absl: ``--config.x=y``. A file that does not load
(a syntax error, an exception, no get_config, a result that is not a
ConfigDict) is a ConfigError naming the file, not a traceback.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil
import sys
import traceback
from importlib import resources

import ml_collections
from absl import flags
from ml_collections import config_flags

import rcst_jax.configs as pkg
from rcst_edge.errors import ConfigError


def names() -> list[str]:
  return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__))


def _locate(spec: str) -> tuple[str, str, str | None]:
  """(what the user named, the .py path, the get_config argument or None)."""
  if os.path.isfile(spec):  # an existing file wins, even with a ':' in its name
    return spec, spec, None
  name, sep, arg = spec.partition(":")
  arg = arg if sep else None
  if os.path.isfile(name):
    return name, name, arg
  if name.endswith(".py") or os.sep in name:
    raise ConfigError(f"config file {name!r} does not exist")
  path = resources.files("rcst_jax.configs") / f"{name}.py"
  if not path.is_file():
    raise ConfigError(f"unknown config {name!r}: not a file, and not one of {names()}")
  return name, str(path), arg


def variants(name: str) -> dict[str, str]:
  return dict(getattr(importlib.import_module(f"rcst_jax.configs.{name}"), "VARIANTS", {"": ""}))


def _where(e: BaseException, path: str) -> str:
  """' (line N)' of the innermost frame inside the config file, if any."""
  here = os.path.abspath(path)
  lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if f.filename == here]
  return f" (line {lines[-1]})" if lines else ""


def _run_file(path: str, label: str):
  """Executes the config file as a module: the module, or ConfigError naming the file."""
  name = "rcst_config_file"  # registered, as ml_collections does: dataclasses in a config need it
  spec = importlib.util.spec_from_file_location(name, os.path.abspath(path))
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  try:
    spec.loader.exec_module(module)
  except SyntaxError as e:
    sys.modules.pop(name, None)
    raise ConfigError(f"config {label}: syntax error at line {e.lineno}: {e.msg}") from None
  except Exception as e:  # anything a user's file raises is theirs to fix, not our bug
    sys.modules.pop(name, None)
    raise ConfigError(f"config {label}: {type(e).__name__} while loading: {e}"
                      f"{_where(e, path)}") from None
  return module


def load(spec: str):
  """The ConfigDict that the config file's get_config([arg]) returns."""
  label, path, arg = _locate(spec)
  module = _run_file(path, label)
  get_config = getattr(module, "get_config", None)
  if not callable(get_config):
    raise ConfigError(f"config {label}: defines no get_config() function")
  call = "get_config()" if arg is None else f"get_config({arg!r})"
  try:
    config = get_config() if arg is None else get_config(arg)
  except ConfigError as e:
    raise ConfigError(f"config {label}: {e}") from None
  except Exception as e:  # a refused variant, or a bug in the user's file
    raise ConfigError(f"config {label}: {call} raised {type(e).__name__}: {e}"
                      f"{_where(e, path)}") from None
  if not isinstance(config, ml_collections.ConfigDict):
    what = "None (is a return statement missing?)" if config is None else \
        f"a {type(config).__name__}"
    raise ConfigError(f"config {label}: {call} returned {what}, not an ml_collections "
                      "ConfigDict")
  return config


def parse(spec: str, overrides: list[str]):
  """ml_collections config + `--config.x=y` overrides (absl semantics)."""
  bad = [o for o in overrides if not o.startswith("--config.")]
  if bad:
    raise ConfigError(f"unrecognised arguments: {' '.join(bad)} (overrides are --config.x=y)")
  config, argv, fv = load(spec), ["rcst", *overrides], flags.FlagValues()
  try:  # overrides are applied when the flag is defined, and again when argv is parsed
    config_flags.DEFINE_config_dict("config", config, "config file", flag_values=fv,
                                    lock_config=True, sys_argv=argv)
    fv(argv)
  except AttributeError as e:  # an unknown override key (ml_collections wraps a KeyError)
    if not (e.args and isinstance(e.args[0], KeyError)):
      raise
    msg = str(e.args[0].args[0]).replace(chr(10), "; ")
    raise ConfigError(f"bad override ({' '.join(overrides)}): unknown config key {msg}") from None
  except flags.Error as e:  # an ill-typed value
    text = str(e).replace("\\n", "\n")
    lines = [x.strip() for x in text.splitlines()
             if x.strip() and not x.startswith((" ", "Traceback", "During handling"))]
    raise ConfigError(f"config {spec!r}: {'; '.join(lines) or text}") from None
  return fv.config
