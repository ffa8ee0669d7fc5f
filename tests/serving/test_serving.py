"""`rcst serve` and the networked edge on loopback: dynamic batching gives
the single-request logits bit for bit, `rcst run --server HOST:PORT` answers
as the in-process run (counting wire bytes only with --meter), and bad
requests, a dead or slow server and a restart are answered with named errors
while the server keeps serving."""

import json
import os
import socket
import sys
import threading
import time

import jax
import numpy as np
import pytest

grpc = pytest.importorskip("grpc")  # the [serve] extra; `make test` installs it

import small_models  # noqa: E402
from support import BENCHMARKS, WEIGHTS, image_files  # noqa: E402

from rcst_edge.link import client as client_lib  # noqa: E402
from rcst_edge.link import protocol  # noqa: E402
from rcst_edge.link import rcst_pb2 as pb  # noqa: E402
from rcst_edge.link.client import RemoteServer, ServerRefused, ServerUnreachable  # noqa: E402
from rcst_edge.link.meter import Link  # noqa: E402
from rcst_edge.link.retry import Retry  # noqa: E402
from rcst_edge.payload import message as payload  # noqa: E402
from rcst_edge.payload.geometry import Geometry  # noqa: E402
from rcst_jax import cli  # noqa: E402
from rcst_jax.inference.server import Server  # noqa: E402
from rcst_jax.serving.batcher import DynamicBatcher  # noqa: E402
from rcst_jax.serving.service import RcstServer, ServeOptions  # noqa: E402

# The kernel shaper is benchmark tooling (benchmarks/tbf.py), tested here.
sys.path.insert(0, BENCHMARKS)
import tbf  # noqa: E402

BUCKETS = (16, 64, 196)
GEO = Geometry()


@pytest.fixture(scope="module")
def model():
  return small_models.server()


@pytest.fixture(scope="module")
def served(model):
  srv = RcstServer(model, "127.0.0.1:0", ServeOptions(batch=4, buckets=BUCKETS, max_wait_ms=20))
  yield srv
  srv.stop(0)


def _payloads(n, seed=0, codec="jpeg420:50"):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, 224, 224, 3), dtype=np.uint8)
  keep = rng.random((n, 196)) < rng.uniform(0.02, 0.9, (n, 1))
  keep[:, 0] = True
  return [payload.encode_image_payload(images[i], keep[i], GEO, codec) for i in range(n)]


def _alone(model, data):
  """The single-request path, written without Server or the service: decode
  one payload, pad it to its bucket (padding slots: index 0, zero pixels,
  masked) and run the model's token path jitted at batch 1."""
  fn = jax.jit(lambda v, sent, idx, valid: model.module.apply(v, sent, idx, valid,
                                                              method="tokens")[0])
  out = []
  for d in data:
    dec = payload.decode_payload(d)
    k = len(dec.idx)
    size = min(b for b in BUCKETS if b >= k)
    sent = np.zeros((1, size, 16, 16, 3), np.uint8)
    sent[0, :k] = dec.patches
    idx = np.zeros((1, size), np.int32)
    idx[0, :k] = dec.idx
    out.append(np.asarray(fn(model.variables, sent, idx, np.arange(size)[None] < k))[0])
  return out


def test_the_protocol_is_rcst_proto():
  """The names and messages both ends build from are the ones rcst.proto declares."""
  service = pb.DESCRIPTOR.services_by_name["Server"]
  assert service.full_name == protocol.SERVICE
  assert {m.name: (m.input_type.name, m.output_type.name) for m in service.methods} == {
      name: (request.DESCRIPTOR.name, reply.DESCRIPTOR.name)
      for name, (request, reply) in protocol.METHODS.items()}


def test_batched_answers_are_the_single_request_logits(model, served):
  data = _payloads(12)
  want = _alone(model, data)
  # The in-process server gives them too, in one call of every payload at once.
  srv = Server(model, 4, BUCKETS, row_by_row=True)
  for got, w in zip(srv.logits_from_payloads(data), want):
    np.testing.assert_array_equal(got, w)
  # It ran the real rows only (bucket slots, no padded rows).
  assert srv.stats.processed == sum(b["rows"] * (bucket + 1)
                                    for bucket, b in srv.stats.by_bucket.items())
  client = RemoteServer(served.address, metered=True)
  got = [None] * len(data)

  def ask(i):
    got[i] = client.classify(data[i])
  threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(data))]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert max(r.batch_requests for r in got) > 1  # they were batched...
  for r, w in zip(got, want):
    np.testing.assert_array_equal(r.logits, w)  # ...and answered bit for bit as alone
  # Sequential requests: each its own wire bytes. Framing up is HEADERS (18 B
  # once HPACK has indexed the fields; grpc-timeout is re-sent by index when
  # gRPC sent a close value before, else as a 10-byte literal), one stream
  # WINDOW_UPDATE (13) and the DATA frame, gRPC and protobuf prefixes (17; 9
  # more per 16 KiB frame past the first); no connection WINDOW_UPDATE per
  # reply (the client's small lookahead window).
  extra = []
  for d in data[:6]:
    r = client.classify(d)
    assert len(d) < r.wire_up and r.wire_down > 4 * model.num_classes
    extra.append(r.wire_up - len(d) - 9 * ((len(d) + 8) // 16384))
  assert np.median(extra) < 52, extra
  client.close()


def test_a_batch_call_answers_each_payload_as_alone_or_with_its_own_error(model, served):
  data = _payloads(9, seed=7)
  want = _alone(model, data)
  client = RemoteServer(served.address, metered=True)
  # A malformed payload among them is refused by name; the rest are answered.
  got = client.classify_batch(data[:4] + [b"not a payload"] + data[4:])
  assert isinstance(got[4], ServerRefused) and "payload 4:" in str(got[4])
  assert got[4].code == grpc.StatusCode.INVALID_ARGUMENT
  del got[4]
  for r, w in zip(got, want):
    np.testing.assert_array_equal(r.logits, w)
  assert max(r.batch_requests for r in got) > 1
  # The call's wire bytes, shared by payload size, add up to the link's count;
  # the framing a payload bears is a fraction of a call of its own (48 B).
  up0 = client.link.totals()[0]
  got = client.classify_batch(data)
  up = client.link.totals()[0] - up0
  assert sum(r.wire_up for r in got) == up
  assert all(r.wire_up >= len(d) for r, d in zip(got, data))
  assert (up - sum(map(len, data))) / len(data) < 24
  # Over the server's limits the client splits: 3 payloads a call, and whole
  # raw payloads (150 KB each) one per call under the size cap; a payload over
  # the cap alone is refused as too large, the others answered.
  client._limits = (3, client._limits[1])
  for r, w in zip(client.classify_batch(data), want):
    np.testing.assert_array_equal(r.logits, w)
  images = np.random.default_rng(8).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
  raw = [payload.encode_image_payload(x, np.ones(196, bool), GEO, "raw") for x in images]
  assert sum(map(len, raw)) > served.service.max_message_bytes
  got = client.classify_batch([raw[0], b"x" * (served.service.max_message_bytes + 1), raw[1]])
  assert got[1].code == grpc.StatusCode.RESOURCE_EXHAUSTED
  for r, w in zip([got[0], got[2]], _alone(model, raw)):
    np.testing.assert_array_equal(r.logits, w)
  # Unmetered, the same answers and no wire bytes.
  plain = RemoteServer(served.address)
  got = plain.classify_batch(data[:3])
  assert all(r.wire_up is r.wire_down is None for r in got)
  for r, w in zip(got, want):
    np.testing.assert_array_equal(r.logits, w)
  plain.close()
  # The server's own cap on payloads per call, named.
  with pytest.raises(ServerRefused, match="65 payloads in one call") as e:
    client._call(client._classify_batch, pb.ClassifyBatchRequest(payloads=[b""] * 65))
  assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
  client.close()


def test_bad_requests_get_named_errors_and_the_server_keeps_serving(model, served):
  good = _payloads(1, seed=3)[0]
  client = RemoteServer(served.address, retry=Retry(0))
  for bad, what in ((b"not a payload", "payload:"), (good[:len(good) // 2], "payload:"),
                    (good[:-1] + bytes([good[-1] ^ 1]), "payload:"), (b"", "payload:")):
    with pytest.raises(ServerRefused, match=what) as e:
      client.classify(bad)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
  # A payload for another grid: the geometry check names both.
  other = payload.encode_payload(np.zeros((2, 16, 16, 3), np.uint8), np.array([0, 5]), grid=7)
  with pytest.raises(ServerRefused, match="7x7 grid"):
    client.classify(other)
  with pytest.raises(ServerRefused, match="RESOURCE_EXHAUSTED") as e:
    client.classify(b"x" * (served.service.max_message_bytes + 1))
  # A slow client trickling a broken HTTP/2 preface holds a connection, not the server.
  slow = socket.create_connection(("127.0.0.1", served.port))
  slow.sendall(b"PRI * HTTP/2.0\r\n")
  r = client.classify(good)
  np.testing.assert_array_equal(r.logits, _alone(model, [good])[0])
  assert not client.metered and r.wire_up is r.wire_down is None  # unmetered by default
  slow.close()
  client.close()


def test_unreachable_server_is_retried_then_named(model):
  with socket.socket() as s:  # a port nobody listens on
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  client = RemoteServer(f"127.0.0.1:{port}", deadline_s=0.3, retry=Retry(2, backoff_s=0.05))
  t0 = time.perf_counter()
  with pytest.raises(ServerUnreachable, match="after 3 attempts"):
    client.classify(_payloads(1)[0])
  assert time.perf_counter() - t0 < 5
  client.close()


def test_past_deadline_is_deadline_exceeded(model):
  # A server whose calls take 2 s: a 0.3 s deadline is exceeded, retried, named.
  srv = RcstServer(model, "127.0.0.1:0", ServeOptions(batch=4, buckets=BUCKETS))
  run = srv.service.batcher._run
  srv.service.batcher._run = lambda items: time.sleep(2) or run(items)
  try:
    client = RemoteServer(srv.address, deadline_s=0.3, retry=Retry(1, backoff_s=0.01))
    with pytest.raises(ServerUnreachable, match="DEADLINE_EXCEEDED after 2 attempts"):
      client.classify(_payloads(1)[0])
    client.close()
  finally:
    srv.stop(0)


def test_a_server_restart_is_survived(model):
  srv = RcstServer(model, "127.0.0.1:0", ServeOptions(batch=4, buckets=BUCKETS))
  port, data = srv.port, _payloads(3, seed=7)
  client = RemoteServer(srv.address, deadline_s=2, retry=Retry(6, backoff_s=0.2))
  first = client.classify(data[0])
  srv.stop(0)
  restarted = []
  threading.Timer(0.5, lambda: restarted.append(
      RcstServer(model, f"127.0.0.1:{port}", ServeOptions(batch=4, buckets=BUCKETS)))).start()
  try:
    again = client.classify(data[0])  # retried with backoff while the server is down
    assert again.attempts > 1
    np.testing.assert_array_equal(again.logits, first.logits)
    client.classify(data[1])
  finally:
    client.close()
    deadline = time.time() + 60
    while not restarted and time.time() < deadline:
      time.sleep(0.1)
    for s in restarted:
      s.stop(0)


def test_link_paces_at_its_rate_and_adds_its_delay():
  # An echo server behind a 2 Mb/s link with 20 ms each way.
  echo = socket.create_server(("127.0.0.1", 0))

  def serve():
    conn, _ = echo.accept()
    while data := conn.recv(65536):
      conn.sendall(data)
    conn.close()
  threading.Thread(target=serve, daemon=True).start()
  link = Link(echo.getsockname(), rate_bps=2e6, delay_s=0.02)
  c = socket.create_connection(("127.0.0.1", link.port))
  c.sendall(b"x")
  c.recv(1)  # connection set up
  n, t0, got = 50_000, time.perf_counter(), 0
  c.sendall(b"y" * n)
  while got < n:
    got += len(c.recv(65536))
  took = time.perf_counter() - t0
  # Both ways paced at 2 Mb/s and pipelined in 1,500-byte pieces: n*8/rate,
  # plus one piece the other way and two delays.
  want = n * 8 / 2e6 + 1500 * 8 / 2e6 + 0.04
  assert want * 0.9 < took < want * 1.3, (took, want)
  assert link.totals() == (n + 1, n + 1)
  c.close()
  link.close()
  echo.close()


_TBF_PROBE = """
import socket, sys, threading, time
sys.path.insert(0, sys.argv[1])
from tbf import TbfLoopback
tbf = TbfLoopback()
tbf.set(2e6)
echo = socket.create_server(("127.0.0.1", 0))
def serve():
  conn, _ = echo.accept()
  while data := conn.recv(65536):
    conn.sendall(data)
threading.Thread(target=serve, daemon=True).start()
c = socket.create_connection(echo.getsockname())
c.sendall(b"x"); c.recv(1)
time.sleep(0.05)  # the bucket refills
sent0, n, got = tbf.sent_bytes(), 40_000, 0
t0 = time.perf_counter()
c.sendall(b"y" * n)
while got < n:
  got += len(c.recv(65536))
took = time.perf_counter() - t0
time.sleep(0.05)  # the last ACKs
print(took, tbf.sent_bytes() - sent0)
"""


@pytest.mark.skipif(not tbf.tbf_available(),
                    reason="needs root, unshare, ip and tc with the tbf qdisc")
def test_kernel_tbf_link_paces_at_its_rate():
  # 40 kB echoed through a 2 Mb/s tbf on a private namespace's loopback: both
  # directions share the one qdisc, so the time is all the qdisc's bytes
  # (payload twice, TCP/IP headers, ACKs) over the rate, less one burst.
  import subprocess
  out = subprocess.run(["unshare", "--net", sys.executable, "-c", _TBF_PROBE, BENCHMARKS],
                       capture_output=True, text=True, timeout=60, check=True).stdout
  took, on_link = (float(x) for x in out.split())
  assert 80_000 < on_link < 90_000, on_link
  want = float(tbf.transmit_s(on_link, 2e6, tbf.TbfLoopback.BURST))
  assert want * 0.9 < took < want * 1.15, (took, want)


@pytest.fixture(scope="module")
def demo_served():
  from rcst_jax.models.checkpoints import load_model
  srv = RcstServer(load_model(os.path.join(WEIGHTS, "demo_server")), "127.0.0.1:0",
                   ServeOptions(batch=8, buckets=BUCKETS))
  yield srv
  srv.stop(0)


def test_run_against_rcst_serve_answers_as_the_in_process_run(demo_served, calibration,
                                                             tmp_path, capsys):
  paths = image_files(tmp_path, n=6)
  common = ["run", "--edge", f"{WEIGHTS}/demo_edge", "--calibration", str(calibration),
            "--tau", "0.5", "--codec", "jpeg420:50", *paths]
  capsys.readouterr()
  assert cli.main([*common, "--server", f"{WEIGHTS}/demo_server"]) == 0
  local = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
  assert cli.main([*common, "--server", demo_served.address, "--meter"]) == 0
  remote = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
  assert [r["image"] for r in remote] == paths
  offloaded = 0
  for a, b in zip(local, remote):
    for k in ("prediction", "accepted_on_edge", "sent_indices", "bytes_sent", "status"):
      assert a[k] == b[k], (k, a, b)
    if b["status"] == "server":
      offloaded += 1
      assert b["bytes_sent"] < b["wire_bytes_up"] < b["bytes_sent"] + 200
      assert b["rtt_ms"] >= b["server_ms"] > 0
  assert offloaded >= 1
  # --send batch: the same answers, the offloaded images of each edge batch in
  # one call whose wire bytes they share (each still above its payload).
  assert cli.main([*common, "--server", demo_served.address, "--send", "batch",
                   "--batch-size", "3", "--meter"]) == 0
  batched = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
  assert [b["image"] for b in batched] == paths
  for a, b in zip(local, batched):
    for k in ("prediction", "accepted_on_edge", "sent_indices", "bytes_sent", "status"):
      assert a[k] == b[k], (k, a, b)
    if b["status"] == "server":
      assert b["bytes_sent"] < b["wire_bytes_up"] < b["bytes_sent"] + 200
  # A server that is not there: the edge's answers, marked; or an error with --on-server-error fail.
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    dead = [*common, "--server", f"127.0.0.1:{s.getsockname()[1]}", "--deadline", "0.2",
            "--retries", "1"]
  with pytest.warns(UserWarning, match="after 2 attempts"):
    assert cli.main(dead) == 0
  fallback = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
  for a, b in zip(local, fallback):
    assert b["status"] == ("edge" if a["accepted_on_edge"] else "server_unreachable")
    assert b["bytes_sent"] == a["bytes_sent"]
    assert "wire_bytes_up" not in b  # not metered
    assert b["status"] == "edge" or b["prediction"] == _edge_pred(b)
  assert cli.main([*dead, "--on-server-error", "fail"]) == 2
  assert "after 2 attempts" in capsys.readouterr().err
  with pytest.warns(UserWarning, match="after 2 attempts"):
    assert cli.main([*dead, "--send", "batch"]) == 0
  assert [json.loads(x)["status"] for x in capsys.readouterr().out.strip().splitlines()] \
      == [b["status"] for b in fallback]


def test_run_refuses_a_server_with_other_weights_unless_allowed(served, calibration, tmp_path,
                                                                capsys):
  """`served` runs the small test model, not the weights the demo calibration
  was made for: refused at connect, or with --allow-other-weights used with
  a warning (tests/serving/test_serving_faults.py: answers from other weights later)."""
  common = ["run", "--edge", f"{WEIGHTS}/demo_edge", "--calibration", str(calibration),
            "--tau", "0.5", "--server", served.address, *image_files(tmp_path, n=3)]
  capsys.readouterr()
  assert cli.main(common) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"rcst run: error: the server at {served.address} answers from other "
                        f"weights ({served.service.digest})"), err
  with pytest.warns(UserWarning, match="used anyway"):
    assert cli.main([*common, "--allow-other-weights"]) == 0


def _edge_pred(record):
  return record["edge_prediction"]


def test_run_meters_the_wire_only_when_asked(demo_served, calibration, tmp_path, capsys,
                                             monkeypatch):
  """Without --meter `rcst run --server HOST:PORT` opens no relay and prints no
  wire bytes; its answers are those of the metered run, which adds them."""
  relays = []
  monkeypatch.setattr(client_lib, "Link", lambda target: relays.append(target) or Link(target))
  common = ["run", "--edge", f"{WEIGHTS}/demo_edge", "--calibration", str(calibration),
            "--tau", "0.5", "--codec", "jpeg420:50", "--server", demo_served.address,
            *image_files(tmp_path, n=6)]
  capsys.readouterr()
  runs = {}
  for meter in ([], ["--meter"]):
    opened = len(relays)
    assert cli.main([*common, *meter]) == 0
    assert len(relays) - opened == len(meter)  # one relay with --meter, none without
    runs[bool(meter)] = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
  plain, metered = runs[False], runs[True]
  assert any(r["status"] == "server" for r in plain)
  for a, b in zip(plain, metered):
    assert set(b) - set(a) == {"wire_bytes_up", "wire_bytes_down"}
    for k in ("image", "prediction", "edge_prediction", "accepted_on_edge", "p_max", "aps_set",
              "sent_indices", "patches_sent", "codec", "bytes_sent", "status"):
      assert a[k] == b[k], (k, a, b)


def test_rcst_serve_command_listens_reports_health_and_stops_on_sigterm():
  import signal
  import subprocess
  import sys

  from grpc_health.v1 import health_pb2, health_pb2_grpc
  proc = subprocess.Popen([sys.executable, "-m", "rcst_jax.cli", "serve", "--server",
                           f"{WEIGHTS}/demo_server", "--address", "127.0.0.1:0",
                           "--buckets", "64,196", "--batch", "2", "--calls-in-flight", "3"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    line = json.loads(proc.stdout.readline())
    assert line["serving"].startswith("127.0.0.1:") and line["shapes_compiled"] == 2
    assert line["calls_in_flight"] == 3
    with grpc.insecure_channel(line["serving"]) as ch:
      status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""),
                                                   timeout=10)
      assert status.status == health_pb2.HealthCheckResponse.SERVING
    client = RemoteServer(line["serving"])
    d = client.describe()
    assert (d.grid, d.patch, d.num_classes, list(d.buckets)) == (14, 16, 12, [64, 196])
    with pytest.raises(grpc.RpcError):  # not protobuf: refused, one line in its log
      client.channel.unary_unary(protocol.path(protocol.CLASSIFY))(b"\xff", timeout=10)
    client.close()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    log = proc.stderr.read().splitlines()
    refused = [x for x in log if x.startswith("rcst serve: refused Classify from ")]
    assert len(refused) == 1 and "INVALID_ARGUMENT: malformed ClassifyRequest" in refused[0]
    assert not any("Traceback" in x or "rcst_jax.serving" in x for x in log), log
  finally:
    proc.kill()


def test_serving_asks_xla_for_one_intra_op_thread_unless_told_otherwise(monkeypatch):
  from rcst_jax.core import xla_cpu
  monkeypatch.delenv("RCST_XLA_CPU_TUNING", raising=False)
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_prefer_vector_width=512")
  xla_cpu.tune_for_serving()
  assert os.environ["XLA_FLAGS"].split() == ["--xla_cpu_prefer_vector_width=512",
                                             "--xla_cpu_multi_thread_eigen=false",
                                             "intra_op_parallelism_threads=1"]
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true")  # the user's wins
  xla_cpu.tune_for_serving()
  assert os.environ["XLA_FLAGS"].split() == ["--xla_cpu_multi_thread_eigen=true",
                                             "intra_op_parallelism_threads=1"]
  monkeypatch.setenv("RCST_XLA_CPU_TUNING", "0")
  monkeypatch.setenv("XLA_FLAGS", "")
  xla_cpu.tune_for_serving()
  assert os.environ["XLA_FLAGS"] == ""


def test_a_batch_waits_only_while_more_may_come():
  """A lone request runs at once, not after max_wait; a request received and
  still decoding (inside `arriving`) is waited for and joins the batch; after
  a batch with company the next one waits its max_wait (under load the next
  requests are on the wire), after a lone one it does not."""
  calls = []
  batcher = DynamicBatcher(lambda items: calls.append(list(items)) or np.zeros((len(items), 2)),
                           max_requests=8, max_wait_s=1.0)

  def took(item):
    t0 = time.perf_counter()
    assert batcher.submit(item).result(timeout=10).batch_requests == 1
    return time.perf_counter() - t0
  try:
    assert took("lone") < 0.5
    with batcher.arriving() as second:
      with batcher.arriving() as first:
        one = first.submit("a")
      time.sleep(0.3)  # "b" is still decoding: the batch with "a" waits for it
      two = second.submit("b")
    assert one.result(timeout=10).batch_requests == two.result(timeout=10).batch_requests == 2
    assert took("c") > 0.9  # the batch before had company: "c" waits for more
    with batcher.arriving():  # received, then refused before it was submitted
      pass
    assert took("d") < 0.5  # quiet again
  finally:
    batcher.close()
  assert calls == [["lone"], ["a", "b"], ["c"], ["d"]]
