"""Never publish a stale or tampered number: data identity by content, the cache
manifest, the published calibration, and output directories that respect the
user's files."""

import hashlib
import io
import json
import os

import numpy as np
import pytest
import small_models
from PIL import Image

from rcst_edge import errors
from rcst_edge import seal as seal_lib
from rcst_edge.errors import ConfigError, OutputRefusedError
from rcst_jax import cli
from rcst_jax.calibration import algorithm1, certificate
from rcst_jax.calibration.artifact import Calibration, CalibrationError
from rcst_jax.cli import parse_config
from rcst_jax.core import fileio
from rcst_jax.data.folder import ImageFolder
from rcst_jax.data.imagenet import calibration_test_split
from rcst_jax.data.sources import UnreadableImagesError, load_sources, run_transform
from rcst_jax.jobs import evaluate
from rcst_jax.models.loading import Models
from rcst_jax.sweep import cache, engine

CLASSES = ("ant", "bee", "cat")


@pytest.fixture(scope="module")
def models12():
  return Models(small_models.edge(), small_models.server(), small_models.baseline())


def _png(seed: int) -> bytes:
  rng = np.random.default_rng(seed)
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (40, 40, 3), np.uint8)).save(buf, "PNG")
  return buf.getvalue()


def _folder(root, per_class=6):
  for c, name in enumerate(CLASSES):
    os.makedirs(root / name, exist_ok=True)
    for i in range(per_class):
      (root / name / f"{i}.png").write_bytes(_png(100 * c + i))
  (root / "labels.txt").write_text("".join(f"{n}\n" for n in CLASSES))
  return root


def _config(tmp_path, data, *overrides):
  return parse_config("imagenet:smoke", [
      f"--config.output_dir={tmp_path / 'out'}", "--config.data.name=folder",
      f"--config.data.folder_root={data}", f"--config.data.label_map={data / 'labels.txt'}",
      "--config.data.n_cal=8", "--config.chunk_size=4", "--config.gallery_size=0",
      "--config.progress=False", *overrides])


def _run(config, models):
  transform = run_transform(models.edge.metadata)
  ev = engine.Sweep(config, models, load_sources(config, transform), config.output_dir,
                    transform, progress=False)
  return ev, ev.run()


def _replace_keeping_mtime(path, data: bytes):
  st = os.stat(path)
  with open(path, "wb") as f:
    f.write(data)
  os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same name, same mtime


def _accuracies(res):
  return [(p["method"], p["param"], p["accuracy"]) for p in res["points"]]


def test_changed_image_or_label_map_recomputes_what_it_touches(tmp_path, models12, monkeypatch):
  data = _folder(tmp_path / "data")
  config = _config(tmp_path, data)
  ev, first = _run(config, models12)
  assert first["chunks_computed"] == 3
  _, again = _run(config, models12)
  assert again["chunks_computed"] == 0 and _accuracies(again) == _accuracies(first)

  # One test image's bytes change under the same name and mtime: its chunk only.
  i = int(ev.sources.test_indices[5])  # chunk 1 of 4-image chunks
  rel, _ = ev.sources.test_source.items[i]
  _replace_keeping_mtime(data / rel, _png(999))
  calls = []
  real = algorithm1.algorithm1
  monkeypatch.setattr(algorithm1, "algorithm1", lambda *a, **k: calls.append(1) or real(*a, **k))
  ev2, changed = _run(config, models12)
  assert changed["chunks_computed"] == 1 and not calls  # calibration images unchanged
  assert ev2.fp == ev.fp  # same config and file names: the content tells them apart

  # A calibration image changes: Algorithm 1 reruns.
  j = int(ev.sources.cal_indices[0])
  _replace_keeping_mtime(data / ev.sources.cal_source.items[j][0], _png(998))
  _run(config, models12)
  assert calls == [1]

  # Two label-map lines swapped in place: every label moves, everything reruns.
  (data / "labels.txt").write_text("bee\nant\ncat\n")
  _, relabelled = _run(config, models12)
  assert relabelled["chunks_computed"] == 3 and calls == [1, 1]


def test_tampered_chunk_and_calibration_are_reported_and_recomputed(tmp_path, models12):
  data = _folder(tmp_path / "data")
  config = _config(tmp_path, data, "--config.alpha_crc=0.3")
  ev, clean = _run(config, models12)
  assert clean["calibration"].lambda_valid  # so an edited lambda_hat is still a valid file
  # A chunk rewritten as a valid npz with other predictions.
  path = ev.store.chunk_path(0)
  with np.load(path) as z:
    arrays = {k: z[k] for k in z.files}
  arrays["pred"] = (arrays["pred"] + 1) % 12
  np.savez(path, **arrays)
  # The cached lambda_hat edited by hand (still a valid artifact).
  cal_path = ev.store.calibration_path()
  d = json.load(open(cal_path))
  d["lambda_hat"] = 0.0 if d["lambda_hat"] != 0.0 else 0.5
  Calibration.unsealed(d)  # valid values: the seal names the edit, the manifest too
  with pytest.raises(CalibrationError, match=r"per its seal: lambda_hat \(changed\)"):
    Calibration.from_dict(d)
  with open(cal_path, "w") as f:
    json.dump(d, f, indent=2)
  with pytest.warns(UserWarning, match="does not match its manifest") as record:
    ev2, again = _run(config, models12)
  assert {str(w.message).split()[1] for w in record
          if "manifest" in str(w.message)} >= {"chunk", "calibration"}
  # The recomputed calibration is byte-identical to the first, so only the
  # tampered chunk reruns.
  assert again["chunks_computed"] == 1
  assert _accuracies(again) == _accuracies(clean)
  assert again["calibration"].lambda_hat == clean["calibration"].lambda_hat


def test_published_calibration_is_the_cached_one(tmp_path, models12):
  data = _folder(tmp_path / "data")
  config = _config(tmp_path, data, "--config.certify.enabled=True",
                   "--config.certify.epsilon=0.9")
  out = evaluate.evaluate_config(config, models=models12)
  published = open(out["paths"]["calibration"], "rb").read()
  sha = hashlib.sha256(published).hexdigest()
  store_dir = os.path.join(config.output_dir, "cache", out["result"]["fingerprint"])
  manifest = json.load(open(os.path.join(store_dir, "manifest.json")))
  cert_entries = [k for k in manifest if k.startswith("certified_") and
                  k.endswith("calibration.json")]
  assert [manifest[k]["sha256"] for k in cert_entries] == [sha]
  assert json.load(open(os.path.join(config.output_dir, "summary.json")))[
      "calibration_sha256"] == sha
  assert json.loads(published)["certificate"]["certified"] is not None


def test_a_foreign_results_csv_is_never_replaced(tmp_path, capsys):
  out = tmp_path / "mine"
  out.mkdir()
  (out / "results.csv").write_text("my own numbers\n")
  (out / "table1.md").write_text("my table\n")
  before = {p: p.read_bytes() for p in out.iterdir()}
  for extra in ([], ["--overwrite"]):
    code = cli.main(["evaluate", "--config", "demo:smoke", f"--config.output_dir={out}", *extra])
    err = capsys.readouterr().err
    assert code == 2 and "not created by rcst" in err and str(out) in err
  assert {p: p.read_bytes() for p in out.iterdir()} == before


def test_rcst_outputs_edited_since_need_overwrite(tmp_path):
  d = fileio.OutputDir(tmp_path / "run").claim(["results.csv", "table1.md"])
  for name in ("results.csv", "table1.md"):
    (tmp_path / "run" / name).write_text("rcst wrote this\n")
    d.record(str(tmp_path / "run" / name))
  fileio.OutputDir(tmp_path / "run").claim(["results.csv", "table1.md"])  # a rerun: fine
  (tmp_path / "run" / "table1.md").write_text("edited by hand\n")
  with pytest.raises(OutputRefusedError, match="table1.md changed since rcst wrote it"):
    fileio.OutputDir(tmp_path / "run").claim(["results.csv", "table1.md"])
  fileio.OutputDir(tmp_path / "run").claim(["results.csv", "table1.md"], overwrite=True)
  # A user's file at an output name rcst never wrote there: refused even with --overwrite.
  (tmp_path / "run" / "per_image.csv").write_text("mine\n")
  with pytest.raises(OutputRefusedError, match="per_image.csv was not written by rcst"):
    fileio.OutputDir(tmp_path / "run").claim(["per_image.csv"], overwrite=True)
  # Pending (claimed, interrupted before the write was recorded) counts as rcst's.
  fileio.OutputDir(tmp_path / "run").claim(["gallery.png"])
  (tmp_path / "run" / "gallery.png").write_bytes(b"half")
  fileio.OutputDir(tmp_path / "run").claim(["gallery.png"])


def test_calibrate_out_replaces_only_an_rcst_calibration(tmp_path, capsys):
  foreign = tmp_path / "notes.json"
  foreign.write_text('{"mine": 1}\n')
  code = cli.main(["calibrate", "--config", "demo:smoke", "--out", str(foreign),
                   "--overwrite", f"--config.output_dir={tmp_path / 'o'}"])
  assert code == 2 and "not an rcst calibration file" in capsys.readouterr().err
  assert foreign.read_text() == '{"mine": 1}\n'


def test_n_cal_beyond_the_data_is_refused(tmp_path, models12):
  data = _folder(tmp_path / "data", per_class=2)
  config = _config(tmp_path, data, "--config.data.n_cal=100")
  with pytest.raises(ConfigError, match=r"data.n_cal=100 leaves no test image: folder has 6 "
                                        r"images; use data.n_cal <= 5"):
    load_sources(config, run_transform(models12.edge.metadata))


def test_labels_beyond_the_models_classes_are_refused_before_any_model_runs(
    tmp_path, models12, monkeypatch):
  data = _folder(tmp_path / "data")
  (data / "labels.txt").write_text("ant 0\nbee 1\ncat 40\n")
  config = _config(tmp_path, data)
  monkeypatch.setattr(algorithm1, "algorithm1", lambda *a, **k: pytest.fail("a model ran"))
  with pytest.raises(ConfigError, match="class indices up to 40, but the edge model has 12"):
    evaluate.evaluate_config(config, models=models12)


def test_calibrate_verify_recomputes_the_artifact(demo_smoke, capsys, tmp_path):
  out, _ = demo_smoke
  published = out / "calibration.json"
  argv = ["calibrate", "--config", "demo:smoke", f"--config.output_dir={out}", "--verify"]
  assert cli.main(argv + [str(published)]) == 0
  assert json.loads(capsys.readouterr().out)["verified"] is True
  # A forgery the load-time checks cannot see (digest resealed, values in range).
  d = json.load(open(published))
  d["certificate"]["q_hat"] = float(d["certificate"]["q_hat"]) * 0.5
  d["certificate"] = certificate.seal(d["certificate"])
  d["seal"] = seal_lib.make(d)  # the whole file resealed too
  forged = tmp_path / "forged.json"
  forged.write_text(json.dumps(d))
  Calibration.from_json(forged)
  assert cli.main(argv + [str(forged)]) == 2
  err = capsys.readouterr().err
  assert "does not match its recomputation" in err and "certificate.q_hat" in err


def _snapshot(root):
  return {p: (os.readlink(p) if os.path.islink(p) else
              open(p, "rb").read() if os.path.isfile(p) else None)
          for p in (os.path.join(d, n) for d, ds, fs in os.walk(root) for n in ds + fs)}


@pytest.mark.parametrize("where, target", [
    ("cache", ""), ("cache/FP", ""), ("cache/outcomes", ""),
    ("cache/FP/manifest.json", "manifest.json"), ("cache/FP/.manifest.lock", "notes.txt"),
    ("cache/outcomes/manifest.json", "manifest.json"), ("cache/FP/calibration.json", "notes.txt"),
    ("cache/file_digests.json", "notes.txt")])
def test_a_cache_never_follows_a_link_out_of_its_directory(tmp_path, models12, monkeypatch,
                                                           where, target):
  """A link anywhere in the cache (here into a user's directory, whose manifest.json
  looks like one) is refused with a CacheLinkError naming it before any model runs,
  and the user's files stay as they were: rcst writes nothing outside its output
  directory."""
  data = _folder(tmp_path / "data", per_class=4)
  config = _config(tmp_path, data)
  fileio.OutputDir(config.output_dir).claim([])  # an earlier run's output directory
  transform = run_transform(models12.edge.metadata)
  fp = cache.fingerprint(config, models12, load_sources(config, transform))
  user = tmp_path / "user"
  user.mkdir()
  (user / "manifest.json").write_text('{"my": "own manifest"}\n')
  (user / "notes.txt").write_text("mine\n")
  link = os.path.join(config.output_dir, where.replace("FP", fp))
  os.makedirs(os.path.dirname(link), exist_ok=True)
  os.symlink(user / target, link)
  monkeypatch.setattr(algorithm1, "algorithm1", lambda *a, **k: pytest.fail("a model ran"))
  before = _snapshot(user)
  with pytest.raises(cache.CacheLinkError) as e:
    evaluate.evaluate_config(config, models=models12)
  assert f"{link} is a symbolic link" in str(e.value) and errors.is_expected(e.value)
  assert _snapshot(user) == before
  assert os.path.islink(link)


def test_a_folder_of_unreadable_images_is_named_before_any_model_runs(tmp_path, models12,
                                                                      monkeypatch):
  data = _folder(tmp_path / "data", per_class=4)
  files = sorted(p for p in data.rglob("*.png"))
  for p in files:
    p.write_bytes(b"not an image")
  config = _config(tmp_path, data)
  monkeypatch.setattr(algorithm1, "algorithm1", lambda *a, **k: pytest.fail("a model ran"))
  before = _snapshot(data)
  with pytest.raises(UnreadableImagesError, match=(
      rf"data.folder_root={data}: all 12 images are unreadable \(e.g. cannot decode "
      r"image .*\.png.*\); nothing to run on")) as e:
    evaluate.evaluate_config(config, models=models12)
  assert errors.is_expected(e.value) and _snapshot(data) == before
  # One good test image: the calibration images are named, with their count.
  split = calibration_test_split(12, 8, config.data.split_seed)
  good = ImageFolder(data).items[int(split.test_idx[0])][0]
  (data / good).write_bytes(_png(7))
  with pytest.raises(UnreadableImagesError, match=r": all 8 calibration images are unreadable "
                                                  r"\(e.g. cannot decode "):
    evaluate.evaluate_config(config, models=models12)
