"""The sweep engine: ImageNet path on tfds mock data, sharding, resume, bad items."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest
import small_models

from rcst_jax.calibration import algorithm1
from rcst_jax.cli import parse_config
from rcst_jax.data import BadImageError, Example
from rcst_jax.data.sources import Sources
from rcst_jax.data.synthetic import SyntheticShapes
from rcst_jax.inference import server
from rcst_jax.jobs import evaluate
from rcst_jax.models.loading import Models
from rcst_jax.sweep import cache, certification, engine, passes

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(tmp_path, *overrides):
  return parse_config("imagenet:smoke", [f"--config.output_dir={tmp_path}",
                                         "--config.chunk_size=2048", *overrides])


@pytest.fixture(scope="module")
def models12():
  return Models(small_models.edge(), small_models.server(), small_models.baseline())


def _synthetic_sources(n_cal=40, n_test=24):
  return Sources(SyntheticShapes("calibration", n_cal), SyntheticShapes("test", n_test),
                          name="synthetic")


def test_imagenet_path_on_mock_data(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  models = Models(small_models.edge(num_classes=1000), small_models.server(num_classes=1000),
                           small_models.baseline(num_classes=1000))
  config = _config(tmp_path, "--config.chunk_size=8", "--config.compare_dtype=bfloat16")
  with tfds.testing.mock_data(num_examples=40):
    out = evaluate.evaluate_config(config, models=models)
  paths = out["paths"]
  for key in ("results_json", "results_csv", "table1.md", "table2.md", "figure1", "figure2",
              "gallery", "calibration", "summary"):
    assert os.path.getsize(paths[key]) > 0, key
  points = json.load(open(paths["results_json"]))
  methods = {p["method"] for p in points}
  assert methods == {"server_only", "edge_only", "proposed", "random", "topk", "attention_sum"}
  assert len(points) == 2 + 2 + 2 * 2 + 2
  # Each baseline's grid ends at full transmission, as the paper's "Best Acc." cells.
  for m in ("random", "topk", "attention_sum"):
    full = [p for p in points if p["method"] == m and p["param"] in (196, 1.01)]
    assert len(full) == 1 and full[0]["mean_patches"] == 196
  for p in points:
    assert p["n"] == 16 and 0 <= p["accuracy"] <= 1 and 0 <= p["cost"] <= 1
  server = next(p for p in points if p["method"] == "server_only")
  assert server["cost"] == 1.0 and server["offload_rate"] == 1.0
  assert next(p for p in points if p["method"] == "edge_only")["cost"] == 0.0
  assert "| Proposed |" in open(paths["table1.md"]).read()
  from PIL import Image
  for key in ("figure1", "figure2", "gallery"):
    assert Image.open(paths[key]).size[0] > 100
  rows = open(paths["dtype_comparison"]).read().splitlines()
  assert "acc float32" in rows[0] and "acc bfloat16" in rows[0] and len(rows) == 2 + len(points)
  summary = json.load(open(paths["summary"]))
  assert summary["skipped"] == {} and summary["devices"] == len(jax.local_devices())


def _points(tmp_path, models, sources, *overrides, **run_kw):
  ev = engine.Sweep(_config(tmp_path, *overrides), models, sources, str(tmp_path),
                    progress=False)
  return ev, ev.run(**run_kw)


def test_sharded_equals_unsharded(tmp_path, models12):
  assert len(jax.local_devices()) == 8  # tests/conftest.py sets XLA_FLAGS
  sources = _synthetic_sources()
  ev1, one = _points(tmp_path / "one", models12, sources, "--config.devices=1")
  ev8, eight = _points(tmp_path / "eight", models12, sources, "--config.devices=8")
  assert one["points"] == eight["points"]
  # The calibration too, to the byte (its scores are the edge step's, per device).
  files = [open(ev.published_calibration, "rb").read() for ev in (ev1, ev8)]
  assert files[0] == files[1] and b'"q_hat"' in files[0]


def test_server_min_batch_pads_fewer_rows_with_the_same_results(tmp_path, models12,
                                                                monkeypatch):
  # server_min_batch reaches the sweep's Server: remainders run in smaller
  # batches (fewer padding rows processed), and no prediction changes.
  sources = _synthetic_sources()
  made, server_cls = [], server.Server
  monkeypatch.setattr(passes, "Server",  # the name sweep.passes instantiates
                      lambda *a, **k: made.append(server_cls(*a, **k)) or made[-1])
  tokens = {}
  for mb in (0, 2):
    made.clear()
    _, res = _points(tmp_path / str(mb), models12, sources, "--config.devices=1",
                     f"--config.server_min_batch={mb}")
    tokens[mb] = (res["points"], sum(s.stats.processed for s in made),
                  sum(s.stats.useful for s in made))
    assert made and all(s.min_batch == (mb or None) for s in made)
  assert tokens[0][0] == tokens[2][0]
  assert tokens[0][2] == tokens[2][2] > 0  # the same useful tokens
  assert tokens[2][1] < tokens[0][1]       # fewer processed


class _Interrupt(Exception):
  """Stands for a killed run (Ctrl-C, preemption) between two chunks."""


def test_resume_after_interruption_is_bit_identical(tmp_path, models12, monkeypatch):
  sources = _synthetic_sources()
  opts = ("--config.chunk_size=8",)
  _, clean = _points(tmp_path / "clean", models12, sources, *opts)
  run_chunk, ran = engine.Sweep.run_chunk, []

  def interrupted_after_one(self, c, *a, **k):
    if ran:
      raise _Interrupt(f"interrupted before chunk {c}")
    ran.append(c)
    return run_chunk(self, c, *a, **k)
  with monkeypatch.context() as m:
    m.setattr(engine.Sweep, "run_chunk", interrupted_after_one)
    with pytest.raises(_Interrupt):
      _points(tmp_path / "resumed", models12, sources, *opts)
  assert ran == [0]
  # The rerun computes only the chunks the interrupted run did not finish.
  recomputed = []

  def recording(self, c, *a, **k):
    recomputed.append(c)
    return run_chunk(self, c, *a, **k)
  with monkeypatch.context() as m:
    m.setattr(engine.Sweep, "run_chunk", recording)
    ev, resumed = _points(tmp_path / "resumed", models12, sources, *opts)
  assert recomputed == [1, 2]
  assert resumed["chunks_computed"] == 2 and clean["chunks_computed"] == 3
  assert resumed["points"] == clean["points"]
  for c in range(3):
    a, b = np.load(tmp_path / "clean" / "cache" / ev.fp / f"chunk_{c:05d}.npz"), \
        np.load(ev.store.chunk_path(c))
    assert set(a.files) == set(b.files)
    for k in a.files:
      np.testing.assert_array_equal(a[k], b[k])
  # A finished run recomputes nothing; a changed config never reuses the cache.
  _, again = _points(tmp_path / "resumed", models12, sources, *opts)
  assert again["chunks_computed"] == 0 and again["points"] == clean["points"]
  ev2, changed = _points(tmp_path / "resumed", models12, sources, *opts, "--config.eta=0.5")
  assert ev2.fp != ev.fp and changed["chunks_computed"] == 3


class _Flaky:
  """Wraps a source: some items undecodable, some labels out of range."""
  num_classes = 12

  def __init__(self, inner):
    self.inner = inner

  def __len__(self):
    return len(self.inner)

  def __getitem__(self, i):
    if i % 7 == 3:
      raise BadImageError(f"item {i}: cannot decode")
    ex = self.inner[i]
    return Example(ex.image, 99, ex.key) if i % 11 == 5 else ex


def test_bad_items_are_counted_and_skipped(tmp_path, models12):
  sources = _synthetic_sources()
  sources = Sources(_Flaky(sources.cal_source), _Flaky(sources.test_source),
                             name="flaky")
  _, res = _points(tmp_path, models12, sources)
  bad_cal = [i for i in range(40) if i % 7 == 3 or i % 11 == 5]
  bad_test = [i for i in range(24) if i % 7 == 3 or i % 11 == 5]
  assert sum(res["skipped"].values()) == len(bad_cal) + len(bad_test)
  assert res["skipped"]["bad_image"] == sum(i % 7 == 3 for i in range(40)) + \
      sum(i % 7 == 3 for i in range(24))
  assert res["calibration"].n == 40 - len(bad_cal)
  assert all(p["n"] == 24 - len(bad_test) for p in res["points"])


def test_fingerprint_covers_config_data_and_models(tmp_path, models12):
  sources = _synthetic_sources(8, 8)
  fp = lambda *o, models=models12, sources=sources: cache.fingerprint(
      _config(tmp_path, *o), models, sources)
  base = fp()
  changed = ["--config.data.split_seed=3", "--config.data.folder_root=/x", "--config.data.label_map=/y",
             "--config.data.n_cal=7", "--config.data.data_dir=/z", "--config.data.pil_decode=True",
             "--config.tau_grid=(0.3,0.8)", "--config.k_grid=(11,196)", "--config.alpha_crc=0.1",
             "--config.alpha_aps=0.1", "--config.eta=0.5", "--config.chunk_size=7"]
  for o in changed:
    assert fp(o) != base, o
  for o in ["--config.progress=True", "--config.gallery_size=0", "--config.output_dir=/elsewhere",
            "--config.per_image=True", "--config.models_dir=/m"]:
    assert fp(o) == base, o
  # Other data (a calibration cached for it is never reused), other weights or metadata.
  assert fp(sources=Sources(sources.cal_source, sources.test_source, [0, 1, 2], None,
                            name="synthetic")) != base
  other = dataclasses.replace(models12.edge, metadata={**models12.edge.metadata, "std": [1, 1, 1]})
  assert fp(models=Models(other, models12.server, models12.baseline_edge)) != base


def test_corrupt_chunk_and_calibration_are_recomputed(tmp_path, models12):
  sources = _synthetic_sources()
  opts = ("--config.chunk_size=8",)
  ev, clean = _points(tmp_path, models12, sources, *opts)
  with open(ev.store.chunk_path(1), "r+b") as f:
    f.truncate(100)
  with open(ev.store.calibration_path(), "w") as f:
    f.write("{trunc")
  with pytest.warns(UserWarning, match="does not match its manifest"):
    _, again = _points(tmp_path, models12, sources, *opts)
  assert again["chunks_computed"] == 1 and again["points"] == clean["points"]


def test_recertifying_reuses_the_calibration_outcomes(tmp_path, models12, monkeypatch):
  """A new epsilon/delta/test certifies from cached outcomes: no server pass."""
  sources = _synthetic_sources(24, 8)
  on = ("--config.certify.enabled=True", "--config.data.n_cal=24")
  calls, real = [], algorithm1.algorithm1
  monkeypatch.setattr(algorithm1, "algorithm1", lambda *a, **k: calls.append(1) or real(*a, **k))
  ev, _ = _points(tmp_path, models12, sources, *on)
  assert calls == [1]  # the fitting split's rows come from the calibration pass
  first = ev.calibrate().certificate
  outcome_files = [f for f in os.listdir(tmp_path / "cache" / "outcomes") if f.endswith(".npz")]
  assert first is not None and len(outcome_files) == 1

  def no_server(*a, **k):
    raise AssertionError("the server ran again")
  monkeypatch.setattr(passes.Server, "logits_from_images", no_server)
  again = engine.Sweep(_config(tmp_path, *on, "--config.certify.epsilon=0.2",
                               "--config.certify.test=hb"), models12, sources,
                       str(tmp_path), progress=False).calibrate().certificate
  assert again["epsilon"] == 0.2 and again["test"] == "hb"
  assert again["n_fit"] == first["n_fit"] and again["q_hat"] == first["q_hat"]
  exact = engine.Sweep(_config(tmp_path, *on, "--config.certify.test=exact"), models12,
                       sources, str(tmp_path), progress=False).calibrate().certificate
  assert exact["test"] == "exact" and exact["n_test"] == first["n_test"]
  assert calls == [1]


def test_softmax_rows_are_taken_by_calibration_index():
  soft = algorithm1.Softmax(np.arange(12.0).reshape(6, 2), np.arange(6),
                            np.array([9, 3, 7, 1, 5, 0]))
  got = soft.take(np.array([0, 3, 9]))
  assert got.probs.tolist() == [[10, 11], [2, 3], [0, 1]] and got.labels.tolist() == [5, 1, 0]
  assert soft.take([2]) is None  # an index with no row
  assert algorithm1.Softmax(soft.probs, soft.labels, None).take([0]) is None  # items skipped


def test_certification_runs_from_an_existing_evaluation_cache(tmp_path, models12, monkeypatch):
  """Turning certification on, or changing its request, reuses the cached sweep:
  only the Certified row is computed, and it equals a fresh joint run's."""
  sources = _synthetic_sources(24, 8)
  base = ("--config.data.n_cal=24", "--config.chunk_size=4")
  on = base + ("--config.certify.enabled=True", "--config.certify.epsilon=0.9")
  _, plain_run = _points(tmp_path / "a", models12, sources, *base)
  fresh_ev, fresh = _points(tmp_path / "b", models12, sources, *on)
  assert fresh_ev.certificate["certified"]  # a loose epsilon certifies something

  def refuse(what):
    def f(*a, **k):
      raise AssertionError(f"{what} ran again")
    return f
  with monkeypatch.context() as m:  # the test-set sweep must not rerun
    m.setattr(engine.Sweep, "run_chunk", refuse("the sweep"))
    ev, reused = _points(tmp_path / "a", models12, sources, *on)
  assert reused["chunks_computed"] == 0 and reused["certified_chunks_computed"] == 2
  assert reused["points"] == fresh["points"]
  assert reused["points"][:-1] == plain_run["points"]

  # A request nothing meets: the server-only fallback, and no model runs at all.
  # Refused where they are looked up: sweep.passes calls edge_lib.edge_step (and
  # edge_step_batched for a certified view) and instantiates Server; sweep.engine
  # and sweep.certification call algorithm1.algorithm1 on the module.
  assert engine.algorithm1 is algorithm1 and certification.algorithm1 is algorithm1
  assert passes.Server is server.Server
  for name in ("edge_step", "edge_step_batched"):
    monkeypatch.setattr(passes.edge_lib, name, refuse(name))
  monkeypatch.setattr(passes.Server, "logits_from_images", refuse("the server"))
  monkeypatch.setattr(algorithm1, "algorithm1", refuse("Algorithm 1"))
  _, strict = _points(tmp_path / "a", models12, sources, *base, "--config.certify.enabled=True",
                      "--config.certify.epsilon=0.001", "--config.certify.test=hb")
  assert strict["calibration"].certificate["certified"] is False
  server_only = next(p for p in strict["points"] if p["method"] == "server_only")
  certified = strict["points"][-1]
  assert certified["method"] == "certified" and certified["cost"] == 1.0
  assert certified["accuracy"] == server_only["accuracy"]


def test_raw_answers_only_where_a_point_needs_them(tmp_path, models12, monkeypatch):
  """A certification with lossy codecs only runs the server on raw patches for
  server-only alone; the answers it gives are those of the full raw pass."""
  from rcst_edge.payload import codecs
  from rcst_edge.payload.geometry import Geometry
  from rcst_jax.core import spmd
  from rcst_jax.inference import methods
  config = _config(tmp_path, "--config.devices=1")
  p = passes.Passes(config, models12, spmd.make_mesh(1), Geometry.of_server(models12.server))
  src = SyntheticShapes("test", 6, seed=3)
  images = np.stack([src[i].image for i in range(6)])
  rng = np.random.default_rng(0)
  view = {"pred": np.zeros(6, np.int32), "accept": np.array([0, 1, 0, 0, 1, 0], bool),
          "scores": rng.random((6, 196)).astype(np.float32)}
  plan = [(methods.SERVER_ONLY, (None,)), (methods.PROPOSED, (0.3, 0.7))]
  sweep_codecs = codecs.sweep_grid(["jpeg:75"])
  rows = []
  monkeypatch.setattr(p, "_server_rows", lambda im, keep, img, real=p._server_rows:
                      rows.append(len(img)) or real(im, keep, img))
  full = p.sweep({methods.EDGE: view}, images, plan, sweep_codecs)
  n_full = list(rows)
  rows.clear()
  part = p.sweep({methods.EDGE: view}, images, plan, sweep_codecs,
                 raw_points=np.array([True, False, False]))
  # Raw rows: the 6 full images only (4 offloaded kept sets per tau also went before).
  assert rows[0] == 6 < n_full[0] and rows[1] == n_full[1]
  off, _, _, server_pred, by_codec, nbytes = part
  assert (server_pred[0] == full[3][0]).all() and (server_pred[1:][off[1:]] == -1).all()
  assert (by_codec[1] == full[4][1]).all() and (nbytes == full[5]).all()
  with pytest.raises(ValueError, match="lossless"):
    p.sweep({methods.EDGE: view}, images, plan, codecs.sweep_grid(["zstd"]),
            raw_points=np.array([True, False, False]))
