"""Never destroy, never lie, never trace back: bad inputs built on the fly.

Each probe checks the exit code, that the message names the problem, and
that nothing outside the intended output changed.
"""

import errno
import hashlib
import json
import os
import struct
import subprocess
import sys
import threading
import zlib

import jax
import numpy as np
import pytest
from PIL import Image

from rcst_edge.errors import OutputRefusedError
from rcst_jax import cli
from rcst_jax.calibration.algorithm1 import calibrate
from rcst_jax.calibration.artifact import CalibrationError
from rcst_jax.core import fileio
from rcst_jax.data import preprocess
from rcst_jax.models import checkpoints, create_model

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ("deit_tiny_patch16_224", dict(embed_dim=16, depth=1, num_heads=2))


def snapshot(root):
  """relative path -> content hash (or 'dir') for everything under root."""
  out = {}
  for dirpath, dirnames, filenames in os.walk(root):
    for d in dirnames:
      out[os.path.relpath(os.path.join(dirpath, d), root)] = "dir"
    for f in filenames:
      p = os.path.join(dirpath, f)
      with open(p, "rb") as fh:
        out[os.path.relpath(p, root)] = hashlib.sha1(fh.read()).hexdigest()
  return out


def run(argv, capsys):
  code = cli.main(argv)
  cap = capsys.readouterr()
  return code, cap.out, cap.err


def tiny_model_dir(path, **meta_changes):
  """A saved tiny DeiT (random variables from the shape template: nothing compiled)."""
  name, arch = TINY
  module = create_model(name, num_classes=3, **arch)
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), np.zeros((1, 224, 224, 3), np.float32))
  rng = np.random.default_rng(0)
  variables = {"params": jax.tree.map(
      lambda s: rng.normal(0, 0.05, s.shape).astype(np.float32), shapes["params"])}
  meta = {"timm_name": name, "num_classes": 3, "input_size": [3, 224, 224], "crop_pct": 1.0,
          "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3,
          "arch_overrides": arch, "class_names": ["a", "b", "c"]}
  return checkpoints.save_model(str(path), variables, {**meta, **meta_changes})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  return tiny_model_dir(tmp_path_factory.mktemp("m") / "tiny")


def png(path, array):
  Image.fromarray(array).save(path)
  return str(path)


def png_header_only(path, width, height):
  """A PNG whose header claims width x height (no pixel data: never decodable)."""
  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(
        ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
  ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
  path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
  return str(path)


# ---------------------------------------------------------------- convert: never destroy


@pytest.fixture
def workdir(tmp_path, monkeypatch):
  """cwd with a 'weights' folder holding the input, an unrelated folder and a file."""
  (tmp_path / "weights").mkdir()
  (tmp_path / "weights" / "w.safetensors").write_bytes(b"junk: refused before it is read")
  (tmp_path / "unrelated").mkdir()
  (tmp_path / "unrelated" / "notes.txt").write_text("precious")
  (tmp_path / "afile").write_text("precious too")
  (tmp_path / "sub").mkdir()
  monkeypatch.chdir(tmp_path / "sub")
  return tmp_path


@pytest.mark.parametrize("out,message", [
    ("../sub", "current directory"),
    ("..", "current directory"),
    ("../weights", "contains the input"),
    ("../unrelated", "not a model directory written by rcst"),
    ("../afile", "not a directory"),
])
def test_convert_overwrite_refuses_what_is_not_ours(workdir, capsys, out, message):
  before = snapshot(workdir)
  code, stdout, err = run(["convert", "--timm", "deit_tiny_patch16_224", "--weights",
                           "../weights/w.safetensors", "--out", out, "--overwrite"], capsys)
  assert code == 2 and message in err and err.startswith("rcst convert: error: refusing")
  assert "Traceback" not in err and stdout == ""
  assert snapshot(workdir) == before  # the junk weights were never even read


def test_convert_without_overwrite_refuses_nonempty(workdir, capsys):
  before = snapshot(workdir)
  code, _, err = run(["convert", "--timm", "deit_tiny_patch16_224", "--weights",
                      "../weights/w.safetensors", "--out", "../unrelated"], capsys)
  assert code == 2 and "not empty" in err
  assert snapshot(workdir) == before


def test_overwrite_replaces_our_model_dir_with_normal_permissions(tmp_path):
  old = os.umask(0o022)
  try:
    path = tiny_model_dir(tmp_path / "m")
    assert checkpoints.is_model_dir(path)
    with pytest.raises(OutputRefusedError, match="not empty"):
      tiny_model_dir(tmp_path / "m")
    model = checkpoints.load_model(path)
    checkpoints.save_model(path, model.variables, {**model.metadata, "crop_pct": 0.5},
                           overwrite=True)
  finally:
    os.umask(old)
  assert checkpoints.read_metadata(path)["crop_pct"] == 0.5
  assert os.stat(path).st_mode & 0o777 == 0o755
  assert sorted(os.listdir(tmp_path)) == ["m"]  # no temporary or old copies left


@pytest.mark.parametrize("argv,message", [
    (["--timm", "resnet50"], "unknown timm model 'resnet50'"),
    (["--timm", "efficientnet_b0.bogus"], "unknown tag 'bogus'"),
    (["--timm", "efficientnet_b0", "--num-classes", "0"], "num_classes must be a positive"),
])
def test_convert_names_bad_model_names(tmp_path, capsys, argv, message):
  code, _, err = run(["convert", *argv, "--out", str(tmp_path / "o")], capsys)
  assert code == 2 and message in err and not (tmp_path / "o").exists()


def test_convert_offline_without_weights_is_named(tmp_path, capsys, monkeypatch):
  timm = pytest.importorskip("timm")

  def offline(*a, **k):
    raise OSError("We couldn't connect to 'https://huggingface.co'")
  monkeypatch.setattr(timm, "create_model", offline)
  code, _, err = run(["convert", "--timm", "deit_tiny_patch16_224", "--out",
                      str(tmp_path / "o")], capsys)
  assert code == 2 and "could not download" in err and "--weights" in err
  assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- convert: integrity


@pytest.fixture(scope="module")
def deit_sd():
  timm = pytest.importorskip("timm")
  model = timm.create_model("deit_tiny_patch16_224", pretrained=False)
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("key,bad,message", [
    ("blocks.0.attn.qkv.weight", lambda v: (v * 100).astype(np.int8),
     "'blocks.0.attn.qkv.weight': expected a floating-point tensor, got dtype int8"),
    ("head.bias", lambda v: np.where(np.arange(v.size) == 3, np.nan, v).astype(np.float32),
     "'head.bias': 1 of 1000 values are not finite (NaN or inf)"),
])
def test_convert_refuses_non_float_or_non_finite(deit_sd, tmp_path, capsys, key, bad, message):
  from safetensors.numpy import save_file
  sd = dict(deit_sd)
  sd[key] = bad(sd[key])
  save_file(sd, str(tmp_path / "w.safetensors"))
  before = snapshot(tmp_path)
  code, _, err = run(["convert", "--timm", "deit_tiny_patch16_224", "--weights",
                      str(tmp_path / "w.safetensors"), "--out", str(tmp_path / "o")], capsys)
  assert code == 2 and message in err
  assert snapshot(tmp_path) == before


def test_convert_refuses_negative_bn_variance(tmp_path, capsys):
  timm = pytest.importorskip("timm")
  from safetensors.numpy import save_file
  sd = {k: v.detach().numpy().copy()
        for k, v in timm.create_model("efficientnet_b0").state_dict().items()}
  sd["bn1.running_var"][5] = -0.25
  save_file(sd, str(tmp_path / "w.safetensors"))
  code, _, err = run(["convert", "--timm", "efficientnet_b0", "--weights",
                      str(tmp_path / "w.safetensors"), "--out", str(tmp_path / "o")], capsys)
  assert code == 2 and "'bn1.running_var': BatchNorm running variance is negative" in err
  assert sorted(os.listdir(tmp_path)) == ["w.safetensors"]


# ---------------------------------------------------------------- checkpoints: never lie


def test_flipped_bit_in_variables_is_detected(tmp_path, capsys):
  path = tiny_model_dir(tmp_path / "m")
  variables = checkpoints.restore_variables(os.path.join(path, "variables"))
  kernel = variables["params"]["head"]["kernel"]
  kernel.view(np.uint32)[0, 0] ^= 1 << 12  # one bit of one weight
  import shutil
  shutil.rmtree(os.path.join(path, "variables"))
  checkpoints.save_variables(os.path.join(path, "variables"), variables)
  img = png(tmp_path / "x.png", np.zeros((224, 224, 3), np.uint8))
  code, out, err = run(["predict", "--model", path, img], capsys)
  assert code == 2 and out == ""
  assert f"{path}: variables do not match the variables_digest" in err


def test_corrupted_checkpoint_file_is_named(tmp_path, capsys):
  path = tiny_model_dir(tmp_path / "m")
  files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(path, "variables"))
           for f in fs]
  biggest = max(files, key=os.path.getsize)
  data = bytearray(open(biggest, "rb").read())
  data[len(data) // 2] ^= 0xFF
  open(biggest, "wb").write(bytes(data))
  code, _, err = run(["predict", "--model", path, str(tmp_path / "x.png")], capsys)
  assert code == 2 and path in err and "Traceback" not in err
  assert "variables do not match the variables_digest" in err or "cannot read orbax" in err


def test_model_without_digest_loads_with_warning(tmp_path):
  path = tiny_model_dir(tmp_path / "m")
  meta_path = os.path.join(path, "metadata.json")
  meta = json.load(open(meta_path))
  del meta["variables_digest"]
  fileio.write_json(meta_path, meta)
  with pytest.warns(checkpoints.IntegrityWarning, match="cannot be checked"):
    checkpoints.load_model(path)


def test_shipped_demo_models_carry_marker_and_digest():
  for name in ("demo_edge", "demo_server", "demo_baseline_edge"):
    meta = checkpoints.read_metadata(os.path.join(REPO, "weights", name))
    assert meta["format"] == checkpoints.FORMAT
    assert meta["variables_digest"].startswith("blake2b:")


@pytest.mark.parametrize("change,message", [
    ({"crop_pct": 0}, "crop_pct must lie in (0, 1], got 0"),
    ({"std": [0, 0, 0]}, "std must be > 0 in every channel"),
    ({"mean": [0.5, 0.5]}, "mean must be 3 finite numbers"),
    ({"class_names": ["a", "b"]}, "class_names has 2 entries but num_classes is 3"),
    ({"interpolation": "magic"}, "unknown interpolation 'magic'"),
    ({"arch_overrides": {**TINY[1], "wings": 2}}, "bad arch_overrides"),
    ({"timm_name": "resnet50"}, "unknown timm_name 'resnet50'"),
])
def test_bad_metadata_is_named(model_dir, tmp_path, capsys, change, message):
  bad = tmp_path / "bad"
  bad.mkdir()
  os.symlink(os.path.join(model_dir, "variables"), bad / "variables")
  meta = {**json.load(open(os.path.join(model_dir, "metadata.json"))), **change}
  (bad / "metadata.json").write_text(json.dumps(meta))
  img = png(tmp_path / "x.png", np.zeros((8, 8, 3), np.uint8))
  code, out, err = run(["predict", "--model", str(bad), img], capsys)
  assert code == 2 and message in err and str(bad) in err and out == ""


# ---------------------------------------------------------------- images


def test_16bit_png_scaled_not_clipped(tmp_path):
  a = np.array([[0, 128, 129, 385, 30000], [32896, 60000, 65406, 65408, 65535]], np.uint16)
  a = np.tile(a, (4, 2))
  path = png(tmp_path / "deep.png", a)
  assert Image.open(path).mode.startswith("I")
  got = np.asarray(preprocess.open_rgb(path))
  hand = np.array([[0, 0, 1, 1, 117], [128, 233, 254, 255, 255]], np.uint8)  # round(v/257)
  np.testing.assert_array_equal(got[..., 0], np.tile(hand, (4, 2)))
  assert (got[..., 0] == got[..., 2]).all()


def test_float_image_outside_unit_range_refused():
  img = Image.fromarray(np.full((4, 4), 3.5, np.float32))
  with pytest.raises(preprocess.BadImageError, match=r"outside \[0, 1\]"):
    preprocess.Preprocess(8, 4)(img)
  ok = preprocess.Preprocess(4, 4)(Image.fromarray(np.full((4, 4), 0.5, np.float32)))
  assert (ok == 128).all()


def test_predict_keeps_order_and_answers_despite_bad_images(model_dir, tmp_path, capsys):
  rng = np.random.default_rng(0)
  files = [png(tmp_path / "a.png", rng.integers(0, 256, (240, 260, 3), np.uint8)),
           png(tmp_path / "thin.png", np.zeros((2, 120, 3), np.uint8)),       # aspect 60
           png_header_only(tmp_path / "huge.png", 9000, 9000),               # 81 Mpixel
           png(tmp_path / "b.png", rng.integers(0, 256, (224, 224), np.uint8)),
           str(tmp_path / "missing.png")]
  code, out, err = run(["predict", "--model", model_dir, "--batch-size", "2", *files], capsys)
  records = [json.loads(line) for line in out.strip().splitlines()]
  assert code == 1 and [r["image"] for r in records] == files
  assert "aspect ratio too extreme" in records[1]["error"]
  assert "image too large (9000x9000" in records[2]["error"]
  assert "missing.png" in records[4]["error"]
  for r in (records[0], records[3]):
    assert [t["label"] for t in r["top5"]] and len(r["top5"]) == 3
  assert "3 of 5 images failed" in err and "Traceback" not in err


# ---------------------------------------------------------------- error boundary


@pytest.mark.parametrize("exc,code,message", [
    (KeyboardInterrupt(), 130, "rcst convert: interrupted; rerun to resume"),
    (OSError(errno.ENOSPC, "No space left on device", "/out/m"), 2,
     "rcst convert: error: No space left on device: /out/m"),
    (PermissionError(errno.EACCES, "Permission denied", "/root/x"), 2,
     "rcst convert: error: Permission denied: /root/x"),
])
def test_error_boundary(monkeypatch, capsys, exc, code, message):
  import rcst_jax.models.convert

  def fail(*a, **k):
    raise exc
  monkeypatch.setattr(rcst_jax.models.convert, "convert", fail)  # cli imports it when run
  got, _, err = run(["convert", "--timm", "efficientnet_b0", "--out", "x"], capsys)
  assert got == code and message in err and "Traceback" not in err


def test_bugs_keep_their_traceback(monkeypatch):
  import rcst_jax.models.convert
  monkeypatch.setattr(rcst_jax.models.convert, "convert", lambda *a, **k: 1 / 0)
  with pytest.raises(ZeroDivisionError):
    cli.main(["convert", "--timm", "efficientnet_b0", "--out", "x"])


@pytest.mark.parametrize("B", [0.5, 0.0, -1.0, float("nan"), float("inf")])
def test_calibrate_refuses_bad_loss_bound(B):
  p = np.full((20, 2), 0.5, np.float32)
  with pytest.raises(CalibrationError, match="B \\(the loss bound\\)"):
    calibrate(p, np.zeros(20, np.int64), 0.1, 0.1, B=B)


# ---------------------------------------------------------------- concurrent writers

WRITER = """
import sys
from rcst_jax.core.fileio import atomic_write_text
path, tag = sys.argv[1], sys.argv[2]
for i in range(150):
  atomic_write_text(path, (tag * 1000 + "\\n") * 40 + "end\\n")
"""


def test_two_writers_never_expose_a_partial_file(tmp_path):
  path = tmp_path / "shared.txt"
  whole = {(t * 1000 + "\n") * 40 + "end\n" for t in "AB"}
  fileio.atomic_write_text(str(path), next(iter(whole)))
  env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
  writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), t], env=env)
             for t in "AB"]
  seen, bad = 0, []

  def read():
    nonlocal seen
    while any(w.poll() is None for w in writers):
      text = path.read_text()
      seen += 1
      if text not in whole:
        bad.append(len(text))
  reader = threading.Thread(target=read)
  reader.start()
  reader.join(60)
  assert [w.wait(60) for w in writers] == [0, 0]
  assert not bad and seen > 0
  assert path.read_text() in whole
  assert os.listdir(tmp_path) == ["shared.txt"]  # no temporary files left behind
