"""The calibration and test images of a run, and the one transform they get.

One transform per run, derived from the proposed edge's metadata (timm's
data config: input size, crop_pct, interpolation): `rcst evaluate`,
`calibrate`, `run`, `explain` and `predict` all cut the same crop, and every
model then normalises those pixels with its own mean/std. A model whose own
config differs is named in a warning (the server must see pixels cut from
the edge's crop, or patches would not line up).
"""

from __future__ import annotations

import dataclasses
import hashlib
import warnings

import numpy as np

from rcst_edge.errors import ConfigError, RcstError
from rcst_jax.data import imagenet
from rcst_jax.data.folder import ImageFolder
from rcst_jax.data.identity import source_identity
from rcst_jax.data.imagenet import calibration_test_split
from rcst_jax.data.preprocess import BadItemError, Preprocess
from rcst_jax.data.synthetic import SyntheticShapes

_TRANSFORM_KEYS = ("input_size", "crop_pct", "interpolation")


class UnreadableImagesError(RcstError):
  """No image of a part of the run (calibration or test) can be read: nothing to run on."""


def _first_error(source, indices) -> BadItemError | None:
  """None as soon as one image of ``indices`` decodes, else the first one's error."""
  first = None
  for i in indices:
    try:
      source[int(i)]
      return None
    except BadItemError as e:
      first = first or e
  return first


def require_readable(source, parts: dict, where: str) -> None:
  """UnreadableImagesError (with the counts and one file's reason) unless some image of
  each part ({name: indices}) decodes. Reads until the first that does: one image a
  part when the data are good, all of them only when none is, so the refusal comes
  before any model runs."""
  bad = {name: e for name, idx in parts.items() if (e := _first_error(source, idx))}
  if not bad:
    return
  first = next(iter(bad.values()))
  if len(bad) == len(parts):
    total = sum(len(idx) for idx in parts.values())
    what = f"all {total} images are unreadable"
  else:
    what = "; ".join(f"all {len(parts[name])} {name} images are unreadable" for name in bad)
  raise UnreadableImagesError(f"{where}: {what} (e.g. {first}); nothing to run on")


def run_transform(edge_metadata: dict, others: dict | None = None) -> Preprocess:
  """The edge's eval transform; warns for each of `others` ({name: metadata})
  whose own transform differs."""
  prep = Preprocess.from_timm_cfg(edge_metadata)
  for name, meta in (others or {}).items():
    if Preprocess.from_timm_cfg(meta) != prep:
      mine = {k: meta.get(k) for k in _TRANSFORM_KEYS}
      warnings.warn(f"{name} model's own eval transform {mine} differs from the edge's "
                    f"{transform_record(prep)}; it gets the edge's crop (one crop per run)",
                    stacklevel=2)
  return prep


def transform_record(prep: Preprocess) -> dict:
  return {"resize_size": int(prep.resize_size), "crop_size": int(prep.crop_size),
          "interpolation": str(prep.interpolation)}


def transform_from_record(record: dict | None, edge_metadata: dict) -> Preprocess:
  """The transform a calibration recorded (older artifacts: the edge's own)."""
  return Preprocess(**record) if record else Preprocess.from_timm_cfg(edge_metadata)


@dataclasses.dataclass
class Sources:
  """Calibration and test images: ImageSources plus the indices used from each
  (None: all of it). ImageNet uses one source split by index; the demo uses
  two synthetic splits."""
  cal_source: object
  test_source: object
  cal_indices: np.ndarray | None = None
  test_indices: np.ndarray | None = None
  name: str = "dataset"

  def __post_init__(self):
    if self.cal_indices is None:
      self.cal_indices = np.arange(len(self.cal_source))
    if self.test_indices is None:
      self.test_indices = np.arange(len(self.test_source))
    self.cal_indices = np.asarray(self.cal_indices, np.int64)
    self.test_indices = np.asarray(self.test_indices, np.int64)

  def identity(self) -> dict:
    """What the cache fingerprint needs to know about the data as a whole;
    what each image holds is identified apart (data.identity.item_digests)."""
    digest = lambda a: hashlib.sha1(np.asarray(a, np.int64).tobytes()).hexdigest()
    return {"name": self.name, "cal_source": source_identity(self.cal_source),
            "test_source": source_identity(self.test_source), "cal": digest(self.cal_indices),
            "test": digest(self.test_indices)}

  def label_bound(self) -> int:
    """One more than the largest class index an image of the run can carry."""
    bound = 0
    for src in {id(self.cal_source): self.cal_source, id(self.test_source): self.test_source}.values():
      if isinstance(src, ImageFolder):  # the labels actually used, not the whole map
        bound = max([bound] + [label + 1 for _, label in src.items])
      else:
        bound = max(bound, int(getattr(src, "num_classes", 0)))
    return bound

  def check_labels(self, named_metadata: dict) -> None:
    """Every image's label must be a class of every model ({name: metadata}):
    refused before any model runs."""
    bound = self.label_bound()
    for name, meta in named_metadata.items():
      n = int(meta["num_classes"])
      if bound > n:
        raise ConfigError(f"the data ({self.name}) has class indices up to {bound - 1}, but the "
                          f"{name} model has {n} classes; use a label map onto its classes")


def load_sources(config, transform: Preprocess) -> Sources:
  """The data of `config.data`, every image through `transform`."""
  d = config.data
  if d.name == "synthetic":
    cal = SyntheticShapes("calibration", d.n_cal, seed=d.seed)
    if transform != Preprocess(cal.image_size, cal.image_size, transform.interpolation):
      raise ValueError(f"the synthetic images are {cal.image_size}x{cal.image_size}; the edge's "
                       f"transform {transform_record(transform)} would change them")
    return Sources(cal, SyntheticShapes("test", d.n_test, seed=d.seed), name="synthetic")
  if d.name == "folder":
    if not d.folder_root:
      raise ValueError("data.name='folder' needs data.folder_root")
    source = ImageFolder(d.folder_root, d.label_map, preprocess=transform)
  else:
    kw = dict(data_dir=d.data_dir, pil_decode=d.get("pil_decode", True), preprocess=transform)
    if d.name == "imagenet2012":
      source = imagenet.imagenet2012(d.split, **kw)
    elif d.name == "imagenet_v2":
      source = imagenet.imagenet_v2(**kw)
    elif d.name == "imagenette":
      source = imagenet.imagenette(d.split, **kw)
    else:
      raise ValueError(f"unknown data.name {d.name!r}; one of synthetic, folder, imagenet2012, "
                       "imagenet_v2, imagenette")
  n = len(source) if not d.get("limit") else min(len(source), int(d.limit))
  if int(d.n_cal) >= n:  # never shrink silently: the user asked for this many
    limit = " (after data.limit)" if d.get("limit") else ""
    raise ConfigError(f"data.n_cal={int(d.n_cal)} leaves no test image: {d.name} has {n} "
                      f"images{limit}; use data.n_cal <= {n - 1}")
  split = calibration_test_split(n, int(d.n_cal), d.split_seed)
  if d.name == "folder":  # files a user gathered: unreadable ones are named before the run
    require_readable(source, {"calibration": split.cal_idx, "test": split.test_idx},
                     f"data.folder_root={d.folder_root}")
  return Sources(source, source, split.cal_idx, split.test_idx, name=f"{d.name}/{d.split}")
