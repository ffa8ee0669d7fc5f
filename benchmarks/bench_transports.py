"""What the transport costs a request under load, apart from the model:
`rcst serve`'s gRPC server against two candidates, on the same service.

  .venv/bin/python benchmarks/bench_transports.py [--requests 64] [--rounds 2] [--pin]

Eight client processes, each sending its requests in turn (the load check of
benchmarks/bench_link.py), against one server process holding the service
`rcst serve` runs (decode and check in the request's thread, then the
`DynamicBatcher` and the row-by-row server calls), behind:
  - gRPC, thread pool: `rcst serve` as shipped (`RcstServer`), clients
    `RemoteServer` (blocking calls);
  - gRPC, 8 payloads a call: the same server, clients sending their payloads
    8 at a time in one `ClassifyBatch` call (`RemoteServer.classify_batch`,
    `rcst run --send batch`), so a call's transport cost is shared by 8;
  - gRPC, asyncio: the same handler on `grpc.aio` (one event-loop thread);
  - HTTP/1.1 ASGI: a bare ASGI app on uvicorn with httptools and uvloop
    (only if installed: `pip install uvicorn httptools uvloop`), clients
    `http.client` keep-alive connections. The issue allows an ASGI server
    "if measured better"; this is the measurement.
Each runs twice: "null" (the server call returns zeros: transport, decode
and batching only) and "model" (the demo server). Per request: server
process CPU, client CPU, requests per server call, wall p50/p99; then
throughput against the in-process server (`bench_link.inprocess_rate`) with
every payload in hand at once, and handed them 8 at a time (the most that 8
clients waiting on their answers can form). Framing: wire bytes up per
request less the payload, through the `meter.Link` relay. Payloads: 40
random 224 x 224 images, 5-59 of 196 patches kept, jpeg420:50. No timm
reference: the model is the same in every row; only the transport differs.

The clients stand in for edge devices but share this machine's cores with
the server, which the in-process reference does not. ``--pin`` gives the
server (and the in-process reference, in the same process) core 0 alone and
the clients the other cores, so both sides of the ratio have the same CPU.
"""

import argparse
import asyncio
import http.client
import importlib.util
import multiprocessing
import os
import socket
import threading
import time

import common  # noqa: F401  (XLA:CPU flags first)
import grpc
import numpy as np
from bench_codecs import cpu_line
from bench_link import _cpu_s, inprocess_rate

from rcst_edge.link import rcst_pb2 as pb
from rcst_edge.link.client import RemoteServer, parse_address
from rcst_edge.link.meter import Link
from rcst_edge.link.protocol import SERVICE
from rcst_edge.payload import message as payload
from rcst_edge.payload.geometry import Geometry
from rcst_jax.inference.server import Server
from rcst_jax.models.checkpoints import load_model
from rcst_jax.serving.service import RcstServer, ServeOptions, Service

WEIGHTS = os.path.join(os.path.dirname(common.HERE), "weights")
CLIENTS = 8
PER_CALL = 8  # payloads per ClassifyBatch call


def payloads(n=40, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    keep = np.zeros(196, bool)
    keep[rng.choice(196, rng.integers(5, 60), replace=False)] = True
    image = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    out.append(payload.encode_image_payload(image, keep, Geometry(), "jpeg420:50"))
  return out


class _LoopThread:
  """An asyncio server in a daemon thread; ``address`` once it listens."""

  def __init__(self, serve):
    self._started = threading.Event()
    threading.Thread(target=lambda: asyncio.run(serve(self)), daemon=True).start()
    if not self._started.wait(60):
      raise RuntimeError("server did not start")

  def started(self, port):
    self.address = f"127.0.0.1:{port}"
    self._started.set()


def aio_grpc(service: Service) -> _LoopThread:
  async def classify(request, context):
    answer = await asyncio.wrap_future(service.submit(request.payload)[0])
    return pb.ClassifyReply(logits=answer.logits.tolist(), batch_requests=answer.batch_requests)

  async def serve(box):
    unary = grpc.unary_unary_rpc_method_handler
    handler = grpc.method_handlers_generic_handler(SERVICE, {
        "Classify": unary(classify, request_deserializer=pb.ClassifyRequest.FromString,
                          response_serializer=pb.ClassifyReply.SerializeToString),
        "Describe": unary(service.describe, request_deserializer=pb.DescribeRequest.FromString,
                          response_serializer=pb.DescribeReply.SerializeToString)})
    server = grpc.aio.server(handlers=[handler], options=[("grpc.so_reuseport", 0)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    box.started(port)
    await server.wait_for_termination()
  return _LoopThread(serve)


def asgi(service: Service) -> _LoopThread:
  import uvicorn

  async def app(scope, receive, send):
    if scope["type"] != "http":
      return
    body = bytearray()
    while True:
      message = await receive()
      body += message.get("body", b"")
      if not message.get("more_body"):
        break
    answer = await asyncio.wrap_future(service.submit(bytes(body))[0])
    out = answer.logits.astype("<f4").tobytes()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(out)).encode()),
                            (b"x-batch", str(answer.batch_requests).encode())]})
    await send({"type": "http.response.body", "body": out})

  async def serve(box):
    sock = socket.create_server(("127.0.0.1", 0))
    # Inherited by accepted connections: uvicorn writes a reply's head and
    # body apart, which Nagle would hold for the client's delayed ACK (40 ms).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    config = uvicorn.Config(app, loop="uvloop", http="httptools", lifespan="off",
                            log_level="error", access_log=False, timeout_keep_alive=600)
    server = uvicorn.Server(config)
    box.started(sock.getsockname()[1])
    await server.serve(sockets=[sock])
  return _LoopThread(serve)


class _HttpClient:
  def __init__(self, address):
    host, port = parse_address(address)
    self.conn = http.client.HTTPConnection(host, port)

  def classify(self, data):
    self.conn.request("POST", "/v1/classify", data)
    r = self.conn.getresponse()
    logits = np.frombuffer(r.read(), "<f4")
    if r.status != 200 or logits.size == 0:
      raise RuntimeError(f"HTTP {r.status}")
    return int(r.getheader("x-batch"))


def _caller(kind, remote):
  """(call, payloads per call) for a client of ``kind``: call(payloads) ->
  each one's requests per server call."""
  if kind == "http":
    return (lambda ds: [remote.classify(ds[0])]), 1
  if kind == "grpc-batch":
    return (lambda ds: [r.batch_requests for r in remote.classify_batch(ds)]), PER_CALL
  return (lambda ds: [remote.classify(ds[0]).batch_requests]), 1


def _client(kind, address, data, per_client, k, ready, start, results, cpus):
  if cpus:
    os.sched_setaffinity(0, cpus)
  remote = _HttpClient(address) if kind == "http" else RemoteServer(address, metered=False)
  call, step = _caller(kind, remote)
  for i in range(10):  # connection, HPACK tables
    call([data[(i + j) % len(data)] for j in range(step)])
  ready.put(k)
  start.wait()
  c0, lat, sizes = _cpu_s(), [], []
  for j in range(0, per_client, step):
    t = time.perf_counter()
    got = call([data[(k * per_client + j + i) % len(data)] for i in range(step)])
    lat += [time.perf_counter() - t] * len(got)
    sizes += got
  results.put((lat, sizes, _cpu_s() - c0))


def load(kind, address, data, per_client, cpus=None):
  ctx = multiprocessing.get_context("spawn")
  ready, results, start = ctx.Queue(), ctx.Queue(), ctx.Event()
  procs = [ctx.Process(target=_client, args=(kind, address, data, per_client, k, ready, start,
                                             results, cpus)) for k in range(CLIENTS)]
  for p in procs:
    p.start()
  for _ in procs:
    ready.get(timeout=120)
  t0, c0 = time.perf_counter(), _cpu_s()
  start.set()
  got = [results.get(timeout=300) for _ in procs]
  n = CLIENTS * per_client
  rate, server_ms = n / (time.perf_counter() - t0), (_cpu_s() - c0) / n * 1e3
  for p in procs:
    p.join()
  lat = np.array([x for g in got for x in g[0]]) * 1e3
  return dict(rate=rate, server_ms=server_ms, client_ms=sum(g[2] for g in got) / n * 1e3,
              batch=np.mean([x for g in got for x in g[1]]), p50=np.percentile(lat, 50),
              p99=np.percentile(lat, 99))


def framing(kind, address, data, calls=40):
  """Wire bytes up per request less the payload, after a warm-up."""
  link = Link(parse_address(address))
  if kind == "http":
    remote = _HttpClient(link.address)
  else:
    remote = RemoteServer(address, metered=True, link=link)
  call, step = _caller(kind, remote)
  sent = [data[i % len(data)] for i in range(calls)]
  for i in range(0, 10 * step, step):
    call(sent[i:i + step])
  up0 = link.totals()[0]
  for i in range(0, calls, step):
    call(sent[i:i + step])
  up = link.totals()[0] - up0
  if kind == "http":
    remote.conn.close()
    link.close()
  else:
    remote.close()  # and its link
  return (up - sum(map(len, sent))) / calls


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--requests", type=int, default=64, help="per client and row (a multiple "
                                                            f"of {PER_CALL})")
  ap.add_argument("--rounds", type=int, default=2)
  ap.add_argument("--pin", action="store_true", help="server and in-process reference on core "
                                                     "0 alone, clients on the others")
  args = ap.parse_args()
  args.requests -= args.requests % PER_CALL
  clients_cpus = None
  if args.pin:  # before the model starts a backend: XLA sizes its threads by the mask
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
      raise SystemExit("--pin needs 2 cores")
    os.sched_setaffinity(0, {cores[0]})
    clients_cpus = set(cores[1:])
  model = load_model(f"{WEIGHTS}/demo_server")
  data, options = payloads(), ServeOptions()
  shipped = RcstServer(model, "127.0.0.1:0", options)
  transports = [("gRPC, thread pool (rcst serve)", "grpc", shipped.address, shipped.service),
                (f"gRPC, {PER_CALL} payloads a call", "grpc-batch", shipped.address,
                 shipped.service)]
  service = Service(model, options)
  transports.append(("gRPC, asyncio", "grpc", aio_grpc(service).address, service))
  have_asgi = all(importlib.util.find_spec(m) for m in ("uvicorn", "httptools", "uvloop"))
  if have_asgi:
    service = Service(model, options)
    transports.append(("HTTP/1.1 ASGI (uvicorn)", "http", asgi(service).address, service))
  reference = Server(model, options.batch, tuple(options.buckets), row_by_row=True,
                     concurrency=shipped.service.server.concurrency)
  total = CLIENTS * args.requests
  where = (f"core {min(os.sched_getaffinity(0))} for the server and the in-process reference, "
           f"cores {sorted(clients_cpus)} for the {CLIENTS} client processes") if args.pin \
      else f"{os.cpu_count()} cores shared by the server and {CLIENTS} client processes"
  print(f"CPU: {cpu_line()}; {where}; server calls in flight "
        f"{shipped.service.server.concurrency}; {args.requests} requests per client and row, "
        f"40 jpeg420:50 payloads (mean {np.mean([len(d) for d in data]):.0f} B)")
  if not have_asgi:
    print("(HTTP/1.1 ASGI skipped: pip install uvicorn httptools uvloop)")
  print("framing, wire bytes up per request less the payload: " + ", ".join(
      f"{name} {framing(kind, address, data):.1f} B" for name, kind, address, _ in transports))
  print("\ntransport                       | server call | req/s | server CPU ms | client CPU ms "
        "| req/call | p50 ms | p99 ms | vs in process: all at once, 8 at a time")
  for r in range(args.rounds):
    at_once = inprocess_rate(reference, data, total)[0]
    by_8 = inprocess_rate(reference, data, total, chunk=CLIENTS)[0]
    print(f"round {r + 1}: in process {at_once:.0f} req/s all at once, {by_8:.0f} req/s "
          f"8 at a time")
    for name, kind, address, svc in transports:
      for mode in ("null", "model"):
        real = svc.batcher._run
        if mode == "null":
          classes = model.num_classes
          svc.batcher._run = lambda items, c=classes: np.zeros((len(items), c), np.float32)
        try:
          m = load(kind, address, data, args.requests, clients_cpus)
        finally:
          svc.batcher._run = real
        ratios = "" if mode == "null" else \
            f" | {m['rate'] / at_once:.2f}, {m['rate'] / by_8:.2f}"
        print(f"{name:31s} | {mode:11s} | {m['rate']:5.0f} | {m['server_ms']:13.3f} | "
              f"{m['client_ms']:13.3f} | {m['batch']:8.1f} | {m['p50']:6.1f} | "
              f"{m['p99']:6.1f}{ratios}")
  shipped.stop(0)
  os._exit(0)  # the asyncio servers' threads are daemons without a clean stop


if __name__ == "__main__":
  main()
