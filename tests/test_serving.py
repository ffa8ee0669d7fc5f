"""`rcst serve` and the networked edge on loopback: dynamic batching gives
the single-request logits bit for bit, `rcst run --server HOST:PORT` answers
as the in-process run, and bad requests, a dead or slow server and a restart
are answered with named errors while the server keeps serving."""

import json
import os
import socket
import threading
import time

import numpy as np
import pytest

grpc = pytest.importorskip("grpc")  # the [serve] extra; `make test` installs it

import small_models  # noqa: E402
from rcst_jax import cli  # noqa: E402
from rcst_jax.geometry import Geometry  # noqa: E402
from rcst_jax.inference import payload  # noqa: E402
from rcst_jax.inference.server import Server  # noqa: E402
from rcst_jax.serving.client import RemoteServer, ServerRefused, ServerUnreachable  # noqa: E402
from rcst_jax.serving.link import Link  # noqa: E402
from rcst_jax.serving.service import RcstServer, ServeOptions  # noqa: E402
from test_cli import _files, calibration  # noqa: E402,F401  (the smoke demo's calibration)

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


def test_batched_answers_are_the_single_request_logits(model, served):
  data = _payloads(12)
  # The single-request path, written independently of the service: one
  # payload per call of a Server with the service's shape per bucket.
  alone = Server(model, 4, BUCKETS, min_batch=4)
  want = [alone.logits_from_payloads([d])[0] for d in data]
  client = RemoteServer(served.address)
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
  # Sequential requests: each its own wire bytes, a few dozen bytes of framing.
  for d in data[:4]:
    r = client.classify(d)
    assert len(d) < r.wire_up < len(d) + 200 and r.wire_down > 4 * model.num_classes
  client.close()


def test_bad_requests_get_named_errors_and_the_server_keeps_serving(model, served):
  good = _payloads(1, seed=3)[0]
  client = RemoteServer(served.address, retries=0)
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
  np.testing.assert_array_equal(client.classify(good).logits,
                                Server(model, 4, BUCKETS, min_batch=4)
                                .logits_from_payloads([good])[0])
  slow.close()
  client.close()


def test_unreachable_server_is_retried_then_named(model):
  with socket.socket() as s:  # a port nobody listens on
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  client = RemoteServer(f"127.0.0.1:{port}", deadline_s=0.3, retries=2, backoff_s=0.05)
  t0 = time.perf_counter()
  with pytest.raises(ServerUnreachable, match="after 3 attempts"):
    client.classify(_payloads(1)[0])
  assert time.perf_counter() - t0 < 5
  client.close()


def test_past_deadline_is_deadline_exceeded(model):
  # A server whose batches wait 2 s: a 0.3 s deadline is exceeded, retried, named.
  srv = RcstServer(model, "127.0.0.1:0", ServeOptions(batch=4, buckets=BUCKETS,
                                                      max_wait_ms=2000))
  try:
    client = RemoteServer(srv.address, deadline_s=0.3, retries=1, backoff_s=0.01)
    with pytest.raises(ServerUnreachable, match="DEADLINE_EXCEEDED after 2 attempts"):
      client.classify(_payloads(1)[0])
    client.close()
  finally:
    srv.stop(0)


def test_a_server_restart_is_survived(model):
  srv = RcstServer(model, "127.0.0.1:0", ServeOptions(batch=4, buckets=BUCKETS))
  port, data = srv.port, _payloads(3, seed=7)
  client = RemoteServer(srv.address, deadline_s=2, retries=6, backoff_s=0.2)
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


@pytest.fixture(scope="module")
def demo_served():
  from rcst_jax.models.checkpoints import load_model
  srv = RcstServer(load_model(os.path.join(cli_weights(), "demo_server")), "127.0.0.1:0",
                   ServeOptions(batch=8, buckets=BUCKETS))
  yield srv
  srv.stop(0)


def cli_weights():
  return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights")


def test_run_against_rcst_serve_answers_as_the_in_process_run(demo_served, calibration,
                                                             tmp_path, capsys):
  paths = _files(tmp_path, n=6)
  common = ["run", "--edge", f"{cli_weights()}/demo_edge", "--calibration", str(calibration),
            "--tau", "0.5", "--codec", "jpeg420:50", *paths]
  capsys.readouterr()
  assert cli.main([*common, "--server", f"{cli_weights()}/demo_server"]) == 0
  local = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
  assert cli.main([*common, "--server", demo_served.address]) == 0
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
    assert "wire_bytes_up" in b and (b["status"] == "edge" or b["prediction"] == _edge_pred(b))
  assert cli.main([*dead, "--on-server-error", "fail"]) == 2
  assert "after 2 attempts" in capsys.readouterr().err


def _edge_pred(record):
  return record["edge_prediction"]


def test_rcst_serve_command_listens_reports_health_and_stops_on_sigterm():
  import signal
  import subprocess
  import sys
  from grpc_health.v1 import health_pb2, health_pb2_grpc
  proc = subprocess.Popen([sys.executable, "-m", "rcst_jax.cli", "serve", "--server",
                           f"{cli_weights()}/demo_server", "--address", "127.0.0.1:0",
                           "--buckets", "64,196", "--batch", "2"],
                          stdout=subprocess.PIPE, text=True)
  try:
    line = json.loads(proc.stdout.readline())
    assert line["serving"].startswith("127.0.0.1:") and line["shapes_compiled"] == 2
    with grpc.insecure_channel(line["serving"]) as ch:
      status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""),
                                                   timeout=10)
      assert status.status == health_pb2.HealthCheckResponse.SERVING
    client = RemoteServer(line["serving"])
    d = client.describe()
    assert (d.grid, d.patch, d.num_classes, list(d.buckets)) == (14, 16, 12, [64, 196])
    client.close()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
  finally:
    proc.kill()
