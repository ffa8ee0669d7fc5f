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

from rcst_jax.data import labels as labels_lib
from rcst_jax.data.preprocess import Example, Preprocess
from rcst_jax.errors import ConfigError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff",
                    ".ppm", ".pgm")


def read_label_map(path: str | os.PathLike) -> dict[str, int]:
  """Folder name -> class index from a file.

  ``.json``: an object ``{"n01440764": 0, ...}``. Text: one folder name per line
  (index = line number), or ``<name> <index>`` per line.
  """
  path = os.fspath(path)
  with open(path) as f:
    if path.endswith(".json"):
      try:
        obj = json.load(f)
        if not isinstance(obj, dict):
          raise ValueError(f"expected an object, got {type(obj).__name__}")
        return _checked_map({str(k): _index(v) for k, v in obj.items()}, path)
      except ValueError as e:
        raise ConfigError(f"{path}: not a label map ({e})") from e
    rows = [line.split() for line in f if line.strip()]
  if all(len(r) == 1 for r in rows):
    return _checked_map({r[0]: i for i, r in enumerate(rows)}, path, len(rows))
  if all(len(r) == 2 for r in rows):
    try:
      return _checked_map({r[0]: _index(r[1]) for r in rows}, path, len(rows))
    except ValueError as e:
      raise ConfigError(f"{path}: not a label map ({e})") from e
  raise ConfigError(f"{path}: expected '<name>' or '<name> <index>' on every line")


def _index(v) -> int:
  if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
    raise ValueError(f"class index {v!r} is not an integer")
  i = int(v)
  if i < 0:
    raise ValueError(f"class index {i} is negative")
  return i


def _checked_map(m: dict[str, int], path: str, rows: int | None = None) -> dict[str, int]:
  if rows is not None and len(m) != rows:
    raise ConfigError(f"{path}: a folder name appears on more than one line")
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
