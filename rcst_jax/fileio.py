"""Files we write: atomic replacement and strict JSON, in one place.

Every output (cache chunks, calibration, tables, summaries) goes through
``atomic_write`` so a reader never sees a half-written file under its final
name. Temporary names carry the pid and random bytes: two runs, or several
hosts on one shared filesystem, never write the same temporary file.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import secrets
from typing import Any, Callable

import numpy as np

from rcst_jax.errors import OutputRefusedError


def _tmp_name(path: str) -> str:
  d, base = os.path.split(os.path.abspath(path))
  return os.path.join(d, f".{base}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w"):
  """Write to a unique temporary file, fsync, then rename over ``path``."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = _tmp_name(path)
  try:
    with open(tmp, mode) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)


def atomic_write_text(path: str, text: str) -> str:
  with atomic_open(path, "w") as f:
    f.write(text)
  return path


def atomic_write_bytes(path: str, data: bytes) -> str:
  with atomic_open(path, "wb") as f:
    f.write(data)
  return path


def atomic_savez(path: str, **arrays) -> str:
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  return atomic_write_bytes(path, buf.getvalue())


def plain(x: Any) -> Any:
  """JSON-safe value: numpy -> Python, ConfigDict -> dict, NaN/inf -> None."""
  if hasattr(x, "to_dict"):
    x = x.to_dict()
  if isinstance(x, dict):
    return {str(k): plain(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [plain(v) for v in x]
  if isinstance(x, np.ndarray):
    return plain(x.tolist())
  if isinstance(x, np.generic):
    x = x.item()
  if isinstance(x, float) and not math.isfinite(x):
    return None
  return x


def dumps(x: Any, **kwargs) -> str:
  """Strict JSON (never NaN): non-finite floats become null."""
  return json.dumps(plain(x), allow_nan=False, **kwargs)


def write_json(path: str, x: Any, indent: int = 2) -> str:
  return atomic_write_text(path, dumps(x, indent=indent, default=str) + "\n")


# ---------------------------------------------------------------- output directories


def _inside(path: str, root: str) -> bool:
  """path is root or lies below it (both real paths)."""
  return os.path.commonpath([path, root]) == root


def check_output_dir(directory: str, overwrite: bool, protect, ours: Callable[[str], bool],
                     what: str, ours_means: str) -> str:
  """Refuses an output directory we may not write into or replace; returns
  its absolute path. Runs before any work. Never replaced: the current
  directory or a parent of it, a directory holding any path in ``protect``
  (e.g. the input weights), a symbolic link, a file, and, even with
  ``overwrite``, a non-empty directory for which ``ours`` is False
  (``ours_means`` says what ours looks like).
  """
  directory = os.path.abspath(directory)
  real = os.path.realpath(directory)
  refuse = f"refusing to write {what} to {directory}"
  if os.path.islink(directory):
    raise OutputRefusedError(f"{refuse}: it is a symbolic link")
  if os.path.exists(directory) and not os.path.isdir(directory):
    raise OutputRefusedError(f"{refuse}: it exists and is not a directory")
  if _inside(os.path.realpath(os.getcwd()), real):
    raise OutputRefusedError(f"{refuse}: it is the current directory or one of its parents")
  for p in protect:
    if p is not None and _inside(os.path.realpath(p), real):
      raise OutputRefusedError(f"{refuse}: it contains the input {p}")
  if os.path.isdir(directory) and os.listdir(directory):
    if not overwrite:
      raise OutputRefusedError(f"{directory} exists and is not empty (use --overwrite to"
                               f" replace {what})")
    if not ours(directory):
      raise OutputRefusedError(f"refusing to overwrite {directory}: not {ours_means}")
  return directory


def umask() -> int:
  """The process's umask, read without changing it where /proc allows."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except OSError:
    pass
  mask = os.umask(0o022)
  os.umask(mask)
  return mask
