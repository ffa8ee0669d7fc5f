"""Inputs a new user hands over: odd file names, label maps, config files.

Each probe checks what the user is told (exit code, one-line message naming
the file and the problem) or that the run goes through and its outputs stay
readable. Grid ranges are probed in test_config_schema.py.
"""

import codecs as std_codecs
import csv
import json
import os
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from test_reliability import run

from rcst_edge.errors import ConfigError
from rcst_edge.payload import codecs
from rcst_edge.payload.geometry import Geometry
from rcst_jax.data import folder
from rcst_jax.inference import methods, selection
from rcst_jax.report import outputs
from rcst_jax.sweep import metrics

# File names as a file system may hold them: not UTF-8, a backslash, UTF-8.
ODD = (b"x_\xff.png", b"y_\xfe\\z.png", "caf\u00e9.png".encode())


def _key_bytes(text: str) -> bytes:
  """The raw bytes of a key written by metrics.key_text (\\xNN and \\\\ escapes undone)."""
  return std_codecs.escape_decode(text.encode("utf-8"))[0]


def _folder(root, classes=(b"a", b"b"), names=ODD):
  """root/<class>/<name> for raw byte names; returns the relative paths as bytes."""
  rng, rels = np.random.default_rng(0), []
  for c in classes:
    os.makedirs(os.path.join(os.fsencode(root), c))
    for name in names:
      path = os.path.join(os.fsencode(root), c, name)
      Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8)).save(os.fsdecode(path))
      rels.append(c + b"/" + name)
  return rels


# ---------------------------------------------------------------- file names that are not UTF-8


def _ranks_before(keys, seed, n):
  """random_ranks as it was (crc32 of the UTF-8 key): ordinary names must keep their ranks."""
  ids = jnp.asarray([zlib.crc32(k.encode()) for k in keys], jnp.uint32)
  key = jax.random.PRNGKey(seed)
  perm = jax.vmap(lambda i: jax.random.permutation(jax.random.fold_in(key, i), n))(ids)
  return np.asarray(jnp.argsort(perm, axis=-1))


def test_random_ranks_seed_from_the_raw_bytes_of_a_name():
  plain = ["cat/0.png", "n01440764/ILSVRC2012_val_00000293.JPEG", "caf\u00e9/\u00fc.png"]
  np.testing.assert_array_equal(selection.random_ranks(plain, 3, 196), _ranks_before(plain, 3, 196))
  odd = os.fsdecode(b"a/" + ODD[0])  # how os.listdir gives an undecodable name
  got = selection.random_ranks([odd, b"a/" + ODD[0], "a/x_.png"], 3, 196)
  np.testing.assert_array_equal(got[0], got[1])
  assert sorted(got[0]) == list(range(196)) and (got[0] != got[2]).any()


@pytest.mark.parametrize("raw,text", [
    (b"cat/0.png", "cat/0.png"),
    ("caf\u00e9.png".encode(), "caf\u00e9.png"),           # UTF-8 stays as it is
    (b"a/x_\xff.png", "a/x_\\xff.png"),                     # undecodable: \xNN
    (b"a\\xff", "a\\\\xff"),                                # a literal backslash is doubled
    (b"y_\xfe\\z", "y_\\xfe\\\\z"),
])
def test_key_text_is_readable_and_reversible(raw, text):
  assert metrics.key_text(os.fsdecode(raw)) == text
  assert metrics.key_text(raw) == text
  assert _key_bytes(text) == raw


def test_per_image_csv_takes_undecodable_names(tmp_path):
  keys = [os.fsdecode(b"a/" + n) for n in ODD]
  n = len(keys)
  arrays = {"labels": np.arange(n), "keys": np.asarray(keys, str),
            "offloaded": np.ones((2, n), bool), "kept": np.full((2, n), 5),
            "server_pred": np.zeros((2, n), int), "pred": np.zeros((2, n), int),
            "codec_server_pred": np.zeros((1, 2, n), int), "codec_pred": np.zeros((1, 2, n), int),
            "codec_bytes": np.full((1, 2, n), 3858),
            "edge_pred": np.zeros(n, int), "edge_p_max": np.full(n, 0.5),
            "base_pred": np.zeros(n, int), "base_p_max": np.full(n, 0.5)}
  points = [(methods.PROPOSED, 0.5), (methods.RANDOM, 5)]
  path = outputs.write_per_image(str(tmp_path / "per_image.csv"), arrays, points, Geometry(),
                                 (codecs.RAW,))
  with open(path, newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  assert [_key_bytes(r["key"]) for r in rows] == [b"a/" + n for n in ODD] * 2


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:CRC cannot control the risk")  # 2 calibration images
def test_folder_with_undecodable_names_evaluates_end_to_end(tmp_path, capsys):
  rels = _folder(tmp_path / "data")
  out = tmp_path / "out"
  argv = ["evaluate", "--config", "demo:smoke", "--config.data.name=folder",
          f"--config.data.folder_root={tmp_path / 'data'}", "--config.data.n_cal=2",
          "--config.per_image=True", f"--config.output_dir={out}", "--config.gallery_size=0",
          "--config.certify.enabled=False", "--config.tau_grid=(0.5,)", "--config.k_grid=(20,)",
          "--config.delta_sum_grid=(0.6,)", "--config.batch_size=4",
          "--config.server_batch=4", "--config.chunk_size=4", "--config.devices=1"]
  for computed in (1, 0):  # the second run reads the keys back from the cached chunks
    code, _, err = run(argv, capsys)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["chunks_computed"] == computed
    with open(out / "per_image.csv", newline="", encoding="utf-8") as f:
      rows = list(csv.DictReader(f))
    got = {_key_bytes(r["key"]) for r in rows}
    assert len(got) == len(rels) - 2 and got <= set(rels)
    assert {r["method"] for r in rows} >= {"random", "proposed"}
    json.loads((out / "results.json").read_text(encoding="utf-8"))


# ---------------------------------------------------------------- label maps


@pytest.mark.parametrize("name,text,message", [
    ("map.json", '{"a": 0, "b": 1, "a": 2}',
     "folder name 'a' is given twice (class 0 and class 2)"),
    ("map.json", '{"a": 0, "b": 0}', "class index 0 is given to both 'a' and 'b'"),
    ("map.txt", "a 3\nb 3\n", "class index 3 is given to both 'a' and 'b'"),
    ("map.txt", "a\nb\na\n", "folder name 'a' is given twice"),
    ("map.txt", "a 1\na 2\n", "folder name 'a' is given twice (class 1 and class 2)"),
    ("map.json", '{"a": {}}', "not a label map (class index [] is not an integer)"),
    ("map.json", '{"a": null}', "not a label map (class index None is not an integer)"),
    ("map.json", '[["a", 0]]', "not a label map (expected an object, got list)"),
    ("map.txt", "\n\n", "the label map names no folder"),
])
def test_bad_label_map_is_refused_naming_file_and_key(tmp_path, name, text, message):
  path = tmp_path / name
  path.write_text(text)
  with pytest.raises(ConfigError) as e:
    folder.read_label_map(path)
  assert str(e.value).startswith(f"{path}: ") and message in str(e.value)


def test_text_label_map_names_a_folder_that_is_not_utf8(tmp_path):
  _folder(tmp_path / "data", classes=(b"n\xff", b"ok"), names=(b"0.png",))
  (tmp_path / "map.txt").write_bytes(b"n\xff 4\nok 2\n")
  source = folder.ImageFolder(tmp_path / "data", str(tmp_path / "map.txt"))
  assert sorted(label for _, label in source.items) == [2, 4]


# ---------------------------------------------------------------- config files


@pytest.mark.parametrize("body,message", [
    ("def get_config():\n  raise RuntimeError('boom')\n",
     "get_config() raised RuntimeError: boom (line 2)"),
    ("def get_config(:\n  pass\n", "syntax error at line 1: "),
    ("x = 1\n", "defines no get_config() function"),
    ("def get_config():\n  return None\n",
     "get_config() returned None (is a return statement missing?), not an ml_collections "
     "ConfigDict"),
    ("def get_config():\n  return {'a': 1}\n",
     "get_config() returned a dict, not an ml_collections"),
    ("import no_such_module_rcst\n", "ModuleNotFoundError while loading: No module named "
     "'no_such_module_rcst' (line 1)"),
])
def test_broken_config_file_is_one_line_naming_it(tmp_path, capsys, body, message):
  path = tmp_path / "my_config.py"
  path.write_text(body)
  code, out, err = run(["evaluate", "--config", str(path)], capsys)
  assert code == 2 and out == "", err
  assert err.startswith(f"rcst evaluate: error: config {path}: ") and message in err, err
  assert "Traceback" not in err and err.count("\n") == 1


def test_refused_variant_names_the_config(capsys):
  code, _, err = run(["evaluate", "--config", "demo:bogus"], capsys)
  assert code == 2 and err.count("\n") == 1
  assert err.startswith("rcst evaluate: error: config demo: get_config('bogus') raised ")
  assert "unknown config variant 'bogus'" in err
