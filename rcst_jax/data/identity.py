"""What identifies the data a result was computed from: the bytes, not the names.

A cached result may be reused only for the same inputs. A folder image is
identified by its relative path, its label and the sha256 of its bytes (so a
file replaced under the same name, or a label-map line moved, is new data);
a tfds record by dataset, version, split and index; a synthetic scene by
(split, seed, size, index), since it is rendered from those alone. Hashing a
large folder once is fine, every run is not: file digests are kept in a
`DigestCache` keyed by (size, mtime, ctime, inode), so an unchanged file is
only stat'ed. A source of another type may define ``item_digest(index)``;
without one its items get a fresh random identity, so nothing computed from
them is ever reused (with a warning).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import warnings

from tqdm.auto import tqdm

from rcst_jax.core.fileio import atomic_write_text
from rcst_jax.data.folder import ImageFolder
from rcst_jax.data.imagenet import TfdsSource
from rcst_jax.data.synthetic import SyntheticShapes

_BLOCK = 1 << 20


def file_sha256(path: str) -> str:
  """The sha256 of a file's bytes, read in 1 MiB blocks."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(_BLOCK):
      h.update(block)
  return h.hexdigest()


def _stat_key(st: os.stat_result) -> list:
  # ctime cannot be set back by a user (unlike mtime): a rewrite always shows.
  return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


class DigestCache:
  """File digests by path and stat; `path` None keeps them in memory only."""

  def __init__(self, path: str | None = None):
    self.path, self.entries, self.dirty = path, {}, False
    if path and os.path.exists(path):
      try:
        with open(path, encoding="utf-8") as f:
          loaded = json.load(f)
        self.entries = loaded if isinstance(loaded, dict) else {}
      except (OSError, ValueError):
        self.entries = {}  # a damaged cache only costs a re-read

  def sha256(self, path: str) -> str:
    key = os.fsencode(os.path.abspath(path)).decode("utf-8", "backslashreplace")
    stat = _stat_key(os.stat(path))
    hit = self.entries.get(key)
    if isinstance(hit, list) and len(hit) == 5 and hit[:4] == stat:
      return hit[4]
    digest = file_sha256(path)
    if _stat_key(os.stat(path)) != stat:  # changed while we read it: not a stable digest
      raise OSError(f"{path} changed while it was being hashed")
    self.entries[key], self.dirty = stat + [digest], True
    return digest

  def save(self) -> None:
    if self.path and self.dirty:
      atomic_write_text(self.path, json.dumps(self.entries, sort_keys=True) + "\n")
      self.dirty = False


def _h(*parts) -> str:
  h = hashlib.sha256()
  for p in parts:
    h.update(p if isinstance(p, bytes) else str(p).encode())
    h.update(b"\0")
  return h.hexdigest()


def source_identity(source) -> dict:
  """What names a source as a whole (its kind, place, version, label map)."""
  n = len(source)
  if isinstance(source, ImageFolder):
    label_map = _h(json.dumps(sorted(source.label_map.items())))
    return {"kind": "folder", "n": n, "label_map": label_map,
            "num_classes": int(source.num_classes)}
  if isinstance(source, TfdsSource):
    info = source.describe()
    lm = None if source.label_map is None else _h(source.label_map.tobytes())
    return {"kind": "tfds", "n": n, "name": info["name"], "split": info["split"],
            "version": info["version"], "label_map": lm}
  if isinstance(source, SyntheticShapes):
    return {"kind": "synthetic", "n": n, "split": source.split, "seed": source.seed,
            "image_size": source.image_size}
  return {"kind": type(source).__name__, "n": n}


def item_digests(source, indices, cache: DigestCache | None = None,
                 progress: bool = False) -> list[str]:
  """One digest per item of ``source`` at ``indices`` (see the module docstring)."""
  indices = [int(i) for i in indices]
  if isinstance(source, ImageFolder):
    cache = cache or DigestCache()
    out = []
    for i in tqdm(indices, desc="hashing input files", disable=not progress, leave=False):
      rel, label = source.items[i]
      path = os.path.join(source.root, rel)
      try:
        content = cache.sha256(path)
      except OSError as e:  # unreadable now: batches() will report it as a bad item
        content = f"unreadable:{type(e).__name__}"
      out.append(_h(os.fsencode(rel), label, content))
    return out
  if isinstance(source, TfdsSource):
    info = source.describe()
    return [_h(info["name"], info["split"], info["version"], i) for i in indices]
  if isinstance(source, SyntheticShapes):
    return [_h("synthetic", source.split, source.seed, source.image_size, i) for i in indices]
  if hasattr(source, "item_digest"):
    return [str(source.item_digest(i)) for i in indices]
  warnings.warn(f"a {type(source).__name__} source has no item_digest(): its items cannot be "
                "identified by content, so no result computed from them is reused", stacklevel=2)
  nonce = secrets.token_hex(16)
  return [_h(nonce, i) for i in indices]


def combine(digests) -> str:
  """One digest of a sequence of item digests (order matters)."""
  return _h(*digests)
