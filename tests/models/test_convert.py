"""`rcst convert` / `rcst predict` / orbax round trip, on random-init timm models."""

import json
import os
import pickle

import jax
import numpy as np
import pytest
import torch
from conftest import max_rel_err, randomize_batchnorm
from PIL import Image

from rcst_jax import cli
from rcst_jax.models import checkpoints
from rcst_jax.models.state_dict import ConversionError, load_state_dict

timm = pytest.importorskip("timm")


@pytest.fixture(scope="module")
def effnet_weights(tmp_path_factory):
  torch.manual_seed(0)
  model = randomize_batchnorm(timm.create_model("efficientnet_b0", pretrained=False)).eval()
  path = tmp_path_factory.mktemp("w") / "effnet_b0.safetensors"
  from safetensors.torch import save_file
  save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
  return model, path


def _images(n, size=224, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_convert_cli_matches_timm(effnet_weights, tmp_path):
  model, weights = effnet_weights
  out = tmp_path / "b0"
  assert cli.main(["convert", "--timm", "efficientnet_b0.ra_in1k",
                   "--weights", str(weights), "--out", str(out)]) == 0
  meta = json.loads((out / "metadata.json").read_text())
  assert meta["timm_name"] == "efficientnet_b0" and meta["tag"] == "ra_in1k"
  assert meta["num_classes"] == 1000 and meta["interpolation"] == "bicubic"
  loaded = checkpoints.load_model(str(out))
  # On the device once: numpy leaves would be copied in by every jitted call.
  assert all(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(loaded.variables))
  images = _images(2)
  with jax.default_matmul_precision("highest"):
    logits, _ = loaded(images)
  x = (torch.from_numpy(images).float() / 255 - torch.tensor(meta["mean"])) / torch.tensor(meta["std"])
  with torch.no_grad():
    ref = model(x.permute(0, 3, 1, 2)).numpy()
  assert max_rel_err(logits, ref) <= 1e-4


def test_torch_file_loaded_with_weights_only(effnet_weights, tmp_path):
  model, _ = effnet_weights
  path = tmp_path / "sd.pth"
  torch.save({"state_dict": model.state_dict()}, path)  # a common wrapper
  sd = load_state_dict(path)
  assert set(sd) == set(model.state_dict())


class _Evil:
  def __reduce__(self):
    return (os.system, ("echo pwned > /dev/null",))


def test_refuses_arbitrary_pickle(tmp_path):
  path = tmp_path / "evil.pth"
  with open(path, "wb") as f:
    pickle.dump({"w": _Evil()}, f)
  with pytest.raises(ConversionError, match="weights_only"):
    load_state_dict(path)


def test_refuses_non_state_dict(tmp_path):
  path = tmp_path / "list.pth"
  torch.save([torch.zeros(3)], path)
  with pytest.raises(ConversionError, match="not a state dict"):
    load_state_dict(path)
  bad = tmp_path / "junk.safetensors"
  bad.write_bytes(b"not a safetensors file")
  with pytest.raises(ConversionError, match="safetensors"):
    load_state_dict(bad)


@pytest.mark.parametrize("mutation,message", [
    ("drop", "missing key in checkpoint: 'blocks.1.0.conv_dw.weight'"),
    ("extra", "unexpected keys in checkpoint: 'blocks.9.extra'"),
    ("shape", "shape mismatch for 'classifier.weight'"),
])
def test_convert_refuses_and_leaves_nothing(effnet_weights, tmp_path, capsys, mutation, message):
  model, _ = effnet_weights
  sd = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
  if mutation == "drop":
    del sd["blocks.1.0.conv_dw.weight"]
  elif mutation == "extra":
    sd["blocks.9.extra"] = torch.zeros(2)
  else:
    sd["classifier.weight"] = torch.zeros(10, 1280)
  from safetensors.torch import save_file
  weights = tmp_path / "bad.safetensors"
  save_file(sd, str(weights))
  out = tmp_path / "out"
  assert cli.main(["convert", "--timm", "efficientnet_b0", "--weights", str(weights),
                   "--out", str(out)]) == 2
  assert message in capsys.readouterr().err
  assert not out.exists()
  assert [p for p in os.listdir(tmp_path) if p.startswith(".tmp")] == []


def test_orbax_round_trip_identical(tmp_path):
  rng = np.random.default_rng(1)
  tree = {"params": {"a": {"kernel": rng.normal(size=(3, 4)).astype(np.float32)},
                     "b": rng.normal(size=(7,)).astype(np.float32)},
          "batch_stats": {"m": rng.normal(size=(2, 2)).astype(np.float32)}}
  checkpoints.save_variables(str(tmp_path / "v"), tree)
  back = checkpoints.restore_variables(str(tmp_path / "v"))
  flat_a = jax.tree_util.tree_leaves_with_path(tree)
  flat_b = dict(jax.tree_util.tree_leaves_with_path(back))
  assert len(flat_a) == len(flat_b)
  for path, leaf in flat_a:
    np.testing.assert_array_equal(np.asarray(flat_b[path]), leaf)


def test_load_model_rejects_checkpoint_that_does_not_fit(effnet_weights, tmp_path):
  _, weights = effnet_weights
  out = tmp_path / "b0"
  assert cli.main(["convert", "--timm", "efficientnet_b0", "--weights", str(weights),
                   "--out", str(out)]) == 0
  meta = json.loads((out / "metadata.json").read_text())
  meta["num_classes"] = 10
  meta["label_set"] = None  # else the metadata check refuses first (imagenet1k needs 1000)
  (out / "metadata.json").write_text(json.dumps(meta))
  with pytest.raises(checkpoints.CheckpointError, match="does not fit"):
    checkpoints.load_model(str(out))


def test_predict_cli_per_file_errors(effnet_weights, tmp_path, capsys):
  _, weights = effnet_weights
  out = tmp_path / "b0"
  assert cli.main(["convert", "--timm", "efficientnet_b0", "--weights", str(weights),
                   "--out", str(out)]) == 0
  capsys.readouterr()
  rgb = tmp_path / "rgb.png"
  Image.fromarray(_images(1, 300)[0]).save(rgb)
  gray = tmp_path / "gray.jpg"
  Image.fromarray(_images(1, 260)[0][..., 0]).save(gray)
  cmyk = tmp_path / "cmyk.jpg"
  Image.fromarray(_images(1, 240)[0]).convert("CMYK").save(cmyk)
  broken = tmp_path / "broken.jpg"
  broken.write_bytes(b"\xff\xd8 definitely not a jpeg")
  files = [str(rgb), str(broken), str(gray), str(cmyk)]
  assert cli.main(["predict", "--model", str(out), *files]) == 1  # some items failed
  lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
  assert [r["image"] for r in lines] == files
  assert "error" in lines[1] and "broken.jpg" in lines[1]["error"]
  for r in (lines[0], lines[2], lines[3]):
    top = r["top5"]
    assert len(top) == 5 and all(0 <= t["index"] < 1000 for t in top)
    probs = [t["prob"] for t in top]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    assert all(isinstance(t["label"], str) and t["label"] for t in top)
