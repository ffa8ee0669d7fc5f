"""ImageNet-1k validation, ImageNet-V2 and Imagenette through tfds, without TensorFlow.

Reading uses ``tfds.data_source`` (ArrayRecord files, random access, numpy
only), so evaluation can shard and resume from any index. Building the tfds
files needs TensorFlow once; do it in any environment that has it.

ImageNet-1k validation, one-time setup:

  1. Get ``ILSVRC2012_img_val.tar`` (6.3 GB) from image-net.org (free account,
     "ILSVRC2012 / Download images").
     ``ILSVRC2012_img_train.tar`` (138 GB) is optional: tfds builds the splits
     whose tars it finds, and only validation is used here.
  2. Put it in ``<data_dir>/downloads/manual/``, e.g.
     ``~/tensorflow_datasets/downloads/manual/ILSVRC2012_img_val.tar``.
  3. Build once, as ArrayRecord (the default TFRecord format has no random access):

       pip install tensorflow tensorflow-datasets array_record
       tfds build imagenet2012 --data_dir=<data_dir> --file_format=array_record

     (Already built as TFRecord? ``tfds convert_format --root_data_dir=<data_dir>
     --out_file_format=array_record`` converts in place.)
  4. Read here with ``imagenet2012(data_dir=<data_dir>)``; TensorFlow is no
     longer needed. Nothing is ever downloaded from here (``download=False``).

ImageNet-V2 (``imagenet_v2``, split ``test``) and Imagenette (``imagenette``)
need no manual step: ``tfds build imagenet_v2 --file_format=array_record``
(and the same for ``imagenette``) on a machine with internet.

The paper splits the 50,000 validation images into 10,000 for calibration and
40,000 for test: `calibration_test_split` does it with a recorded seed.
"""

from __future__ import annotations

import hashlib
from typing import Any, NamedTuple, Sequence

import numpy as np

from rcst_jax.data import labels as labels_lib
from rcst_jax.data.preprocess import BadImageError, Example, Preprocess, array_to_rgb

IMAGENET_VAL_SIZE = 50_000
CALIBRATION_SIZE = 10_000
SPLIT_SEED = 0


# ---------------------------------------------------------------- calibration / test split


class Split(NamedTuple):
  cal_idx: np.ndarray   # sorted int64 indices into the validation set
  test_idx: np.ndarray  # sorted, disjoint from cal_idx, together all of range(n_total)
  record: dict          # goes into the calibration artifact: enough to redo the split


def _digest(idx: np.ndarray) -> str:
  return hashlib.sha256(np.asarray(idx, "<i8").tobytes()).hexdigest()[:16]


def calibration_test_split(n_total: int = IMAGENET_VAL_SIZE, n_cal: int = CALIBRATION_SIZE,
                           seed: int = SPLIT_SEED) -> Split:
  """A fixed random split: the first n_cal of a seeded permutation calibrate.

  Random, not the first 10k files, because exchangeability of calibration and
  test points is what the CRC/APS guarantees assume. Indices are positions in
  the source; tfds fixes its record order at build time (a hash of the example
  keys), so store `TfdsSource.describe()` next to this record.
  """
  if not 0 < n_cal < n_total:
    raise ValueError(f"need 0 < n_cal < n_total, got n_cal={n_cal}, n_total={n_total}")
  perm = np.random.default_rng(seed).permutation(n_total)
  cal_idx, test_idx = np.sort(perm[:n_cal]), np.sort(perm[n_cal:])
  record = dict(seed=int(seed), n_total=int(n_total), n_cal=int(n_cal),
                n_test=int(n_total - n_cal),
                rule="np.random.default_rng(seed).permutation(n_total)[:n_cal] calibrate",
                cal_sha256=_digest(cal_idx))
  return Split(cal_idx, test_idx, record)


# ---------------------------------------------------------------- tfds sources


class TfdsSource:
  """An ImageSource over a tfds data source (or any sequence of such dicts).

  Records hold 'image' (encoded bytes, or a decoded uint8 array), 'label'
  (the dataset's own index, mapped to ImageNet-1k via `label_map`) and
  optionally 'file_name', used as the key.
  """

  def __init__(self, data_source: Sequence[dict[str, Any]], *, name: str, split: str,
               label_map: Sequence[int] | None = None,
               num_classes: int = labels_lib.NUM_IMAGENET_CLASSES,
               preprocess: Preprocess = Preprocess()):
    self.data_source = data_source
    self.name, self.split = name, split
    self.label_map = None if label_map is None else np.asarray(label_map, np.int64)
    self.num_classes = num_classes
    self.preprocess = preprocess

  def __len__(self) -> int:
    return len(self.data_source)

  def describe(self) -> dict:
    """What identifies the index order, for artifacts."""
    info = getattr(self.data_source, "dataset_info", None)
    return dict(name=self.name, split=self.split, size=len(self),
                version=str(info.version) if info is not None else None)

  def _read(self, index: int) -> dict[str, Any]:
    try:
      return self.data_source[index]
    except IndexError:
      raise
    except Exception as e:  # a corrupt record or a decoder error: skip, don't die
      raise BadImageError(f"{self.name}/{self.split}[{index}]: cannot read ({e!r})") from e

  def _label(self, raw) -> int:
    label = int(raw)
    if self.label_map is not None:
      # Out-of-range raw labels stay out of range, so batches() counts them.
      label = int(self.label_map[label]) if 0 <= label < len(self.label_map) else -1
    return label

  def __getitem__(self, index: int) -> Example:
    record = self._read(index)
    name = record.get("file_name")
    if isinstance(name, bytes):
      name = name.decode()
    key = name or f"{self.name}/{self.split}/{index}"
    image = record["image"]
    if isinstance(image, (bytes, bytearray)):
      pixels = self.preprocess(bytes(image))
    else:
      pixels = self.preprocess(array_to_rgb(image))
    return Example(pixels, self._label(record["label"]), key)


def load(name: str, split: str, data_dir: str | None = None, *, pil_decode: bool = True,
         preprocess: Preprocess = Preprocess()) -> TfdsSource:
  """Opens a prepared tfds dataset for random access; labels -> ImageNet-1k indices.

  pil_decode: read the encoded JPEG bytes and decode with PIL + convert('RGB'),
    exactly as timm's eval pipeline does (tfds would decode with OpenCV if it is
    installed). ``tfds.testing.mock_data`` cannot produce encoded bytes without
    TensorFlow, so tests pass False and get tfds-decoded arrays.
  """
  import tensorflow_datasets as tfds
  decoders = {"image": tfds.decode.SkipDecoding()} if pil_decode else None
  try:
    ds = tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                          decoders=decoders)
  except Exception as e:
    raise FileNotFoundError(
        f"tfds dataset {name!r} (split {split!r}) is not prepared as ArrayRecord under "
        f"{data_dir or '~/tensorflow_datasets'}; see the setup steps in "
        f"rcst_jax/data/imagenet.py. ({e})") from e
  wnids = ds.dataset_info.features["label"].names
  return TfdsSource(ds, name=name, split=split, label_map=labels_lib.wnids_to_indices(wnids),
                    preprocess=preprocess)


def imagenet2012(split: str = "validation", data_dir: str | None = None, **kw) -> TfdsSource:
  """ImageNet-1k (ILSVRC 2012); the paper uses the 50,000 validation images."""
  return load("imagenet2012", split, data_dir, **kw)


def imagenet_v2(variant: str = "matched-frequency", data_dir: str | None = None,
                **kw) -> TfdsSource:
  """ImageNet-V2 test set (10,000 images), variants 'matched-frequency',
  'threshold-0.7', 'topimages'. Labels are already ImageNet-1k indices."""
  return load(f"imagenet_v2/{variant}", "test", data_dir, **kw)


def imagenette(split: str = "validation", config: str = "full-size-v2",
               data_dir: str | None = None, **kw) -> TfdsSource:
  """Imagenette: 10 easy ImageNet classes, labels mapped to ImageNet-1k indices
  (tench 0, English springer 217, cassette player 482, chain saw 491, church 497,
  French horn 566, garbage truck 569, gas pump 571, golf ball 574, parachute 701)."""
  return load(f"imagenette/{config}", split, data_dir, **kw)
