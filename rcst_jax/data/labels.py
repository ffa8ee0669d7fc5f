"""ImageNet-1k class ids and names, read from a plain data file shipped here.

`imagenet_classes.txt` has one line per class, in the standard index order
(sorted WordNet ids, as timm and tfds use): ``<wnid>\\t<lemma, lemma, ...>``.
It was copied from timm's package data (``timm/data/_info/imagenet_synsets.txt``
and ``imagenet_synset_to_lemma.txt``) so no download and no timm are needed.
"""

from __future__ import annotations

import functools
import importlib.resources

NUM_IMAGENET_CLASSES = 1000

@functools.lru_cache(maxsize=None)
def _rows() -> tuple[tuple[str, str], ...]:
  text = importlib.resources.files(__package__).joinpath("imagenet_classes.txt").read_text()
  rows = tuple(tuple(line.split("\t", 1)) for line in text.splitlines() if line.strip())
  if len(rows) != NUM_IMAGENET_CLASSES:
    raise ValueError(f"imagenet_classes.txt has {len(rows)} rows, expected 1000")
  return rows


def imagenet_wnids() -> list[str]:
  """The 1000 WordNet ids; position = class index."""
  return [wnid for wnid, _ in _rows()]


def imagenet_class_names(short: bool = True) -> list[str]:
  """Class names by index: the first lemma ('tench'), or all ('tench, Tinca tinca').

  Short names are not unique ('crane' is a bird and a machine; 'maillot' twice).
  """
  return [name.split(",")[0].strip() if short else name for _, name in _rows()]


def imagenet_label_map() -> dict[str, int]:
  """WordNet id -> ImageNet-1k index (for folders laid out as <wnid>/<file>)."""
  return {wnid: i for i, wnid in enumerate(imagenet_wnids())}


def wnids_to_indices(wnids) -> list[int]:
  """Maps a subset's WordNet ids to ImageNet-1k indices; unknown ids raise KeyError."""
  table = imagenet_label_map()
  return [table[w] for w in wnids]
