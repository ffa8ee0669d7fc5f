"""The calibration artifact's certificate: what `pick_certified_pair` records, what loading
refuses (strict JSON, a transform that fits the geometry, a sealed and consistent
certificate), `verify`, `describe`, and `rcst run` on an uncertified certificate."""

import functools
import json
import math
import os
from fractions import Fraction

import numpy as np
import pytest
from ml_collections import ConfigDict
from PIL import Image

from rcst_edge.payload.geometry import Geometry
from rcst_jax import cli
from rcst_jax.calibration import certificate
from rcst_jax.calibration.artifact import Calibration, CalibrationError
from rcst_jax.data.synthetic import SyntheticShapes
from rcst_jax.inference.methods import OperatingPoint

WEIGHTS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "weights")
TAUS = (0.2, 0.6)
N, N_FIT = 600, 200


def _config(**certify):
  c = {"epsilon": 0.05, "delta": 0.1, "risks": ("accuracy_drop", "edge_risk"), "test": "wsr",
       "lambda_grid": tuple(round(0.1 * i, 1) for i in range(11)) + (1.01,), "seed": 3,
       "cost": "patches", "multiple_testing": "pareto", "split": 0.5, **certify}
  return ConfigDict({"alpha_crc": 0.1, "certify": c})


def _outcomes(seed=0):
  """Calibration outcomes shaped as sweep/certification.py builds them: an edge right
  with probability p_max, a 90 % server that keeps 150 or 60 patches."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 12, N)
  p_max = rng.uniform(0.2, 1.0, N).astype(np.float32)
  edge_pred = np.where(rng.uniform(size=N) < p_max, labels, (labels + 1) % 12)
  server_only = np.where(rng.uniform(size=N) < 0.9, labels, (labels + 2) % 12)
  worse = np.where(rng.uniform(size=N) < 0.97, server_only, (labels + 3) % 12)
  return {"labels": labels, "edge_pred": edge_pred, "p_max": p_max,
          "server_only_pred": server_only, "server_pred": np.stack([server_only, worse]),
          "kept": np.stack([np.full(N, 150), np.full(N, 60)])}


def _certify(config=None, out=None):
  return certificate.pick_certified_pair(_config() if config is None else config,
                                         _outcomes() if out is None else out, TAUS, Geometry(),
                                         0.95, N_FIT)[0]


@pytest.fixture(scope="module")
def cert():
  c = _certify()
  assert c["certified"], c
  return c


def _calibration(cert, **kw):
  base = dict(lambda_hat=0.9, q_hat=0.95, alpha_crc=0.1, alpha_aps=0.1, n=N, lambda_valid=True,
              transform={"resize_size": 224, "crop_size": 224, "interpolation": "bicubic"},
              geometry={"image_size": 224, "patch": 16, "channels": 3}, certificate=cert)
  return Calibration(**{**base, **kw})


def _write(tmp_path, d, name="cal.json") -> str:
  path = tmp_path / name
  path.write_text(d if isinstance(d, str) else json.dumps(d, indent=2))
  return str(path)


def _refused(path, match):
  with pytest.raises(CalibrationError, match=match) as e:
    Calibration.from_json(path)
  assert path in str(e.value)
  return str(e.value)


def test_the_certificate_records_grids_levels_order_seed_adjusted_p_and_digest(cert, tmp_path):
  config = _config()
  assert cert["lambda_grid"] == list(config.certify.lambda_grid) and cert["tau_grid"] == [0.2, 0.6]
  assert cert["levels"] == {"accuracy_drop": 0.05, "edge_risk": 0.1}
  assert cert["order_seed"] == certificate.order_seed(3) != certificate.order_seed(4)
  assert cert["split"] == 0.5 and cert["n_fit"] == N_FIT
  assert cert["digest"] == certificate.digest(cert) and len(cert["digest"]) == 64
  # Round trip: what is written loads back as it was.
  path = tmp_path / "cal.json"
  _calibration(cert).to_json(path)
  assert Calibration.from_json(path).certificate == cert


@functools.lru_cache(maxsize=None)
def _binomial_tail(k: int, n: int, eps: float) -> float:
  """P(Binom(n, eps) <= k), summed exactly in rationals."""
  p = Fraction(str(eps))
  return float(sum(math.comb(n, j) * p**j * (1 - p)**(n - j) for j in range(k + 1)))


def _ltt_by_hand(out, lambdas, levels, delta):
  """({certified pair: adjusted p-value}, the chosen pair, {pair: its p-values
  and costs}), with the rule written out. Per (lambda, tau), Algorithm 2's
  binary losses. On the fitting split (the first N_FIT images): each pair's
  binomial p-value (the max over risks) and mean patch cost; the Pareto front
  is the pairs whose p-value is below that of every cheaper pair. The testing
  order: the front, then the rest, each by p-value, then cost, then grid index.
  Fixed-sequence testing on the testing split along that order, stopping at
  the first p-value above delta; a certified pair's adjusted p-value is the
  largest so far. The chosen pair: the certified one of least mean cost over
  all images."""
  labels, edge_pred, server_only = out["labels"], out["edge_pred"], out["server_only_pred"]
  pairs, stats = [], {}
  for l, lam in enumerate(lambdas):
    accept = out["p_max"].astype(np.float32) >= np.float32(lam)   # Eq. 15, in float32
    for t in range(len(TAUS)):
      pred = np.where(accept, edge_pred, out["server_pred"][t])
      loss = {"degradation": (pred != labels) & (server_only == labels),
              "edge_risk": accept & (edge_pred != labels)}
      cost = np.where(accept, 0, out["kept"][t]) / 196

      def pvalue(part):
        return max(_binomial_tail(int(loss[r][part].sum()), len(labels[part]), e)
                   for r, e in levels.items())
      fit, test = slice(0, N_FIT), slice(N_FIT, N)
      pairs.append((l, t))
      stats[l, t] = dict(fit_p=pvalue(fit), fit_cost=cost[fit].mean(), test_p=pvalue(test),
                         cost=cost.mean())
  by_cost = sorted(pairs, key=lambda q: (stats[q]["fit_cost"], stats[q]["fit_p"]))
  front = {q for i, q in enumerate(by_cost)
           if all(stats[q]["fit_p"] < stats[c]["fit_p"] for c in by_cost[:i])}
  order = sorted(pairs, key=lambda q: (q not in front, stats[q]["fit_p"],
                                       stats[q]["fit_cost"], q))
  adjusted = {}
  for q in order:
    if stats[q]["test_p"] > delta:
      break
    adjusted[q] = max([stats[q]["test_p"], *adjusted.values()])  # the running max
  chosen = min(adjusted, key=lambda q: (stats[q]["cost"], q))
  return adjusted, chosen, stats


def test_the_certified_pair_is_fixed_sequence_ltt_worked_by_hand():
  """The exact binomial test on degradation (epsilon) and edge risk (alpha_crc):
  pick_certified_pair's pair, count, adjusted p-value and cost equal the rule
  worked out in `_ltt_by_hand`, which shares no code with it. At this epsilon
  the sequence stops before 3 pairs that pass on their own, and the chosen
  pair's adjusted p-value is an earlier pair's, not its own."""
  config = _config(risks=("degradation", "edge_risk"), test="binomial", epsilon=0.04)
  out = _outcomes()
  lambdas = config.certify.lambda_grid
  adjusted, (l, t), stats = _ltt_by_hand(out, lambdas, {"degradation": 0.04,
                                                       "edge_risk": 0.1}, 0.1)
  passing = [q for q, v in stats.items() if v["test_p"] <= 0.1]
  assert len(adjusted) == 4 and len(passing) == 7
  assert adjusted[l, t] > stats[l, t]["test_p"]
  cert = certificate.pick_certified_pair(config, out, TAUS, Geometry(), 0.95, N_FIT)[0]
  assert cert["certified"] and cert["certified_count"] == len(adjusted)
  assert (cert["lambda_hat"], cert["tau"], cert["codec"]) == (lambdas[l], TAUS[t], "raw")
  assert cert["p_value"] == pytest.approx(adjusted[l, t], rel=1e-9, abs=1e-300)
  assert cert["cost_calibration"] == pytest.approx(stats[l, t]["cost"], rel=1e-12)
  assert (cert["n_fit"], cert["n_test"]) == (N_FIT, N - N_FIT)


def test_the_oracle_is_the_cheapest_pair_within_epsilon_on_these_images():
  """pick_certified_pair's grid names the oracle: by hand, Algorithm 2's system
  prediction per (lambda, tau), its accuracy against server-only's, and the
  fraction of patches sent."""
  config, out = _config(risks=("accuracy_drop",), epsilon=0.02), _outcomes()
  _, grid = certificate.pick_certified_pair(config, out, TAUS, Geometry(), 0.95, N_FIT)
  best = None
  for lam in config.certify.lambda_grid:
    accept = out["p_max"] >= lam
    for t in range(len(TAUS)):
      pred = np.where(accept, out["edge_pred"], out["server_pred"][t])
      drop = np.mean(pred != out["labels"]) - np.mean(out["server_only_pred"] != out["labels"])
      cost = np.mean(np.where(accept, 0, out["kept"][t])) / 196
      if drop <= 0.02 + 1e-12 and (best is None or cost < best[0]):
        best = (cost, drop)
  assert best is not None and best[0] < 1
  np.testing.assert_allclose(grid["oracle"], best, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("edit, match", [
    ({"p_value": 0.9}, r"p_value=0.9 exceeds delta=0.1"),
    ({"tau": 1.7}, r"tau=1.7 must be a number in \[0, 1\]"),
    ({"lambda_hat": 0.123}, r"lambda_hat=0.123 is not in lambda_grid"),
    ({"tau": 0.4}, r"tau=0.4 is not in tau_grid"),
    ({"tau_grid": [0.2, 0.6, 1.7]}, r"tau_grid=.* numbers in \[0, 1\]"),
    ({"n_test": 500}, r"n_test=500 plus n_fit=200 exceeds the calibration's n=600"),
    ({"n_fit": 0}, r"n_fit=0 must be an integer >= 1"),
    ({"split": 1.5}, r"split=1.5 must lie in \(0, 1\)"),
    ({"certified_count": 0}, r"certified_count=0 must be >= 1 when certified"),
    ({"grid_size": 7}, r"grid_size=7 must equal len\(lambda_grid\) \* len\(tau_grid\) "
                       r"\* len\(codec_grid\) = 24"),
    ({"codec": "jpeg:75"}, r"codec='jpeg:75' is not in codec_grid"),
    ({"codec_grid": ["raw", "jpeg: 75"]}, r"codec_grid=.* distinct codec names"),
    ({"q_hat": -1}, r"q_hat=-1 must be a number >= 0 or 'inf'"),
    ({"levels": {"accuracy_drop": 0.05}}, r"levels=.* each risk"),
])
def test_load_refuses_an_inconsistent_certificate_even_when_resealed(cert, tmp_path, edit,
                                                                     match):
  d = _calibration(cert).to_dict()
  d["certificate"] = certificate.seal({**cert, **edit})
  _refused(_write(tmp_path, d), match)


def test_load_refuses_an_edited_certificate_by_its_digest(cert, tmp_path):
  d = _calibration(cert).to_dict()
  d["certificate"] = {**cert, "epsilon": 0.2}  # a looser level than was tested
  _refused(_write(tmp_path, d), r"certificate fields were edited \(digest mismatch\)")
  d["certificate"] = {k: v for k, v in cert.items() if k != "digest"}
  _refused(_write(tmp_path, d), "certificate must be an object with keys")


def test_load_refuses_an_older_version(cert, tmp_path):
  d = {**_calibration(cert).to_dict(), "version": 2}
  _refused(_write(tmp_path, d), r"v3 file .*rerun `rcst calibrate`")


def test_load_refuses_files_that_are_not_strict_utf8_json(cert, tmp_path):
  good = json.dumps(_calibration(cert).to_dict(), indent=2)
  binary = tmp_path / "cal.bin"
  binary.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
  _refused(str(binary), "not a UTF-8 JSON file")
  # A repeated key, at the top or nested, would silently keep the last value.
  top = good.replace('"lambda_hat": 0.9,', '"lambda_hat": 0.9, "lambda_hat": 0.1,', 1)
  _refused(_write(tmp_path, top), "duplicate key 'lambda_hat'")
  tau = f'"tau": {cert["tau"]!r},'
  assert tau in good
  nested = good.replace(tau, tau + ' "tau": 0.6,', 1)
  _refused(_write(tmp_path, nested), "duplicate key 'tau'")
  for literal in ("NaN", "Infinity", "-Infinity", "1e999"):
    _refused(_write(tmp_path, good.replace('"q_hat": 0.95', f'"q_hat": {literal}', 1)),
             "non-finite number")


@pytest.mark.parametrize("change, match", [
    ({"transform": {"resize_size": 256, "crop_size": 256, "interpolation": "bicubic"}},
     r"transform.crop_size=256 differs from geometry.image_size=224"),
    ({"transform": {"resize_size": 200, "crop_size": 224, "interpolation": "bicubic"}},
     r"resize_size 200 < crop_size 224"),
    ({"transform": {"resize_size": 224, "crop_size": 224, "interpolation": "sinc"}},
     "unknown interpolation 'sinc'"),
    ({"geometry": {"image_size": 200, "patch": 16, "channels": 3}}, "not a multiple of patch"),
    ({"geometry": {"image_size": 224, "patch": 16, "channels": 1}}, "channels=1"),
])
def test_load_refuses_a_transform_that_does_not_fit_the_geometry(cert, tmp_path, change, match):
  d = {**_calibration(cert).to_dict(), **change}
  _refused(_write(tmp_path, d), match)


def _uncertified(cert, **fields):
  return certificate.seal({**cert, "certified": False, "certified_count": 0, "p_value": None,
                           **fields})


def test_an_uncertified_certificate_is_server_only_whatever_pair_it_holds(cert):
  cal = _calibration(_uncertified(cert, lambda_hat=0.0, tau=0.6))
  assert cal.operating_point() == OperatingPoint(math.inf, 0.95, 0.0, certified=False)
  # pick_certified_pair's own fallback, from a request nothing meets.
  none = _certify(_config(epsilon=0.001, risks=("system_error",)))
  assert not none["certified"] and none["p_value"] is None and none["lambda_hat"] == "inf"
  assert _calibration(none).operating_point() == OperatingPoint(math.inf, 0.95, 0.0,
                                                                certified=False)
  assert _calibration(cert).operating_point().certified


def test_verify_names_each_differing_field_with_both_values(cert):
  assert certificate.verify(cert, dict(cert)) == []
  assert certificate.verify(cert, _certify()) == []  # recomputed from the same outcomes
  close = {**cert, "p_value": cert["p_value"] * (1 + 1e-13)}
  assert certificate.verify(cert, close) == []
  forged = certificate.seal({**cert, "tau": 0.6 if cert["tau"] != 0.6 else 0.2, "epsilon": 0.2})
  diffs = certificate.verify(forged, cert)
  assert len(diffs) == 2 and diffs[0] == f"epsilon: recorded 0.2, recomputed {cert['epsilon']!r}"
  assert diffs[1].startswith("tau: recorded ")
  far = certificate.verify({**cert, "p_value": cert["p_value"] * (1 + 1e-9)}, cert)
  assert len(far) == 1 and far[0].startswith("p_value: recorded ")
  assert certificate.verify({**cert, "levels": {"accuracy_drop": 0.05, "edge_risk": 0.2}},
                            cert)[0].startswith("levels: ")
  assert certificate.verify({k: v for k, v in cert.items() if k != "order_seed"}, cert) == [
      f"order_seed: recorded '<missing>', recomputed {cert['order_seed']}"]
  assert certificate.verify({**cert, "n_fit": True}, {**cert, "n_fit": 1}) != []


def test_describe_names_each_risk_at_its_level_and_the_adjusted_p(cert):
  text = certificate.describe(cert)
  assert "expected accuracy drop <= 0.05 and edge risk <= 0.1 (alpha_crc)" in text
  assert f"fixed-sequence p = {cert['p_value']:.3g} <= delta = 0.1" in text
  assert f"seed {cert['order_seed']}" in text and "i.i.d." in text
  assert "over draws of the calibration set" in text
  assert "epsilon" not in text and "before the test set" not in text
  bonf = _certify(_config(multiple_testing="bonferroni", epsilon=0.1))
  assert bonf["certified"] and "Bonferroni-adjusted p = " in certificate.describe(bonf)
  none = certificate.describe(_uncertified(cert))
  assert "no (lambda, tau)" in none and "edge risk <= 0.1 (alpha_crc)" in none
  assert "server-only" in none


def test_rcst_run_without_tau_on_an_uncertified_certificate_is_server_only(cert, tmp_path,
                                                                            capsys):
  """lambda_hat 0 would accept every image on the edge; certified false means
  server-only: every image offloaded with all of its patches."""
  path = tmp_path / "uncertified.json"
  _calibration(_uncertified(cert, lambda_hat=0.0, tau=0.6)).to_json(path)
  src = SyntheticShapes("test", 3, seed=5)
  images = []
  for i in range(3):
    images.append(str(tmp_path / f"img{i}.png"))
    Image.fromarray(src[i].image).save(images[-1])
  capsys.readouterr()
  assert cli.main(["run", "--edge", f"{WEIGHTS}/demo_edge", "--server", f"{WEIGHTS}/demo_server",
                   "--calibration", str(path), *images]) == 0
  got = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
  assert [r["image"] for r in got] == images
  for r in got:
    assert not r["accepted_on_edge"] and r["patches_sent"] == 196, r
    assert r["sent_indices"] == list(range(196))


def test_the_codec_is_a_third_axis_certified_by_exact_bytes():
  """Two codecs x the two taus: a "lossless" codec answers as the raw server,
  a "JPEG" one costs a tenth of the bytes. When JPEG also answers as raw it is
  the cheapest certified configuration; when it is often wrong it is not
  certified and the lossless codec is chosen. Hand check of the chosen
  (codec, tau) cost from the bytes alone."""
  base = _outcomes()
  raw_bytes = np.stack([np.full(N, 115_300), np.full(N, 46_100)])  # about 150 / 60 patches
  specs = ("webp-lossless", "jpeg:75")
  config = _config(risks=("accuracy_drop",), epsilon=0.05, cost="bytes",
                   codec_grid=specs)
  wrong = (base["labels"] + 5) % 12
  for jpeg_ok in (True, False):
    jpeg_pred = base["server_pred"] if jpeg_ok else np.where(
        np.arange(N) % 3 == 0, wrong, base["server_pred"])
    out = {**base, "server_pred": np.concatenate([base["server_pred"], jpeg_pred]),
           "kept": np.tile(base["kept"], (2, 1)),
           "bytes": np.concatenate([raw_bytes * 6 // 10, raw_bytes // 10])}
    cert, grid = certificate.pick_certified_pair(config, out, TAUS, Geometry(), 0.95, N_FIT,
                                                 specs)
    assert cert["certified"] and cert["codec_grid"] == list(specs)
    assert cert["grid_size"] == len(config.certify.lambda_grid) * len(TAUS) * 2
    assert cert["codec"] == ("jpeg:75" if jpeg_ok else "webp-lossless")
    t = TAUS.index(cert["tau"]) + (len(TAUS) if jpeg_ok else 0)
    offload = out["p_max"] < float(cert["lambda_hat"])
    want = np.mean(np.where(offload, out["bytes"][t], 0)) / 150_528
    assert cert["cost_calibration"] == pytest.approx(want, rel=1e-12)
    certificate.check(cert, N)
    assert grid["cost"].shape == (len(config.certify.lambda_grid), 2 * len(TAUS))
