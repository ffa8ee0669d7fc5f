"""One bad client must not hurt the others: `rcst serve` refuses what it cannot
serve alone, by name and in one log line, and refuses options, addresses and
busy ports before compiling; the edge never uses an answer from other
weights, and its retries are bounded in time, remembering a server found
down. All on loopback, each test in seconds."""

import logging
import os
import socket
import threading
import time

import numpy as np
import pytest

grpc = pytest.importorskip("grpc")  # the [serve] extra

import small_models  # noqa: E402
from support import WEIGHTS  # noqa: E402

from rcst_edge import errors  # noqa: E402
from rcst_edge.link import protocol  # noqa: E402
from rcst_edge.link import rcst_pb2 as pb  # noqa: E402
from rcst_edge.link.client import (  # noqa: E402
  Expect,
  RemoteServer,
  ServerOtherWeights,
  ServerRefused,
  ServerUnreachable,
)
from rcst_edge.link.retry import DownMemory, Retry  # noqa: E402
from rcst_edge.payload import message as payload  # noqa: E402
from rcst_edge.payload.geometry import Geometry  # noqa: E402
from rcst_jax import cli  # noqa: E402
from rcst_jax.cli import serve as serve_cli  # noqa: E402
from rcst_jax.inference import collaborative  # noqa: E402
from rcst_jax.inference.server import Server  # noqa: E402
from rcst_jax.serving import service  # noqa: E402
from rcst_jax.serving.batcher import DynamicBatcher  # noqa: E402
from rcst_jax.serving.service import RcstServer, ServeOptions  # noqa: E402

GEO = Geometry()
SMALL = (16, 64)  # buckets that cannot hold a whole image (196 patches)


@pytest.fixture(scope="module")
def model():
  return small_models.server()


@pytest.fixture(scope="module")
def small_buckets(model):
  """A server with the buckets `rcst serve` now refuses at start (the check
  skipped here): its per-request check alone keeps a 100-patch payload out
  of its batches."""
  with pytest.MonkeyPatch.context() as m:
    m.setattr(ServeOptions, "check", lambda self, geometry: None)
    srv = RcstServer(model, "127.0.0.1:0", ServeOptions(batch=4, buckets=SMALL, max_wait_ms=50))
  yield srv
  srv.stop(0)


def _with_k(ks, seed=0, codec="jpeg420:50"):
  rng = np.random.default_rng(seed)
  out = []
  for k in ks:
    keep = np.zeros(196, bool)
    keep[rng.choice(196, k, replace=False)] = True
    out.append(payload.encode_image_payload(rng.integers(0, 256, (224, 224, 3), np.uint8),
                                            keep, GEO, codec))
  return out


def _dead_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _bad_requests():
  """(what, raw request bytes for Classify, the error it must be refused with)."""
  big = _with_k([100], seed=9)[0]
  good = _with_k([10], seed=8)[0]
  corrupt = good[:-1] + bytes([good[-1] ^ 1])
  other_grid = payload.encode_payload(np.zeros((2, 16, 16, 3), np.uint8), np.array([0, 5]),
                                      grid=7)
  wrap = lambda p: pb.ClassifyRequest(payload=p).SerializeToString()  # noqa: E731
  return [("too many patches", wrap(big), "100 patches exceed this server's largest bucket, 64"),
          ("corrupted", wrap(corrupt), "CRC-32 mismatch"),
          ("other grid", wrap(other_grid), "7x7 grid"),
          ("malformed protobuf", b"\x0a\x05ab", "malformed ClassifyRequest")]


def test_bad_requests_among_concurrent_good_ones_hurt_only_themselves(model, small_buckets,
                                                                      caplog, capfd):
  caplog.set_level(logging.INFO)
  good = _with_k([10] * 24, seed=1)
  bad = _bad_requests()
  batch_bad = _with_k([100], seed=2)[0]
  client = RemoteServer(small_buckets.address, retry=Retry(0))
  raw = client.channel.unary_unary(protocol.path(protocol.CLASSIFY))  # bytes as they are
  got, refused = {}, {}
  gate = threading.Barrier(len(good) + len(bad) + 2)

  def ask_good(i):
    gate.wait()
    got[i] = client.classify(good[i])

  def ask_bad(j):
    gate.wait()
    try:
      raw(bad[j][1], timeout=10)
    except grpc.RpcError as e:
      refused[j] = e

  def ask_batch(j):  # good payloads with a bad one among them, in one call
    gate.wait()
    got[("batch", j)] = client.classify_batch([good[j], batch_bad, good[j + 1]])
  threads = [threading.Thread(target=ask_good, args=(i,)) for i in range(len(good))]
  threads += [threading.Thread(target=ask_bad, args=(j,)) for j in range(len(bad))]
  threads += [threading.Thread(target=ask_batch, args=(j,)) for j in (0, 2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(60)
  # Every good request answered, bit for bit as the in-process server answers it.
  want = Server(model, 4, SMALL, row_by_row=True).logits_from_payloads(good)
  for i in range(len(good)):
    np.testing.assert_array_equal(got[i].logits, want[i])
  assert max(got[i].batch_requests for i in range(len(good))) > 1  # they were batched
  for j in (0, 2):
    first, middle, last = got[("batch", j)]
    np.testing.assert_array_equal(first.logits, want[j])
    np.testing.assert_array_equal(last.logits, want[j + 1])
    assert isinstance(middle, ServerRefused) and "payload 1: 100 patches exceed" in str(middle)
  # Each bad one refused alone, INVALID_ARGUMENT, naming why.
  for j, (what, _, why) in enumerate(bad):
    assert refused[j].code() == grpc.StatusCode.INVALID_ARGUMENT, what
    assert why in refused[j].details(), (what, refused[j].details())
  # Whatever the method, a request that is not its protobuf message is named.
  for method, request in ((protocol.CLASSIFY_BATCH, "ClassifyBatchRequest"),
                          (protocol.DESCRIBE, "DescribeRequest")):
    with pytest.raises(grpc.RpcError) as e:
      client.channel.unary_unary(protocol.path(method))(b"\xff\xff", timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"malformed {request}" in e.value.details()
  # One log line per refused request or payload, no traceback, nothing from gRPC.
  lines = [r for r in caplog.records if r.name == "rcst_jax.serving.service"]
  assert len(lines) == len(bad) + 2 + 2, [r.getMessage() for r in lines]
  assert all(r.getMessage().startswith("refused ") and r.exc_info is None for r in lines)
  assert not [r for r in caplog.records if r.name.startswith("grpc")]
  assert "Traceback" not in capfd.readouterr().err
  client.close()


def test_a_batch_that_fails_is_answered_request_by_request():
  """Should a batch fail anyway (a bug), each request runs again alone and only
  the one that fails on its own gets the error."""
  def run(items):
    if "bad" in items:
      raise RuntimeError("bad item")
    return np.array([[float(len(x))] for x in items])
  batcher = DynamicBatcher(run, max_requests=8, max_wait_s=0.5)
  try:
    with batcher.arriving() as a, batcher.arriving() as b, batcher.arriving() as c:
      pending = [a.submit("ok"), b.submit("bad"), c.submit("okay")]
    assert pending[0].result(10).logits[0] == 2 and pending[2].result(10).logits[0] == 4
    with pytest.raises(RuntimeError, match="bad item"):
      pending[1].result(10)
  finally:
    batcher.close()


def _no_compiling(monkeypatch):
  def refuse(*a, **k):
    raise AssertionError("compiled although the start-up was refused")
  monkeypatch.setattr(service.Server, "warm_up", refuse)


def test_buckets_that_cannot_hold_an_image_are_refused_before_compiling(model, monkeypatch,
                                                                        capsys):
  _no_compiling(monkeypatch)
  with pytest.raises(errors.ConfigError, match=r"the largest, 64, cannot hold a whole image "
                                               r"\(196 patches"):
    RcstServer(model, "127.0.0.1:0", ServeOptions(buckets=SMALL))
  for bad, named in ((dict(buckets=(0, 196)), "buckets must be integers >= 1"),
                     (dict(buckets=("64", 196)), "buckets must be integers >= 1"),
                     (dict(max_wait_ms=float("nan")), "max_wait_ms must be"),
                     (dict(max_wait_ms=-1), "max_wait_ms must be"),
                     (dict(max_message_bytes=1 << 40), "max_message_bytes must be")):
    with pytest.raises(errors.ConfigError, match=named):
      RcstServer(model, "127.0.0.1:0", ServeOptions(**bad))
  monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # rcst serve tunes it
  assert cli.main(["serve", "--server", f"{WEIGHTS}/demo_server", "--address",
                   "127.0.0.1:0", "--buckets", "16,64"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("rcst serve: error: buckets 16,64: the largest, 64, cannot hold")
  assert "Traceback" not in err


def test_a_port_in_use_is_refused_before_compiling(model, monkeypatch, capsys):
  _no_compiling(monkeypatch)
  monkeypatch.setattr(serve_cli, "load_model", lambda *a: pytest.fail("loaded a model"))
  monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
  with socket.create_server(("127.0.0.1", 0)) as busy:  # another rcst serve, say
    port = busy.getsockname()[1]
    with pytest.raises(errors.RcstError, match=f"port {port} is in use"):
      RcstServer(model, f"127.0.0.1:{port}", ServeOptions(buckets=(16, 196)))
    t0 = time.perf_counter()
    assert cli.main(["serve", "--server", f"{WEIGHTS}/demo_server",
                     "--address", f"127.0.0.1:{port}"]) == 2
    assert time.perf_counter() - t0 < 5
  assert capsys.readouterr().err == (f"rcst serve: error: cannot listen on 127.0.0.1:{port}: "
                                     f"port {port} is in use (another rcst serve?)\n")


SERVE = ["serve", "--server", "somewhere"]
RUN = ["run", "--edge", "e", "--calibration", "c", "--server", "127.0.0.1:1", "x.png"]


@pytest.mark.parametrize("argv, named", [
    (SERVE + ["--address", "nonsense"], "argument --address: must be HOST:PORT"),
    (SERVE + ["--address", "127.0.0.1:70000"], "argument --address: must be HOST:PORT"),
    (SERVE + ["--buckets", "16,x"], "argument --buckets: must be comma-separated integers"),
    (SERVE + ["--buckets", "0,196"], "argument --buckets: must be comma-separated integers"),
    (SERVE + ["--max-wait-ms", "-1"], "argument --max-wait-ms: must be a number in [0, 1000]"),
    (SERVE + ["--max-wait-ms", "nan"], "argument --max-wait-ms: must be a number in [0, 1000]"),
    (SERVE + ["--max-wait-ms", "inf"], "argument --max-wait-ms: must be a number in [0, 1000]"),
    (SERVE + ["--max-message-bytes", str(1 << 40)],
     "argument --max-message-bytes: must be an integer in 1..67108864"),
    (RUN + ["--retries", "-1"], "argument --retries: must be an integer in 0..10"),
    (RUN + ["--retries", "12"], "argument --retries: must be an integer in 0..10"),
    (RUN + ["--retries", "1.5"], "argument --retries: must be an integer in 0..10"),
    (RUN + ["--call-budget", "0"], "argument --call-budget: must be a number in (0, 600]"),
    (RUN + ["--down-for", "-1"], "argument --down-for: must be a number in [0, 3600]"),
])
def test_bad_link_flags_are_refused_by_name(argv, named, capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(argv)
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert named in err and "Traceback" not in err, err


def test_the_command_line_caps_are_the_servings():
  assert serve_cli.MAX_MESSAGE_BYTES == protocol.MAX_REQUEST_BYTES
  assert serve_cli.MAX_WAIT_MS == service.MAX_WAIT_MS


def test_an_answer_from_other_weights_is_never_used(model):
  srv = RcstServer(model, "127.0.0.1:0", ServeOptions(batch=4, buckets=SMALL + (196,)))
  data = _with_k([10, 30, 0], seed=4)
  ours = srv.service.digest
  try:
    # Checked at Describe, and on every answer: the server swapped its weights after.
    client = RemoteServer(srv.address, expect=Expect(ours))
    assert client.verify().model_digest == ours
    assert client.classify(data[0]).model_digest == ours
    srv.service.digest = "blake2b:" + "0" * 64  # as if restarted with other weights
    with pytest.raises(ServerOtherWeights, match="other weights"):
      client.classify(data[0])
    assert all(isinstance(r, ServerOtherWeights) for r in client.classify_batch(data))
    # `rcst run`'s transmit: those images keep the edge's answer, marked, with a warning.
    images = np.random.default_rng(5).integers(0, 256, (3, 224, 224, 3), np.uint8)
    keep = np.ones((3, 196), bool)
    for send in ("each", "batch"):
      with pytest.warns(UserWarning, match="marked server_other_weights"):
        out = collaborative.transmit(images, np.array([True, True, False]), keep,
                                     np.array([3, 4, 5]), GEO, remote=client, send=send)
      assert list(out["status"]) == ["server_other_weights"] * 2 + ["edge"]
      assert list(out["pred"]) == [3, 4, 5]
    with pytest.raises(ServerOtherWeights):
      collaborative.transmit(images, np.array([True, False, False]), keep, np.zeros(3, int),
                             GEO, remote=client, on_server_error="fail")
    client.close()
    # --allow-other-weights: used, with a warning once.
    allowed = RemoteServer(srv.address, expect=Expect(ours, allow_other_weights=True))
    with pytest.warns(UserWarning, match="used anyway"):
      allowed.classify(data[0])
    allowed.close()
  finally:
    srv.stop(0)


def test_a_server_not_described_at_connect_is_checked_before_its_first_answer(model):
  """The probe that skipped the weight check: Describe fails at connect; the
  server then comes up with other weights. No answer of it is used."""
  port = _dead_port()
  client = RemoteServer(f"127.0.0.1:{port}", deadline_s=0.2,
                        retry=Retry(2, budget_s=2, down_for_s=0),
                        expect=Expect("blake2b:" + "1" * 64))
  with pytest.raises(ServerUnreachable):
    client.verify()
  srv = RcstServer(model, f"127.0.0.1:{port}", ServeOptions(batch=4, buckets=SMALL + (196,)))
  data = _with_k([10])[0]
  try:
    with pytest.raises(ServerOtherWeights, match=srv.service.digest):
      client.classify(data)  # Describe first, then refused
    assert client._described.model_digest == srv.service.digest
    with pytest.raises(ServerOtherWeights):  # and every later answer, by its own digest
      client.classify(data)
    # An older server sends no digest with its answers: its Describe's stands for them.
    reply = srv.service._reply
    srv.service._reply = lambda answer, decode_s, digest=True: reply(answer, decode_s, False)
    with pytest.raises(ServerOtherWeights):
      client.classify(data)
    trusting = RemoteServer(srv.address, expect=Expect(srv.service.digest))
    r = trusting.classify(data)
    assert r.model_digest == "" and trusting._described.model_digest == srv.service.digest
    trusting.close()
  finally:
    client.close()
    srv.stop(0)


def test_backoff_is_capped_jittered_and_seeded():
  retry = Retry(10, backoff_s=0.25, cap_s=2.0, seed=3)
  rng = retry.rng()
  pauses = [retry.pause(a, rng) for a in range(12)]
  for a, p in enumerate(pauses):
    full = min(2.0, 0.25 * 2 ** a)
    assert full / 2 <= p <= full
  assert sum(pauses) <= 0.25 + 0.5 + 1 + 2 * 9  # capped: 10 retries pause 20 s at most
  again = Retry(10, seed=3).rng()
  assert pauses == [retry.pause(a, again) for a in range(12)]  # seeded
  assert pauses != [retry.pause(a, Retry(10, seed=4).rng()) for a in range(12)]  # jittered
  for bad in (dict(retries=-1), dict(retries=11), dict(retries=1.5), dict(budget_s=0),
              dict(budget_s=float("nan")), dict(down_for_s=-1)):
    with pytest.raises(errors.ConfigError):
      Retry(**bad)


def test_retries_end_within_the_budget_and_a_down_server_is_remembered():
  address = f"127.0.0.1:{_dead_port()}"
  # 10 retries with 5 s deadlines would take a minute; the budget stops them.
  client = RemoteServer(address, deadline_s=5, retry=Retry(10, budget_s=0.6, down_for_s=30,
                                                            seed=0))
  t0 = time.perf_counter()
  with pytest.raises(ServerUnreachable, match="budget 0.6 s"):
    client.classify(_with_k([10])[0])
  assert time.perf_counter() - t0 < 0.6 + 0.5
  # Found down: the remaining images cost nothing, then the window ends.
  images = np.random.default_rng(6).integers(0, 256, (8, 224, 224, 3), np.uint8)
  t0 = time.perf_counter()
  out = collaborative.transmit(images, np.ones(8, bool), np.ones((8, 196), bool),
                               np.arange(8), GEO, remote=client)
  assert time.perf_counter() - t0 < 0.5
  assert list(out["status"]) == ["server_unreachable"] * 8 and list(out["pred"]) == list(range(8))
  client.close()
  # A fresh client: eight images cost about one budget, not eight.
  fresh = RemoteServer(address, deadline_s=5, retry=Retry(10, budget_s=0.6, seed=0))
  t0 = time.perf_counter()
  out = collaborative.transmit(images, np.ones(8, bool), np.ones((8, 196), bool),
                               np.arange(8), GEO, remote=fresh)
  assert time.perf_counter() - t0 < 0.6 + 1.0
  assert set(out["status"]) == {"server_unreachable"}
  fresh.close()


def test_the_down_window_ends():
  now = [0.0]
  down = DownMemory(30, clock=lambda: now[0])
  assert down.why() is None
  down.mark("UNAVAILABLE after 4 attempts")
  now[0] = 29.0
  assert "found down 29.0 s ago, not called again for 1.0 s" in down.why()
  now[0] = 30.5
  assert down.why() is None  # tried again
  DownMemory(0).mark("x")  # 0: never remembered
