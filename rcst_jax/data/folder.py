"""A plain image folder: ``root/<class folder>/<image>``, one sub-folder per class.

Class indices come from a label map: by default the sorted sub-folder names
(torchvision's ImageFolder rule); or an explicit map, so that folders named by
WordNet id land on ImageNet-1k indices (``label_map='imagenet'``).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Mapping

from rcst_edge.errors import ConfigError
from rcst_jax.data import labels as labels_lib
from rcst_jax.data.preprocess import Example, Preprocess

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff",
                    ".ppm", ".pgm")


def read_label_map(path: str | os.PathLike) -> dict[str, int]:
  """Folder name -> class index from a file.

  ``.json``: an object ``{"n01440764": 0, ...}``. Text: one folder name per line
  (index = line number), or ``<name> <index>`` per line. A name given twice, or
  one class index given to two names, is refused: either is a slip that would
  silently drop or merge a class.
  """
  path = os.fspath(path)
  # surrogateescape: a name may hold a folder's raw non-UTF-8 bytes, as os.listdir gives them
  with open(path, encoding="utf-8", errors="surrogateescape") as f:
    text = f.read()
  try:
    pairs = _json_pairs(text) if path.endswith(".json") else _text_pairs(text)
  except ValueError as e:
    raise ConfigError(f"{path}: not a label map ({e})") from e
  return _checked_map(pairs, path)


class _Pairs(list):
  """A JSON object as its (key, value) pairs, duplicates kept (json keeps the last)."""


def _json_pairs(text: str) -> list[tuple[str, int]]:
  obj = json.loads(text, object_pairs_hook=_Pairs)
  if not isinstance(obj, _Pairs):
    raise ValueError(f"expected an object, got {type(obj).__name__}")
  return [(str(k), _index(v)) for k, v in obj]


def _text_pairs(text: str) -> list[tuple[str, int]]:
  rows = [line.split() for line in text.splitlines() if line.strip()]
  if all(len(r) == 1 for r in rows):
    return [(r[0], i) for i, r in enumerate(rows)]
  if all(len(r) == 2 for r in rows):
    return [(r[0], _index(r[1])) for r in rows]
  raise ValueError("expected '<name>' or '<name> <index>' on every line")


def _index(v) -> int:
  if isinstance(v, float) and v.is_integer():
    v = int(v)
  if isinstance(v, bool) or not isinstance(v, (int, str)):
    raise ValueError(f"class index {v!r} is not an integer")
  i = int(v)  # a str that is not an integer raises ValueError
  if i < 0:
    raise ValueError(f"class index {i} is negative")
  return i


def _checked_map(pairs: list[tuple[str, int]], path: str) -> dict[str, int]:
  if not pairs:
    raise ConfigError(f"{path}: the label map names no folder")
  m, owner = {}, {}
  for name, index in pairs:
    if name in m:
      raise ConfigError(f"{path}: folder name {name!r} is given twice "
                        f"(class {m[name]} and class {index})")
    if index in owner:
      raise ConfigError(f"{path}: class index {index} is given to both {owner[index]!r} "
                        f"and {name!r}")
    m[name], owner[index] = index, name
  return m


def _resolve_label_map(root: str, label_map) -> dict[str, int]:
  if label_map is None:
    folders = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    return {name: i for i, name in enumerate(folders)}
  if label_map == "imagenet":
    return labels_lib.imagenet_label_map()
  if isinstance(label_map, Mapping):
    return {str(k): int(v) for k, v in label_map.items()}
  return read_label_map(label_map)


def _scan(root: str, label_map: dict[str, int], extensions) -> list[tuple[str, int]]:
  """(relative path, label) for every image file, in a stable sorted order."""
  items, unmapped = [], []
  for folder in sorted(os.listdir(root)):
    path = os.path.join(root, folder)
    if folder.startswith(".") or not os.path.isdir(path):
      continue
    if folder not in label_map:
      unmapped.append(folder)
      continue
    for dirpath, dirnames, filenames in os.walk(path):
      dirnames.sort()
      for name in sorted(filenames):
        if name.lower().endswith(extensions) and not name.startswith("."):
          rel = os.path.relpath(os.path.join(dirpath, name), root)
          items.append((rel, label_map[folder]))
  if unmapped:
    logging.warning("%s: %d folders not in the label map are ignored: %s", root,
                    len(unmapped), unmapped[:5])
  return items


class ImageFolder:
  """An ImageSource over ``root/<class>/**/<image>``.

  Files without an image extension are ignored when scanning; files that have
  one but do not decode raise BadImageError when read, so batches() counts and
  skips them.
  """

  def __init__(self, root: str | os.PathLike, label_map=None, *,
               num_classes: int | None = None, preprocess: Preprocess = Preprocess(),
               extensions: tuple[str, ...] = IMAGE_EXTENSIONS):
    self.root = os.fspath(root)
    if not os.path.isdir(self.root):
      raise ConfigError(f"image folder {self.root}: not found or not a directory")
    self.label_map = _resolve_label_map(self.root, label_map)
    self.num_classes = num_classes or max(self.label_map.values(), default=-1) + 1
    self.preprocess = preprocess
    self.items = _scan(self.root, self.label_map, tuple(e.lower() for e in extensions))

  def __len__(self) -> int:
    return len(self.items)

  def __getitem__(self, index: int) -> Example:
    rel, label = self.items[index]
    return Example(self.preprocess(os.path.join(self.root, rel)), label, rel)
