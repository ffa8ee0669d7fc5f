"""Data: preprocessing parity, robust batching, splits, tfds (mocked), folders, synthetic."""

import collections
import hashlib
import io
import json

import numpy as np
import pytest
from PIL import Image

from rcst_jax.data import folder, imagenet, labels, synthetic
from rcst_jax.data.preprocess import (
  BadImageError,
  Example,
  Held,
  Preprocess,
  batches,
  center_crop,
  normalize,
  open_rgb,
)

# Imagenette's 10 classes, in imagenette's label order.
IMAGENETTE_WNIDS = (
    "n01440764", "n02102040", "n02979186", "n03000684", "n03028079",
    "n03394916", "n03417042", "n03425413", "n03445777", "n03888257",
)


def _jpeg_bytes(array, mode="RGB", fmt="JPEG") -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).convert(mode).save(buf, fmt)
  return buf.getvalue()


def _random_image(rng, h, w):
  return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("hw", [(375, 500), (500, 375), (257, 300), (300, 259), (80, 100)])
def test_preprocess_matches_pil_reference(rng, hw):
  h, w = hw
  img = Image.fromarray(_random_image(rng, h, w))
  out = Preprocess()(img)
  assert out.shape == (224, 224, 3) and out.dtype == np.uint8
  # Reference written out longhand: short side 256, bicubic, centre crop 224.
  size = (256, int(256 * h / w)) if w <= h else (int(256 * w / h), 256)
  ref = np.asarray(img.resize(size, Image.Resampling.BICUBIC))
  top, left = round((ref.shape[0] - 224) / 2), round((ref.shape[1] - 224) / 2)
  np.testing.assert_array_equal(out, ref[top:top + 224, left:left + 224])


def test_preprocess_matches_timm_eval_transform(rng):
  """The same pixels as timm's eval pipeline (torchvision Resize + CenterCrop)."""
  pytest.importorskip("torchvision")
  from timm.data import create_transform
  cfg = dict(input_size=(3, 224, 224), crop_pct=0.875, interpolation="bicubic")
  tf = create_transform(**cfg, is_training=False)
  for h, w in [(375, 500), (257, 300), (333, 241)]:
    img = Image.fromarray(_random_image(rng, h, w))
    ref = (tf(img).permute(1, 2, 0).numpy() * np.array([0.229, 0.224, 0.225])
           + np.array([0.485, 0.456, 0.406])) * 255
    np.testing.assert_allclose(Preprocess.from_timm_cfg(cfg)(img), ref, atol=1e-3)


def test_from_timm_cfg_and_center_crop_rounding():
  p = Preprocess.from_timm_cfg({"input_size": (3, 224, 224), "crop_pct": 0.95})
  assert (p.resize_size, p.crop_size, p.interpolation) == (235, 224, "bicubic")
  assert Preprocess.from_timm_cfg({"crop_pct": 0.875}) == Preprocess()
  square = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
  np.testing.assert_array_equal(Preprocess.from_timm_cfg({"crop_pct": 1.0})(square), square)
  x = np.arange(257 * 259).reshape(257, 259)
  # (257-224)/2 = 16.5 rounds to even (16); (259-224)/2 = 17.5 rounds to 18.
  assert center_crop(x, 224)[0, 0] == x[16, 18]
  with pytest.raises(ValueError):
    Preprocess(resize_size=200, crop_size=224)


@pytest.mark.parametrize("mode,fmt", [("L", "PNG"), ("P", "PNG"), ("RGBA", "PNG"),
                                      ("CMYK", "JPEG"), ("I;16", "PNG")])
def test_open_rgb_converts_to_rgb(rng, mode, fmt):
  data = _jpeg_bytes(_random_image(rng, 40, 30), mode, fmt)
  out = np.asarray(open_rgb(data))
  assert out.shape == (40, 30, 3) and out.dtype == np.uint8
  ref = Image.open(io.BytesIO(data))
  if mode == "I;16":  # 16-bit samples span 0..65535: scaled by 1/257, not clipped at 255
    ref = Image.fromarray(np.round(np.asarray(ref) / 257).astype(np.uint8))
  np.testing.assert_array_equal(out, np.asarray(ref.convert("RGB")))
  if mode == "L":
    assert (out[..., 0] == out[..., 2]).all()


def test_bad_images_raise(tmp_path, rng):
  with pytest.raises(BadImageError):
    open_rgb(b"this is not an image")
  truncated = _jpeg_bytes(_random_image(rng, 64, 64))[:300]
  with pytest.raises(BadImageError):
    open_rgb(truncated)
  (tmp_path / "x.jpg").write_text("hello")
  with pytest.raises(BadImageError):
    Preprocess()(tmp_path / "x.jpg")


def test_normalize():
  x = np.array([[[0, 128, 255]]], np.uint8)
  out = np.asarray(normalize(x, (0.5, 0.5, 0.5), (0.25, 0.5, 1.0)))
  np.testing.assert_allclose(out, [[[-2.0, (128 / 255 - 0.5) / 0.5, 0.5]]], atol=1e-6)
  assert out.dtype == np.float32


# ---------------------------------------------------------------- batching


class _FakeSource:
  """Items 0..n-1; `bad` indices fail to decode; `wild` have out-of-range labels."""
  num_classes = 5

  def __init__(self, n, bad=(), wild=()):
    self.n, self.bad, self.wild = n, set(bad), set(wild)

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    if i in self.bad:
      raise BadImageError(f"item {i}")
    label = 7 if i in self.wild else i % 5
    return Example(np.full((8, 8, 3), i, np.uint8), label, f"k{i}")


@pytest.mark.parametrize("workers", [0, 3])
def test_batches_skip_count_and_pad(workers):
  src = _FakeSource(12, bad=(1, 6), wild=(4,))
  skipped = collections.Counter()
  out = list(batches(src, range(12), 4, skipped=skipped, workers=workers, progress=False))
  assert skipped == {"bad_image": 2, "bad_label": 1}
  assert [b.valid.sum() for b in out] == [4, 4, 1]
  keys = [k for b in out for k, v in zip(b.keys, b.valid) if v]
  assert keys == [f"k{i}" for i in (0, 2, 3, 5, 7, 8, 9, 10, 11)]
  last = out[-1]
  assert last.images.shape == (4, 8, 8, 3) and last.labels.tolist() == [1, -1, -1, -1]
  assert not last.images[1:].any() and last.keys[1:] == ["", "", ""]
  np.testing.assert_array_equal(out[0].images[:, 0, 0, 0], [0, 2, 3, 5])


def test_held_source_reads_each_item_once_and_gives_the_same_batches():
  reads = collections.Counter()

  class Counting(_FakeSource):
    def __getitem__(self, i):
      reads[i] += 1
      return super().__getitem__(i)

  held = Held(Counting(12, bad=(1, 6), wild=(4,)), max_bytes=9 * 8 * 8 * 3)  # 9 of 10 images
  for _ in range(3):
    a, b = collections.Counter(), collections.Counter()
    got = list(batches(held, range(12), 4, skipped=a, progress=False))
    want = list(batches(_FakeSource(12, bad=(1, 6), wild=(4,)), range(12), 4, skipped=b,
                        progress=False))
    assert a == b
    for x, y in zip(got, want):
      np.testing.assert_array_equal(x.images, y.images)
      assert x.keys == y.keys and x.labels.tolist() == y.labels.tolist()
  # Held: the two bad items (no bytes) and the first 9 good ones; 11 is read every time.
  assert held.nbytes == 9 * 8 * 8 * 3 and len(held) == 12 and held.num_classes == 5
  assert reads[0] == reads[1] == 1 and reads[11] == 3


def test_batches_subset_indices_for_resume():
  src = _FakeSource(10)
  out = list(batches(src, [9, 3, 5], 2, progress=False))
  assert out[0].keys == ["k9", "k3"] and out[1].keys == ["k5", ""]


# ---------------------------------------------------------------- calibration / test split


def test_calibration_test_split():
  a = imagenet.calibration_test_split(50_000, 10_000, seed=0)
  b = imagenet.calibration_test_split(50_000, 10_000, seed=0)
  c = imagenet.calibration_test_split(50_000, 10_000, seed=1)
  np.testing.assert_array_equal(a.cal_idx, b.cal_idx)
  assert len(a.cal_idx) == 10_000 and len(a.test_idx) == 40_000
  assert not np.intersect1d(a.cal_idx, a.test_idx).size
  np.testing.assert_array_equal(np.sort(np.concatenate([a.cal_idx, a.test_idx])),
                                np.arange(50_000))
  assert (np.diff(a.cal_idx) > 0).all()
  assert not np.array_equal(a.cal_idx, c.cal_idx)
  assert a.record["seed"] == 0 and a.record["n_cal"] == 10_000 and a.record["n_test"] == 40_000
  json.dumps(a.record)  # goes into the calibration artifact
  # The record redoes the split, and its digest is of the calibration indices.
  r = a.record
  again = imagenet.calibration_test_split(r["n_total"], r["n_cal"], r["seed"])
  np.testing.assert_array_equal(again.test_idx, a.test_idx)
  assert r["cal_sha256"] == hashlib.sha256(
      np.asarray(a.cal_idx, "<i8").tobytes()).hexdigest()[:16]


# ---------------------------------------------------------------- tfds (mocked, no TensorFlow)


def test_imagenet_on_tfds_mock_data():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=6):
    src = imagenet.imagenet2012(pil_decode=False)
    assert len(src) == 6 and src.num_classes == 1000
    assert src.describe()["name"] == "imagenet2012" and src.describe()["size"] == 6
    skipped = collections.Counter()
    out = list(batches(src, None, 4, skipped=skipped, progress=False))
  assert not skipped and sum(b.valid.sum() for b in out) == 6
  assert out[0].images.shape == (4, 224, 224, 3) and out[0].images.dtype == np.uint8
  assert out[0].labels.dtype == np.int32
  assert all(0 <= lb < 1000 for b in out for lb, v in zip(b.labels, b.valid) if v)
  assert all(isinstance(k, str) and k for k in out[0].keys)


def test_unprepared_dataset_says_how_to_prepare(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(FileNotFoundError, match="setup steps"):
    imagenet.imagenet2012(data_dir=str(tmp_path))


def test_imagenette_and_v2_on_tfds_mock_data():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=8):
    nette = imagenet.imagenette(pil_decode=False)
    ex = [nette[i] for i in range(len(nette))]
    v2 = imagenet.imagenet_v2(pil_decode=False)
    assert v2[0].image.shape == (224, 224, 3) and 0 <= v2[0].label < 1000
  allowed = set(labels.wnids_to_indices(IMAGENETTE_WNIDS))
  assert all(e.label in allowed for e in ex) and ex[0].key.startswith("imagenette")


def test_real_array_record_read_without_tensorflow(tmp_path, rng):
  """Builds a tiny real ArrayRecord dataset (no TF needed for JPEG file objects) and
  reads it the way imagenet2012() does, both with PIL and with tfds decoding."""
  tfds = pytest.importorskip("tensorflow_datasets")
  jpegs = [_jpeg_bytes(_random_image(rng, 300, 400)) for _ in range(3)]

  class RcstTinyTestImages(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(encoding_format="jpeg"), "file_name": tfds.features.Text(),
          "label": tfds.features.ClassLabel(names=["n01440764", "n02102040"])}))

    def _split_generators(self, dl_manager):
      return {"validation": self._generate_examples()}

    def _generate_examples(self):
      for i, data in enumerate(jpegs):
        yield str(i), dict(image=io.BytesIO(data), label=i % 2, file_name=f"{i}.JPEG")

  RcstTinyTestImages(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  pil = imagenet.load("rcst_tiny_test_images", "validation", str(tmp_path), pil_decode=True)
  arr = imagenet.load("rcst_tiny_test_images", "validation", str(tmp_path), pil_decode=False)
  assert isinstance(pil.data_source[0]["image"], bytes) and len(pil) == 3
  for i in range(3):
    ex = pil[i]
    j = int(ex.key.split(".")[0])
    assert ex.label == [0, 217][j % 2]
    np.testing.assert_array_equal(ex.image, Preprocess()(jpegs[j]))
    assert np.abs(ex.image.astype(int) - arr[i].image.astype(int)).max() <= 2


def test_tfds_source_decodes_bytes_and_skips_bad(rng):
  """The real (pil_decode=True) path: records carry encoded JPEG bytes."""
  good = _jpeg_bytes(_random_image(rng, 300, 400))
  records = [dict(image=good, label=3, file_name=b"a.JPEG"),
             dict(image=b"garbage", label=1, file_name="b.JPEG"),
             dict(image=good, label=12, file_name="c.JPEG")]  # 12 is outside the map
  src = imagenet.TfdsSource(records, name="fake", split="validation", label_map=range(10))
  skipped = collections.Counter()
  (b,) = batches(src, None, 2, skipped=skipped, progress=False)
  assert skipped == {"bad_image": 1, "bad_label": 1}
  assert b.keys == ["a.JPEG", ""] and b.labels.tolist() == [3, -1]
  np.testing.assert_array_equal(b.images[0], Preprocess()(good))


# ---------------------------------------------------------------- label names


def test_imagenet_labels_and_imagenette_indices():
  wnids = labels.imagenet_wnids()
  assert len(wnids) == 1000 and wnids == sorted(wnids)
  assert labels.imagenet_class_names()[0] == "tench"
  assert labels.imagenet_class_names(short=False)[701] == "parachute, chute"
  assert labels.wnids_to_indices(IMAGENETTE_WNIDS) == [
      0, 217, 482, 491, 497, 566, 569, 571, 574, 701]


def test_imagenet_wnids_match_tfds():
  tfds = pytest.importorskip("tensorflow_datasets")
  names = tfds.builder("imagenet2012").info.features["label"].names
  assert names == labels.imagenet_wnids()
  nette = tfds.builder("imagenette").info.features["label"].names
  assert tuple(nette) == IMAGENETTE_WNIDS


# ---------------------------------------------------------------- image folder


def _make_folder(root, rng):
  for wnid in ("n01440764", "n02102040"):
    (root / wnid).mkdir()
    for i in range(2):
      (root / wnid / f"{i}.JPEG").write_bytes(_jpeg_bytes(_random_image(rng, 60, 80)))
  (root / "n02102040" / "notes.txt").write_text("not an image")
  (root / "n02102040" / "broken.jpg").write_bytes(b"\xff\xd8 broken")
  (root / "README.md").write_text("top-level files are not classes")


def test_image_folder_label_maps(tmp_path, rng):
  _make_folder(tmp_path, rng)
  by_name = folder.ImageFolder(tmp_path)
  assert len(by_name) == 5 and by_name.num_classes == 2  # .txt ignored, broken.jpg kept
  assert {lb for _, lb in by_name.items} == {0, 1}

  inet = folder.ImageFolder(tmp_path, label_map="imagenet")
  assert inet.num_classes == 1000 and {lb for _, lb in inet.items} == {0, 217}
  skipped = collections.Counter()
  out = list(batches(inet, None, 8, skipped=skipped, progress=False))
  assert skipped == {"bad_image": 1} and out[0].valid.sum() == 4
  assert out[0].images.shape == (8, 224, 224, 3)
  assert out[0].labels[:4].tolist() == [0, 0, 217, 217]

  (tmp_path / "map.json").write_text(json.dumps({"n02102040": 3}))
  only = folder.ImageFolder(tmp_path, str(tmp_path / "map.json"), num_classes=4)
  assert len(only) == 3 and {lb for _, lb in only.items} == {3}
  (tmp_path / "map.txt").write_text("n02102040 7\nn01440764 2\n")
  assert folder.read_label_map(tmp_path / "map.txt") == {"n02102040": 7, "n01440764": 2}
  (tmp_path / "names.txt").write_text("n02102040\nn01440764\n")
  assert folder.read_label_map(tmp_path / "names.txt") == {"n02102040": 0, "n01440764": 1}


# ---------------------------------------------------------------- synthetic


@pytest.fixture(scope="module")
def scenes():
  src = synthetic.SyntheticShapes("test", 240, seed=3)
  return [src.scene(i) for i in range(len(src))]


def test_synthetic_deterministic_and_splits_differ():
  a = synthetic.SyntheticShapes("train", 10, seed=0)
  b = synthetic.SyntheticShapes("train", 10, seed=0)
  for i in (0, 7):
    assert a[i].image.tobytes() == b[i].image.tobytes() and a[i].label == b[i].label
  assert a[0].image.shape == (224, 224, 3) and a[0].image.dtype == np.uint8
  assert isinstance(a[0].label, int) and a[0].key == "synthetic/train/0"
  others = [synthetic.SyntheticShapes("calibration", 10, seed=0),
            synthetic.SyntheticShapes("test", 10, seed=0),
            synthetic.SyntheticShapes("train", 10, seed=1)]
  for o in others:
    assert not np.array_equal(a[0].image, o[0].image)
  with pytest.raises(IndexError):
    a[10]


# Digests of the scenes the renderer drew before it was made faster (benchmarks/
# bench_synthetic.py keeps that renderer and compares thousands of scenes per split):
# the demo's images, hence its results, must not change by one byte.
SCENE_DIGESTS = {(0, "train", 150, 224): "63cb21dd3edaf8af",
                 (0, "calibration", 150, 224): "d0f88d5af2aaedc3",
                 (0, "test", 150, 224): "062b79cb9c912054",
                 (7, "test", 30, 96): "37b5e5b56dcf2ff9"}


@pytest.mark.parametrize("case", list(SCENE_DIGESTS))
def test_synthetic_scenes_are_byte_identical_to_the_reference(case):
  seed, split, n, size = case
  h = hashlib.sha256()
  for i in range(n):
    s = synthetic.render_scene(seed, split, i, size)
    assert s.image.flags.c_contiguous and s.image.shape == (size, size, 3)
    for a in (s.image, s.mask, s.distractor_mask):
      h.update(a.tobytes())
    h.update(repr((s.label, s.bbox, s.image.shape)).encode())
  assert h.hexdigest()[:16] == SCENE_DIGESTS[case]


def test_synthetic_object_area_and_classes(scenes):
  frac = np.array([s.mask.mean() for s in scenes])
  assert frac.min() >= 0.10 and frac.max() <= 0.25, (frac.min(), frac.max())
  assert 0.15 < frac.mean() < 0.20
  counts = np.bincount([s.label for s in scenes], minlength=synthetic.NUM_CLASSES)
  assert len(counts) == len(synthetic.CLASS_NAMES) == 12 and counts.min() > 0
  for s in scenes[:20]:
    top, left, bottom, right = s.bbox
    assert s.mask[top:bottom, left:right].sum() == s.mask.sum()
    assert not (s.mask & s.distractor_mask).any() and s.distractor_mask.any()


def test_synthetic_evidence_is_local(scenes):
  """The object fills a few of the 196 patches; most patches show no object."""
  cover = np.stack([synthetic.patch_coverage(s.mask) for s in scenes])
  assert cover.shape[1:] == (14, 14)
  np.testing.assert_allclose(cover.mean(axis=(1, 2)), [s.mask.mean() for s in scenes], rtol=1e-5)
  touched = (cover > 0).mean(axis=(1, 2))
  assert 0.15 < touched.mean() < 0.45


def test_synthetic_arrays_match_items():
  src = synthetic.SyntheticShapes("calibration", 6, seed=2)
  images, labels_ = src.arrays(progress=False)
  assert images.shape == (6, 224, 224, 3) and labels_.dtype == np.int32
  np.testing.assert_array_equal(images[5], src[5].image)
  assert labels_.tolist() == [src[i].label for i in range(6)]
