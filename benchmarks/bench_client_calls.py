"""What one `rcst run --server` call costs the edge, without the model: a
`rcst serve` whose server call computes nothing (it returns zero logits),
one client process calling it in turn, CPU and wall time per call.

  .venv/bin/python benchmarks/bench_client_calls.py [--calls 400] [--rounds 2]

Two client paths on the same channel, alternating: `RemoteServer.classify`
(blocking calls with a grpc-timeout, bounded retries) and gRPC's future API
(`.future(...).result(timeout)`, the client's path before 2026-12-07), which
hands every answer over from gRPC's polling thread. The server batches as
`rcst serve` does, so a lone client's wall time per call also shows whether
its batches wait ``max_wait_ms``. Payloads: 16 random 224 x 224 images, 20 %
of their patches, jpeg420:50. No timm reference: nothing here is a model.
"""

import argparse
import multiprocessing
import os
import resource
import time

import common  # noqa: F401  (XLA:CPU flags first)
import numpy as np
from bench_codecs import cpu_line

from rcst_edge.link import rcst_pb2 as pb
from rcst_edge.link.client import RemoteServer
from rcst_edge.payload import message as payload
from rcst_edge.payload.geometry import Geometry
from rcst_jax.models.checkpoints import load_model
from rcst_jax.serving.service import RcstServer, ServeOptions

WEIGHTS = os.path.join(os.path.dirname(common.HERE), "weights")


def _cpu_s() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def _client(address, data, path, calls, out):
  remote = RemoteServer(address, metered=False)
  remote.describe()
  requests = [pb.ClassifyRequest(payload=d) for d in data]
  if path == "blocking":
    call = lambda i: remote.classify(data[i % len(data)])  # noqa: E731
  else:
    call = lambda i: remote._classify.future(requests[i % len(requests)]).result(10.0)  # noqa: E731
  for i in range(20):  # connection, HPACK tables, first compiles of nothing
    call(i)
  c0, t0 = _cpu_s(), time.perf_counter()
  for i in range(calls):
    call(i)
  out.put(((_cpu_s() - c0) / calls * 1e3, (time.perf_counter() - t0) / calls * 1e3))
  remote.close()


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--calls", type=int, default=400)
  ap.add_argument("--rounds", type=int, default=2)
  args = ap.parse_args()
  model = load_model(f"{WEIGHTS}/demo_server")
  options = ServeOptions()
  srv = RcstServer(model, "127.0.0.1:0", options)
  classes = model.num_classes
  srv.service.batcher._run = lambda items: np.zeros((len(items), classes), np.float32)
  rng = np.random.default_rng(0)
  data = [payload.encode_image_payload(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
                                       rng.random(196) < 0.2, Geometry(), "jpeg420:50")
          for _ in range(16)]
  print(f"CPU: {cpu_line()}, {os.cpu_count()} cores; server batches wait up to "
        f"{options.max_wait_ms} ms while more may come; {args.calls} calls per client run")
  print("client path                      | client CPU ms/call | wall ms/call")
  ctx = multiprocessing.get_context("spawn")
  for _ in range(args.rounds):
    for path in ("blocking", "future API"):
      out = ctx.Queue()
      p = ctx.Process(target=_client, args=(srv.address, data, path, args.calls, out))
      p.start()
      cpu_ms, wall_ms = out.get(timeout=300)
      p.join()
      print(f"{path:32s} | {cpu_ms:18.3f} | {wall_ms:12.3f}")
  srv.stop(0)


if __name__ == "__main__":
  main()
