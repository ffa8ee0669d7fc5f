"""The whole-file seal of calibration.json: every edited field is named on load, a file
without a seal is refused, and `rcst calibrate --reseal` vouches for a deliberate edit
(recorded, and warned about by `rcst run`)."""

import json
import os
import re
import warnings

import pytest
from PIL import Image

from rcst_edge import seal as seal_lib
from rcst_edge.errors import OutputRefusedError
from rcst_jax import cli
from rcst_jax.calibration import certificate
from rcst_jax.calibration.artifact import (
  Calibration,
  CalibrationError,
  CalibrationSealError,
  ResealedWarning,
)
from rcst_jax.data.synthetic import SyntheticShapes
from rcst_jax.jobs.calibrate import check_calibration_out
from rcst_jax.sweep import cache

WEIGHTS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "weights")
CERT = certificate.seal({
    "certified": True, "lambda_hat": 0.6, "tau": 0.4, "q_hat": 0.8,
    "risks": ["accuracy_drop"], "levels": {"accuracy_drop": 0.02}, "epsilon": 0.02,
    "delta": 0.1, "test": "exact", "multiple_testing": "pareto", "cost": "patches",
    "n_fit": 60, "n_test": 140, "split": 0.3, "split_seed": 0, "order_seed": 1, "p_value": 0.01,
    "lambda_grid": [0.6, 1.01], "tau_grid": [0.0, 0.4], "grid_size": 4, "certified_count": 2,
    "cost_calibration": 0.5, "codec": "raw", "codec_grid": ["raw"]})


def _calibration(**kw):
  base = dict(lambda_hat=0.5238, q_hat=0.95, alpha_crc=0.05, alpha_aps=0.05, n=200,
              lambda_valid=True, edge_model="efficientnet_b0", dataset="synthetic",
              gradcam_layer="features", edge_digest="blake2b:00", server_digest="blake2b:11",
              transform={"resize_size": 224, "crop_size": 224, "interpolation": "bicubic"},
              geometry={"image_size": 224, "patch": 16, "channels": 3}, certificate=CERT)
  return Calibration(**{**base, **kw})


def _write(path, d) -> str:
  path.write_text(json.dumps(d, indent=2) + "\n")
  return str(path)


@pytest.fixture
def written(tmp_path):
  path = tmp_path / "calibration.json"
  _calibration().to_json(path)
  return path


def _seal_error(path) -> CalibrationSealError:
  with pytest.raises(CalibrationSealError) as e:
    Calibration.from_json(path)
  assert str(path) in str(e.value)
  return e.value


def test_the_seal_covers_every_field_and_round_trips(written):
  d = json.loads(written.read_text())
  assert list(d)[-1] == "seal" and "resealed" not in d  # written only once resealed
  assert sorted(d["seal"]["fields"]) == sorted(k for k in d if k != "seal")
  assert Calibration.from_json(written) == _calibration()


@pytest.mark.parametrize("edit", [
    {"lambda_hat": 0.05},   # the probe: 4 of 4 images accepted on the edge instead of 3
    {"q_hat": 0.5}, {"alpha_crc": 0.2}, {"alpha_aps": 0.2}, {"B": 2.0}, {"n": 5000},
    {"gradcam_layer": "conv_head"}, {"edge_digest": "blake2b:ff"}, {"server_digest": None},
    {"transform": {"resize_size": 256, "crop_size": 224, "interpolation": "bicubic"}},
    {"transform": {"resize_size": 384, "crop_size": 384, "interpolation": "bicubic"},
     "geometry": {"image_size": 384, "patch": 16, "channels": 3}},
    {"certificate": None},
    {"certificate": certificate.seal({**CERT, "lambda_hat": 1.01})},  # its digest redone
    {"dataset": "imagenet2012"},
])
def test_load_names_each_edited_field(written, edit):
  d = {**json.loads(written.read_text()), **edit}
  Calibration.unsealed(d)  # a valid calibration: only the seal can tell
  err = _seal_error(_write(written, d))
  assert sorted(err.fields) == sorted(edit)
  assert re.search("edited since rcst wrote it, per its seal: " + ", ".join(
      f"{k} \\(changed\\)" for k in sorted(edit)), str(err))
  assert f"rcst calibrate --reseal {written}" in str(err)


def test_added_removed_and_seal_edits_are_named(written):
  d = json.loads(written.read_text())
  removed = {k: v for k, v in d.items() if k != "edge_digest"}
  assert _seal_error(_write(written, removed)).fields == ["edge_digest"]
  assert "edge_digest (removed)" in str(_seal_error(written))
  # The seal's own entries edited, the fields as sealed.
  forged = {**d, "seal": {**d["seal"], "fields": {**d["seal"]["fields"], "n": "0" * 16}}}
  assert _seal_error(_write(written, forged)).fields == ["seal"]
  forged = {**d, "seal": {**d["seal"], "digest": "0" * 64}}
  assert _seal_error(_write(written, forged)).fields == ["seal"]
  # Two values swapped: both named (each field's digest covers its name).
  swapped = {**d, "lambda_hat": d["q_hat"], "q_hat": d["lambda_hat"]}
  assert _seal_error(_write(written, swapped)).fields == ["lambda_hat", "q_hat"]


def test_a_file_without_a_seal_is_refused_with_what_to_do(written):
  d = json.loads(written.read_text())
  for legacy in ({k: v for k, v in d.items() if k != "seal"}, {**d, "seal": {"digest": "x"}}):
    err = _seal_error(_write(written, legacy))
    assert err.fields is None and "no valid seal" in str(err)
    assert f"rcst calibrate --reseal {written}" in str(err) and "rerun `rcst calibrate`" in str(err)


def _images(tmp_path, n):
  src, paths = SyntheticShapes("test", n, seed=5), []
  for i in range(n):
    paths.append(str(tmp_path / f"img{i}.png"))
    Image.fromarray(src[i].image).save(paths[-1])
  return paths


def _run(path, images):
  return cli.main(["run", "--edge", f"{WEIGHTS}/demo_edge", "--server", f"{WEIGHTS}/demo_server",
                   "--calibration", str(path), "--tau", "0.5", *images])


def test_run_refuses_an_edited_lambda_then_a_reseal_runs_it_with_a_warning(tmp_path, capsys):
  path = tmp_path / "cal.json"
  _calibration(edge_digest=None, server_digest=None).to_json(path)
  d = json.loads(path.read_text())
  _write(path, {**d, "lambda_hat": 0.05})
  images = _images(tmp_path, 2)
  assert _run(path, images) == 2
  out, err = capsys.readouterr()
  assert out == "" and "edited since rcst wrote it, per its seal: lambda_hat (changed)" in err

  assert cli.main(["calibrate", "--reseal", str(path)]) == 0
  got = json.loads(capsys.readouterr().out)
  assert got["resealed"] is True and got["fields"] == ["lambda_hat"]
  assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", got["at"])
  resealed = json.loads(path.read_text())
  assert resealed["resealed"] == [{"at": got["at"], "fields": ["lambda_hat"]}]
  assert resealed["lambda_hat"] == 0.05 and list(resealed)[-1] == "seal"
  with pytest.warns(ResealedWarning, match=r"edited by hand and resealed .*: no guarantee of "
                                           r"the original calibration applies to lambda_hat"):
    assert Calibration.from_json(path).lambda_hat == 0.05
  with pytest.warns(ResealedWarning, match=f"{path} was edited by hand") as record:
    assert _run(path, images) == 0
  assert [str(w.message).count("\n") for w in record] == [0] * len(record)  # one line each
  out = capsys.readouterr().out.strip().splitlines()
  assert len(out) == 2 and all(json.loads(x)["accepted_on_edge"] for x in out)  # lambda 0.05

  # An edit after the reseal is refused again; a second reseal keeps the history.
  _write(path, {**resealed, "q_hat": 0.5})
  _seal_error(path)
  assert cli.main(["calibrate", "--reseal", str(path)]) == 0
  capsys.readouterr()
  history = json.loads(path.read_text())["resealed"]
  assert [r["fields"] for r in history] == [["lambda_hat"], ["q_hat"]]
  with pytest.warns(ResealedWarning, match="applies to lambda_hat, q_hat"):
    Calibration.from_json(path)


def test_reseal_of_an_unsealed_file_records_that_no_field_can_be_told(written, capsys):
  d = json.loads(written.read_text())
  _write(written, {k: v for k, v in d.items() if k != "seal"})
  assert cli.main(["calibrate", "--reseal", str(written)]) == 0
  assert json.loads(capsys.readouterr().out)["fields"] is None
  with pytest.warns(ResealedWarning, match="from a file without a seal: rcst cannot tell which "
                                           "fields were edited"):
    Calibration.from_json(written)


def test_reseal_leaves_a_sealed_file_and_refuses_what_it_must_not_vouch_for(written, tmp_path,
                                                                           capsys):
  before = written.read_bytes()
  assert cli.main(["calibrate", "--reseal", str(written)]) == 0
  assert json.loads(capsys.readouterr().out) == {"calibration": str(written), "resealed": False,
                                                 "fields": []}
  assert written.read_bytes() == before
  # An edited certificate keeps failing its own digest: a reseal does not make it a claim.
  d = json.loads(before)
  d["certificate"] = {**d["certificate"], "epsilon": 0.2}
  _write(written, d)
  edited = written.read_bytes()
  assert cli.main(["calibrate", "--reseal", str(written)]) == 2
  err = capsys.readouterr().err
  assert "refusing to reseal a malformed calibration file" in err and "digest mismatch" in err
  assert written.read_bytes() == edited
  # A link is not followed: its target stays as it was.
  link = tmp_path / "link.json"
  link.symlink_to(written)
  assert cli.main(["calibrate", "--reseal", str(link)]) == 2
  assert "not a regular file" in capsys.readouterr().err
  assert written.read_bytes() == edited and link.is_symlink()
  # --reseal takes no config; everything else needs one.
  assert cli.main(["calibrate", "--reseal", str(written), "--config", "demo:smoke"]) == 2
  assert "takes no --config" in capsys.readouterr().err
  assert cli.main(["calibrate"]) == 2
  assert "--config is required" in capsys.readouterr().err


def test_a_resealed_history_is_itself_sealed_and_checked(written):
  d = json.loads(written.read_text())
  body = {k: v for k, v in d.items() if k != "seal"}
  body["resealed"] = [{"at": "2024-01-01T00:00:00Z", "fields": ["lambda_hat"]}]
  good = {**body, "seal": seal_lib.make(body)}
  with warnings.catch_warnings(record=True):
    warnings.simplefilter("always")
    Calibration.from_json(_write(written, good))
  # Dropping the history is an edit like any other.
  dropped = {k: v for k, v in good.items() if k != "resealed"}
  assert _seal_error(_write(written, dropped)).fields == ["resealed"]
  bad = {**body, "resealed": [{"at": 1}]}
  with pytest.raises(CalibrationError, match="resealed must be null or a non-empty list"):
    Calibration.from_json(_write(written, {**bad, "seal": seal_lib.make(bad)}))


def test_an_older_unsealed_file_is_still_one_calibrate_out_may_replace(written):
  d = json.loads(written.read_text())
  _write(written, {k: v for k, v in d.items() if k != "seal"})
  check_calibration_out(str(written), overwrite=True)  # rerunning `rcst calibrate` is the advice
  with pytest.raises(OutputRefusedError, match="pass --overwrite"):
    check_calibration_out(str(written), overwrite=False)


def test_a_cached_calibration_from_an_older_rcst_is_recomputed(tmp_path):
  store = cache.ChunkStore(str(tmp_path), "fp")
  store.save_calibration(_calibration(), inputs="x")
  path = store.calibration_path()
  d = json.loads(open(path).read())
  data = (json.dumps({k: v for k, v in d.items() if k != "seal"}, indent=2) + "\n").encode()
  with open(path, "wb") as f:
    f.write(data)
  store.manifest.record("calibration.json", data, inputs="x")  # as an older rcst recorded it
  with pytest.warns(UserWarning, match="an older rcst wrote it"):
    assert store.load_calibration("x") is None
