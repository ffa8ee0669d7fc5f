"""Files we write: atomic replacement and strict JSON, in one place.

Every output (cache chunks, calibration, tables, summaries) goes through
``atomic_open`` (or its ``atomic_write_*`` / ``atomic_savez`` wrappers) so a
reader never sees a half-written file under its final name. Temporary names
carry the pid and random bytes: two runs, or several hosts on one shared
filesystem, never write the same temporary file.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import secrets
from typing import Any, Callable

import numpy as np

from rcst_edge.errors import OutputRefusedError


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
  if isinstance(x, str) and not x.isascii():  # a non-UTF-8 file name: its bytes, escaped
    return os.fsencode(x).decode("utf-8", "backslashreplace")
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


# ---------------------------------------------------------------- a run's output directory

MARKER = ".rcst_outputs.json"
_MARKER_FORMAT = "rcst_outputs"


def _file_sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(1 << 20):
      h.update(block)
  return h.hexdigest()


class OutputDir:
  """A directory rcst writes results into, and never a user's files.

  It must be new, empty, or created by rcst (the `MARKER` file, which
  records the sha256 of every output rcst wrote). `claim` runs before any
  work: an output name that holds a file rcst did not write is refused, and
  one rcst wrote but that changed since is refused unless ``overwrite``.
  Names are marked as pending before they are written, so an interrupted
  write leaves nothing that looks foreign to the next run.
  """

  def __init__(self, directory: str):
    self.dir = os.path.abspath(directory)
    self.marker = os.path.join(self.dir, MARKER)

  def _entries(self) -> dict | None:
    """The marker's records; None when there is no readable marker."""
    try:
      with open(self.marker, encoding="utf-8") as f:
        d = json.load(f)
    except (OSError, ValueError):
      return None
    if not isinstance(d, dict) or d.get("format") != _MARKER_FORMAT \
        or not isinstance(d.get("files"), dict):
      return None
    return d["files"]

  def _write(self, entries: dict) -> None:
    atomic_write_text(self.marker, json.dumps({"format": _MARKER_FORMAT, "files": entries},
                                              indent=1, sort_keys=True) + "\n")

  def claim(self, names, overwrite: bool = False) -> "OutputDir":
    """Checks that ``names`` (paths relative to the directory) may be written."""
    d, refuse = self.dir, f"refusing to write results to {self.dir}"
    if os.path.islink(d):
      raise OutputRefusedError(f"{refuse}: it is a symbolic link")
    if os.path.exists(d) and not os.path.isdir(d):
      raise OutputRefusedError(f"{refuse}: it exists and is not a directory")
    if _inside(os.path.realpath(os.getcwd()), os.path.realpath(d)):
      raise OutputRefusedError(f"{refuse}: it is the current directory or one of its parents")
    entries = self._entries()
    if entries is None:
      if os.path.isdir(d) and os.listdir(d):
        raise OutputRefusedError(
            f"{refuse}: it is not empty and was not created by rcst (no {MARKER}); choose a "
            "new or empty output_dir (rcst never replaces files it did not write)")
      os.makedirs(d, exist_ok=True)
      entries = {}
    for name in names:
      path = os.path.join(d, name)
      if not os.path.lexists(path):
        continue
      if name not in entries or os.path.islink(path) or not os.path.isfile(path):
        raise OutputRefusedError(f"{refuse}: {path} was not written by rcst; move it away "
                                 "(rcst never replaces files it did not write)")
      if entries[name] is not None and entries[name] != _file_sha256(path) and not overwrite:
        raise OutputRefusedError(f"{refuse}: {path} changed since rcst wrote it; move it away, "
                                 "or pass --overwrite to replace it")
    self._write({**entries, **{n: entries.get(n) for n in names}})  # pending until written
    return self

  def record(self, path: str) -> str:
    """Notes a file just written (its sha256) as rcst's own; returns the path."""
    entries = self._entries() or {}
    entries[os.path.relpath(os.path.abspath(path), self.dir)] = _file_sha256(path)
    self._write(entries)
    return path
