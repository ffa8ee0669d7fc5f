"""Algorithm 2 end to end on small random models."""

import jax
import numpy as np
import paper_rules
import pytest
import small_models

from rcst_edge.payload import message as payload
from rcst_jax.calibration.artifact import Calibration
from rcst_jax.inference import collaborative, patches
from rcst_jax.inference import edge as edge_lib
from rcst_jax.inference import server as server_lib
from rcst_jax.inference.edge import softmax_fn
from rcst_jax.inference.methods import OperatingPoint


@pytest.fixture(scope="module")
def models():
  return small_models.edge(), small_models.server()


def _images(n, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, 224, 224, 3), dtype=np.uint8)


def _point(lam, q, tau):
  """The CRC operating point of a calibration with these thresholds, at tau."""
  cal = Calibration(lambda_hat=lam, q_hat=q, alpha_crc=0.1, alpha_aps=0.1, n=100,
                    lambda_valid=bool(np.isfinite(lam)))
  point = cal.operating_point(tau)
  assert point == OperatingPoint(lam, q, tau, certified=False)
  return point


def _random_rows(seed, n, counts, n_images):
  """n keep masks with a kept count drawn from ``counts`` each, and the image
  of each row among n_images."""
  rng = np.random.default_rng(seed)
  keep = np.zeros((n, 196), bool)
  for i, k in enumerate(rng.choice(counts, n)):
    keep[i, rng.choice(196, k, replace=False)] = True
  return keep, rng.integers(0, n_images, n)


def _unpadded_server(server, image, keep):
  idx = np.flatnonzero(keep)[None]
  sent = np.asarray(patches.gather_patches(image[None], idx))
  return np.asarray(server.module.apply(server.variables, sent, idx, np.ones_like(idx, bool),
                                        method="tokens")[0])[0]


def test_server_buckets_equal_unpadded_runs(models):
  _, server = models
  images = _images(5, 1)
  rng = np.random.default_rng(0)
  keep = np.zeros((5, 196), bool)
  for i, k in enumerate([1, 7, 30, 120, 196]):
    keep[i, rng.choice(196, k, replace=False)] = True
  got = server_lib.Server(server, batch_size=4).logits_from_images(images, keep)
  for i in range(5):
    np.testing.assert_allclose(got[i], _unpadded_server(server, images[i], keep[i]),
                               rtol=1e-5, atol=1e-5)
  # `rows` lets several keep masks share one image.
  again = server_lib.Server(server, batch_size=4).logits_from_images(images[[3]], keep[[3, 3]],
                                                                   rows=np.array([0, 0]))
  np.testing.assert_allclose(again[0], got[3], rtol=1e-5, atol=1e-5)
  # The server side of `rcst run`: the same logits from encoded payloads.
  payloads = [payload.encode_image_payload(images[i], keep[i]) for i in range(5)]
  np.testing.assert_allclose(server_lib.Server(server, batch_size=4).logits_from_payloads(payloads),
                             got, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,cap,multiple", [(0, 64, 1), (5, 64, 1), (37, 64, 1), (130, 64, 1),
                                             (63, 64, 1), (3, 64, 8), (100, 64, 8), (200, 48, 8)])
@pytest.mark.parametrize("smallest", [1, 8])
def test_batch_rows(n, cap, multiple, smallest):
  rows = server_lib.batch_rows(n, cap, multiple, smallest=smallest)
  assert sum(rows) >= n and all(r % multiple == 0 and smallest <= r <= cap for r in rows)
  assert sum(rows) - n <= max(multiple - 1, smallest - 1, rows[-1] // 8 if rows else 0)
  # Shapes: the full batch plus powers of two (times the device count).
  assert all(r == cap or (r // multiple) & (r // multiple - 1) == 0 for r in rows)


def test_server_concurrent_calls_under_a_token_budget(models, monkeypatch):
  """Two calls in flight from host threads, each at most the token budget:
  every row the unpadded single run's logits, the same bits as one call at a
  time (same shapes), and a failing call's error reaches the caller."""
  _, server = models
  images = _images(6, 4)
  keep, rows = _random_rows(2, 40, [1, 7, 30, 120, 196], 6)
  budget = 600
  one = server_lib.Server(server, batch_size=8, token_budget=budget, min_batch=1)
  two = server_lib.Server(server, batch_size=8, token_budget=budget, min_batch=1, concurrency=2)
  want = one.logits_from_images(images, keep, rows=rows)
  got = two.logits_from_images(images, keep, rows=rows)
  np.testing.assert_array_equal(got, want)
  for i in range(0, 40, 5):
    np.testing.assert_allclose(got[i], _unpadded_server(server, images[rows[i]], keep[i]),
                               rtol=1e-5, atol=1e-5)
  assert two.stats.shapes() == one.stats.shapes()
  assert all(r * (bucket + 1) <= budget for bucket, r in two.stats.shapes())
  assert sum(b["rows"] for b in two.stats.by_bucket.values()) == 40
  assert max(b["batches"] for b in two.stats.by_bucket.values()) > 1  # 196 tokens: 3 rows a call

  calls, real = [], server_lib._server_from_images

  def flaky(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
      raise RuntimeError("call 3 failed")
    return real(*args, **kwargs)
  monkeypatch.setattr(server_lib, "_server_from_images", flaky)
  with pytest.raises(RuntimeError, match="call 3 failed"):
    two.logits_from_images(images, keep, rows=rows)


def test_host_map_keeps_order_bounds_lookahead_and_raises():
  import threading
  import time

  from rcst_jax.core import spmd
  read, lock = [], threading.Lock()

  def items():
    for i in range(12):
      with lock:
        read.append(i)
      yield i

  def slow(i):  # later items finish first
    time.sleep(0.002 * (12 - i))
    return i * i
  got = []
  for y in spmd.host_map(slow, items(), 2):
    got.append(y)
    assert len(read) <= len(got) + 3  # at most 2 in flight and 1 read ahead
  assert got == [i * i for i in range(12)]

  def bad(i):
    if i == 5:
      raise ValueError("item 5")
    return i
  with pytest.raises(ValueError, match="item 5"):
    list(spmd.host_map(bad, range(12), 2))
  assert list(spmd.host_map(bad, range(5), 1)) == list(range(5))


def test_server_sharded_equals_unsharded(models):
  from jax.sharding import Mesh, NamedSharding, PartitionSpec
  assert jax.device_count() == 8  # tests/conftest.py forces 8 host devices
  _, server = models
  images = _images(3, 2)
  keep, rows = _random_rows(1, 21, [1, 5, 7, 30, 196], 3)
  plain = server_lib.Server(server, batch_size=16, min_batch=1)
  want = plain.logits_from_images(images, keep, rows=rows)
  sharding = NamedSharding(Mesh(np.asarray(jax.devices()), ("batch",)), PartitionSpec("batch"))
  sharded = server_lib.Server(server, batch_size=16, sharding=sharding, min_batch=1)
  got = sharded.logits_from_images(images, keep, rows=rows)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert all(r % 8 == 0 for _, r in sharded.stats.shapes())
  # Both count the same useful tokens; the sharded one pads up to 8 rows per bucket.
  useful = int(keep.sum()) + len(keep)
  assert plain.stats.useful == sharded.stats.useful == useful
  assert plain.stats.processed <= sharded.stats.processed
  assert sum(b["rows"] for b in plain.stats.by_bucket.values()) == 21


def test_edge_step_sharded_runs_per_device(models):
  """On a mesh each device runs its own rows: no collective in the compiled
  edge step or calibration softmax (a micro-batched trunk under plain jit
  all-gathered the batch and ran all of it on every device), the same outputs."""
  import re

  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  from rcst_jax.models.checkpoints import Model
  assert jax.device_count() == 8  # tests/conftest.py forces 8 host devices
  edge, _ = models
  mesh = Mesh(np.asarray(jax.devices()), ("batch",))
  sharding, rep = NamedSharding(mesh, PartitionSpec("batch")), NamedSharding(mesh, PartitionSpec())
  assert edge.module.inference_chunk == -1  # auto: micro-batches of 2 images on CPU
  images = _images(16, 3)
  want = jax.device_get(edge_lib.edge_step(edge, images, 0.3, 0.5))
  x = jax.device_put(images, sharding)
  placed = Model(edge.module, jax.device_put(edge.variables, rep), edge.metadata)
  got = jax.device_get(edge_lib.edge_step(placed, x, 0.3, 0.5, sharding=sharding))
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-6, err_msg=k)
  np.testing.assert_array_equal(got["aps_mask"], want["aps_mask"])
  np.testing.assert_allclose(softmax_fn(placed, sharding)(x), want["probs"],
                             rtol=1e-6, atol=1e-6)
  inf = placed.inference()
  static = dict(module=inf.module, mean=tuple(inf.metadata["mean"]),
                std=tuple(inf.metadata["std"]), layer="features", grid=14, sharding=sharding)
  hlo = edge_lib._edge_step.lower(inf.variables, x, np.float32(0.3), np.float32(0.5),
                                  **static).compile().as_text()
  collectives = r"= \S+ (all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)\("
  assert not re.findall(collectives, hlo)


@pytest.mark.parametrize("lam", [np.inf, 0.0, "median"])
def test_collaborative_inference_follows_eqs_15_24_25_and_27(models, lam):
  """Acceptance, kept patches, payload bytes and final predictions of
  `collaborative_inference` equal the paper's rules written out by hand
  (Eq. 15 in float32, Eqs. 24-25 per patch, Eq. 27) and the unpadded server."""
  edge, server = models
  images = _images(6)
  e = jax.device_get(edge_lib.edge_step(edge, images, 0.0, 0.5))
  if lam == "median":
    lam = float(np.median(e["p_max"]))
  out = collaborative.collaborative_inference(images, edge, server, _point(lam, 0.5, 0.6),
                                              server_batch=4)
  accepted = out["accepted"]
  np.testing.assert_array_equal(accepted, paper_rules.accepts(e["p_max"], lam))
  np.testing.assert_array_equal(out["pred"][accepted], e["pred"][accepted])
  assert not out["keep"][accepted].any() and (out["bytes"][accepted] == 0).all()
  expected_keep = paper_rules.threshold_keep(e["patch_scores"], 0.6)
  for i in np.flatnonzero(~accepted):
    np.testing.assert_array_equal(out["keep"][i], expected_keep[i])
    assert out["keep"][i].any()  # Eq. 25: never an empty transmission
    logits = _unpadded_server(server, images[i], out["keep"][i])
    assert out["pred"][i] == out["server_pred"][i] == int(np.argmax(logits))
    k = int(out["keep"][i].sum())
    assert out["bytes"][i] == payload.payload_bytes(k) == len(payload.encode_payload(
        np.asarray(patches.gather_patches(images[i:i + 1], np.flatnonzero(
            out["keep"][i])[None]))[0], np.flatnonzero(out["keep"][i])))
  if lam == np.inf:
    assert not accepted.any()
  if lam == 0.0:
    assert accepted.all() and (out["server_pred"] == -1).all()
