"""One Algorithm 2 behind every number: the sweep engine against `rcst run` and
against a transcription of each method's rule, on the shipped demo models and
a folder of image files (>= 200 test images), one evaluation run shared by all.
"""

import csv
import json
import os

import jax
import numpy as np
import paper_rules
import pytest
from PIL import Image

from rcst_edge.payload import codecs
from rcst_edge.payload.geometry import Geometry
from rcst_jax import cli
from rcst_jax.data import ImageFolder, batches
from rcst_jax.data.sources import run_transform
from rcst_jax.data.synthetic import CLASS_NAMES, SyntheticShapes
from rcst_jax.inference import collaborative, methods, patches
from rcst_jax.inference import edge as edge_lib
from rcst_jax.inference.selection import random_ranks
from rcst_jax.jobs import evaluate
from rcst_jax.models.checkpoints import load_model
from rcst_jax.sweep import metrics

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WEIGHTS = os.path.join(REPO, "weights")
N_IMAGES, N_CAL = 260, 60
TAUS = (0.3, 0.6)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """Synthetic scenes from an unused seed as PNG files in class folders, then
  `rcst evaluate` on them with data.name=folder and per_image=True."""
  root = tmp_path_factory.mktemp("folder")
  src = SyntheticShapes("test", N_IMAGES, seed=77)
  for i in range(N_IMAGES):
    ex = src[i]
    d = root / "images" / CLASS_NAMES[ex.label]
    d.mkdir(parents=True, exist_ok=True)
    Image.fromarray(ex.image).save(d / f"scene{i:04d}.png")
  label_map = root / "labels.json"
  label_map.write_text(json.dumps({name: i for i, name in enumerate(CLASS_NAMES)}))
  out = root / "out"
  config = cli.parse_config(os.path.join(REPO, "configs", "demo.py") + ":full", [
      "--config.data.name=folder", f"--config.data.folder_root={root / 'images'}",
      f"--config.data.label_map={label_map}", f"--config.data.n_cal={N_CAL}",
      f"--config.output_dir={out}", "--config.per_image=True", "--config.progress=False",
      "--config.gallery_size=0", f"--config.tau_grid={TAUS}", "--config.chunk_size=128"])
  result = evaluate.evaluate_config(config)
  with open(result["paths"]["per_image"]) as f:
    rows = list(csv.DictReader(f))
  return {"config": config, "root": root / "images", "result": result["result"],
          "paths": result["paths"], "rows": rows}


def _rows(rows, method, param, codec="raw"):
  return {r["key"]: r for r in rows
          if r["method"] == method and r["param"] == param and r["codec"] == codec}


def test_engine_equals_rcst_run_on_the_same_files(run, capsys):
  """Done-when of the issue: accuracy, cost and offload rate at a tau equal
  what `rcst run --tau` gives on that run's test images with its calibration."""
  test_keys = sorted({r["key"] for r in run["rows"]})
  assert len(test_keys) == N_IMAGES - N_CAL
  points = {(p["method"], p["param"]): p for p in run["result"]["points"]}
  for tau in TAUS:
    capsys.readouterr()
    code = cli.main(["run", "--edge", f"{WEIGHTS}/demo_edge", "--server", f"{WEIGHTS}/demo_server",
                     "--calibration", run["paths"]["calibration"], "--tau", str(tau),
                     "--batch-size", "32", *[str(run["root"] / k) for k in test_keys]])
    assert code == 0
    got = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    want = _rows(run["rows"], "proposed", f"{tau:g}")
    labels = []
    for key, r in zip(test_keys, got):
      w = want[key]
      assert r["image"] == str(run["root"] / key)
      assert (r["prediction"], int(not r["accepted_on_edge"]), r["patches_sent"],
              r["bytes_sent"]) == (int(w["pred"]), int(w["offloaded"]), int(w["kept"]),
                                   int(w["bytes"])), key
      labels.append(int(w["label"]))
    point = points[("proposed", tau)]
    acc = np.mean([r["prediction"] == y for r, y in zip(got, labels)])
    assert acc == point["accuracy"]
    assert np.mean([not r["accepted_on_edge"] for r in got]) == point["offload_rate"]
    assert sum(r["patches_sent"] for r in got) / (len(got) * 196) == pytest.approx(
        point["cost"], rel=1e-12)
    assert sum(r["bytes_sent"] for r in got) / (len(got) * 150528) == pytest.approx(
        point["cost_bytes"], rel=1e-12)


@pytest.mark.parametrize("codec", ["jpeg420:50", "zstd"])
def test_engine_equals_rcst_run_with_a_codec(run, capsys, codec):
  """`rcst run --codec` sends real coded payloads and the server answers from
  what it decodes; the sweep's row for that codec agrees per image (prediction,
  offload, patches, exact bytes) and in accuracy and byte cost."""
  tau = TAUS[0]
  test_keys = sorted({r["key"] for r in run["rows"]})
  capsys.readouterr()
  assert cli.main(["run", "--edge", f"{WEIGHTS}/demo_edge", "--server", f"{WEIGHTS}/demo_server",
                   "--calibration", run["paths"]["calibration"], "--tau", str(tau),
                   "--codec", codec, "--batch-size", "50",
                   *[str(run["root"] / k) for k in test_keys]]) == 0
  got = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
  want, raw = _rows(run["rows"], "proposed", f"{tau:g}", codec), _rows(
      run["rows"], "proposed", f"{tau:g}")
  for key, r in zip(test_keys, got):
    w = want[key]
    assert (r["prediction"], int(not r["accepted_on_edge"]), r["patches_sent"], r["codec"],
            r["bytes_sent"]) == (int(w["pred"]), int(w["offloaded"]), int(w["kept"]), codec,
                                 int(w["bytes"])), key
    if r["patches_sent"] >= 8:  # a coded payload is smaller than the raw one
      assert r["bytes_sent"] < int(raw[key]["bytes"]), key
  point = next(p for p in run["result"]["codec_points"]
               if (p["method"], p["param"], p["codec"]) == ("proposed", tau, codec))
  labels = [int(want[k]["label"]) for k in test_keys]
  assert np.mean([r["prediction"] == y for r, y in zip(got, labels)]) == point["accuracy"]
  assert sum(r["bytes_sent"] for r in got) / (len(got) * 150528) == pytest.approx(
      point["cost_bytes"], rel=1e-12)


def test_rcst_run_without_tau_uses_the_certified_pair(run, capsys):
  """The engine's Certified row and `rcst run` (no --tau) agree per image."""
  cert = run["result"]["calibration"].certificate
  assert cert is not None and cert["n_fit"] + cert["n_test"] == N_CAL
  rows = _rows(run["rows"], "certified", f"{cert['tau']:g}", cert["codec"])
  keys = sorted(rows)[:40]
  capsys.readouterr()
  assert cli.main(["run", "--edge", f"{WEIGHTS}/demo_edge", "--server", f"{WEIGHTS}/demo_server",
                   "--calibration", run["paths"]["calibration"], "--batch-size", "40",
                   *[str(run["root"] / k) for k in keys]]) == 0
  got = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
  for key, r in zip(keys, got):
    w = rows[key]
    assert (r["prediction"], int(not r["accepted_on_edge"]), r["patches_sent"], r["codec"],
            r["bytes_sent"]) == (int(w["pred"]), int(w["offloaded"]), int(w["kept"]),
                                 cert["codec"], int(w["bytes"])), key
  table = open(run["paths"]["table1.md"]).read()
  assert "| Certified (LTT) |" in table and "Certified row:" in table


def _server_argmax(server, images, keep):
  """Unbucketed, undeduplicated: all 196 positions, dropped ones masked out."""
  idx = np.broadcast_to(np.arange(196), keep.shape)
  sent = np.asarray(patches.gather_patches(images, idx))
  apply = jax.jit(lambda v, *a: server.module.apply(v, *a, method="tokens")[0])
  return np.asarray(apply(server.variables, sent, idx, keep)).argmax(-1)


def test_engine_equals_a_hand_transcription_of_each_methods_rule(run):
  """Every method and grid value: offload flag, kept count and final prediction
  per image equal the method's rule written out here in plain numpy (Eq. 15,
  Eqs. 24-25, Im et al.'s min-entropy, top-k and attention-sum rules, Eq. 27)
  on one edge pass, not the selection functions the method table binds."""
  config, cal = run["config"], run["result"]["calibration"]
  edge, server = load_model(f"{WEIGHTS}/demo_edge"), load_model(f"{WEIGHTS}/demo_server")
  base = load_model(f"{WEIGHTS}/demo_baseline_edge")
  folder = ImageFolder(run["root"], {n: i for i, n in enumerate(CLASS_NAMES)},
                       preprocess=run_transform(edge.metadata))
  keys = sorted({r["key"] for r in run["rows"]})
  index = {k: i for i, (k, _) in enumerate(folder.items)}
  e, b_probs, attn, images = [], [], [], []
  for batch in batches(folder, [index[k] for k in keys], 64, progress=False):
    v = batch.valid
    out = jax.device_get(edge_lib.edge_step(edge, batch.images, cal.lambda_hat, cal.q_hat))
    e.append({k: np.asarray(x)[v] for k, x in out.items()})
    logits, o = base(batch.images)
    b_probs.append(np.asarray(jax.nn.softmax(logits))[v])
    attn.append(np.asarray(o["cls_attn"])[v])
    images.append(batch.images[v])
  e = {k: np.concatenate([x[k] for x in e]) for k in e[0]}
  b_probs, attn, images = map(np.concatenate, (b_probs, attn, images))
  assert config.empty_policy == "cls_only"
  b_pred = b_probs.argmax(-1)
  b_off = ~(-np.log2(b_probs.max(-1)) < config.eta)  # Im et al.: offload unless entropy < eta
  # Random-k: each image's seeded permutation of the patches; keep rank < k.
  ranks = random_ranks(keys, config.seed, 196)
  e_off = ~paper_rules.accepts(e["p_max"], cal.lambda_hat)  # Eq. 15, the edge's own p_max
  rules = {
      "proposed": lambda t: (e_off, paper_rules.threshold_keep(e["patch_scores"], t), e["pred"]),
      "random": lambda k: (b_off, ranks < k, b_pred),
      "topk": lambda k: (b_off, paper_rules.topk_keep(attn, k), b_pred),
      # An empty attention-sum selection is still offloaded ("cls_only").
      "attention_sum": lambda d: (b_off, paper_rules.attention_sum_keep(attn, d), b_pred),
      "server_only": lambda _: (np.ones(len(keys), bool), np.ones((len(keys), 196), bool),
                                e["pred"]),
      "edge_only": lambda _: (np.zeros(len(keys), bool), np.zeros((len(keys), 196), bool),
                              e["pred"]),
  }
  rng = np.random.default_rng(0)
  sample_img, sample_keep, sample_got = [], [], []
  for method, param in methods.operating_points(config):
    rows = _rows(run["rows"], method.name, "" if param is None else f"{param:g}")
    off, keep, fallback = rules[method.name](param)
    keep = keep & off[:, None]
    for i, key in enumerate(keys):
      r = rows[key]
      assert (int(r["offloaded"]), int(r["kept"])) == (int(off[i]), int(keep[i].sum())), (
          method.name, param, key)
      server_pred = int(r["server_pred"])
      assert int(r["pred"]) == (server_pred if off[i] else int(fallback[i]))  # Eq. 27
      assert (server_pred >= 0) == bool(off[i])
    for i in rng.choice(np.flatnonzero(off), min(3, off.sum()), replace=False):
      sample_img.append(images[i])
      sample_keep.append(keep[i])
      sample_got.append(int(rows[keys[i]]["server_pred"]))
  # The server's answers on a sample of offloaded images over all points.
  assert len(sample_got) > 60
  want = _server_argmax(server, np.stack(sample_img), np.stack(sample_keep))
  np.testing.assert_array_equal(sample_got, want)


def test_collaborative_inference_equals_engine(run):
  cal = run["result"]["calibration"]
  edge, server = load_model(f"{WEIGHTS}/demo_edge"), load_model(f"{WEIGHTS}/demo_server")
  keys = sorted({r["key"] for r in run["rows"]})[:64]
  prep = run_transform(edge.metadata)
  images = np.stack([prep(str(run["root"] / k)) for k in keys])
  for tau in TAUS:
    out = collaborative.collaborative_inference(images, edge, server, cal.operating_point(tau),
                                                layer=cal.gradcam_layer, batch_size=24)
    want = _rows(run["rows"], "proposed", f"{tau:g}")
    for i, key in enumerate(keys):
      assert (int(out["pred"][i]), int(out["offloaded"][i]), int(out["kept"][i]),
              int(out["bytes"][i])) == (int(want[key]["pred"]), int(want[key]["offloaded"]),
                                        int(want[key]["kept"]), int(want[key]["bytes"]))


def test_full_transmission_points_and_table1(run):
  points = run["result"]["points"]
  for name, param in (("random", 196), ("topk", 196), ("attention_sum", 1.01)):
    p = next(p for p in points if p["method"] == name and p["param"] == param)
    assert p["mean_patches"] == 196
  table = open(run["paths"]["table1.md"]).read()
  assert "| Proposed |" in table and "| Server-only | 1.00 |" in table


def test_aggregate_on_hand_made_arrays():
  """Accuracy, patch and byte cost, offload rate, edge risk, APS statistics by hand."""
  pts = [(methods.PROPOSED, 0.5), (methods.TOPK, 2.0), (methods.SERVER_ONLY, None)]
  arrays = {
      "labels": np.array([0, 1, 2, 3]),
      "offloaded": np.array([[0, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], bool),
      "kept": np.array([[0, 3, 30, 0], [2, 2, 0, 0], [196, 196, 196, 196]]),
      "pred": np.array([[0, 1, 0, 0], [0, 1, 2, 0], [0, 1, 2, 3]]),
      "edge_pred": np.array([0, 5, 5, 0]), "edge_p_max": np.array([.9, .2, .3, .8]),
      "edge_aps_size": np.array([1, 4, 3, 2]), "edge_aps_cover": np.array([1, 1, 0, 1], bool),
      "base_pred": np.array([0, 1, 2, 9]), "base_p_max": np.array([.5, .5, .9, .9]),
  }
  # Raw bytes by hand: K=2 -> 13 + 2 + 2*768 = 1551; K=3 -> 13 + 3 + 3*768 = 2320;
  # K=30 -> 13 + 25 + 30*768 = 23078; K=196 -> 13 + 25 + 150528 = 150566.
  raw_bytes = np.array([[0, 2320, 23078, 0], [1551, 1551, 0, 0], [150566] * 4])
  coded = raw_bytes // 10  # a second codec: other bytes, and one answer changed
  coded_pred = arrays["pred"].copy()
  coded_pred[0, 1] = 7
  arrays.update(codec_bytes=np.stack([raw_bytes, coded]),
                codec_pred=np.stack([arrays["pred"], coded_pred]),
                codec_server_pred=np.stack([arrays["pred"], coded_pred]))
  got = metrics.aggregate(arrays, pts, Geometry(), alpha_crc=0.05,
                          codecs=(codecs.RAW, codecs.parse("jpeg:75")))
  assert [p["codec"] for p in got] == ["raw"] * 3 + ["jpeg:75"] * 3
  prop, topk, server = got[:3]
  assert prop["accuracy"] == 2 / 4 and topk["accuracy"] == 3 / 4 and server["accuracy"] == 1
  assert prop["cost"] == 33 / (4 * 196) and topk["cost"] == 4 / 784 and server["cost"] == 1
  assert prop["cost_bytes"] == (2320 + 23078) / (4 * 150528)
  assert server["cost_bytes"] == 4 * 150566 / (4 * 150528)
  jprop = got[3]
  assert jprop["accuracy"] == 1 / 4 and jprop["cost"] == prop["cost"]
  assert jprop["cost_bytes"] == (232 + 2307) / (4 * 150528)
  assert prop["offload_rate"] == 0.5 and topk["offload_rate"] == 0.5
  assert prop["mean_patches"] == 33 / 2
  # Edge risk: accepted (not offloaded) and the edge's own prediction wrong.
  assert prop["edge_risk"] == 1 / 4          # image 3: accepted, edge says 0, label 3
  assert topk["edge_risk"] == 1 / 4          # image 3: accepted, baseline says 9
  assert server["edge_risk"] == 0
  assert prop["aps_set_size"] == 2.5 and prop["aps_coverage"] == 0.75
  assert prop["alpha_crc"] == 0.05 and topk["alpha_crc"] is None and topk["aps_coverage"] is None
