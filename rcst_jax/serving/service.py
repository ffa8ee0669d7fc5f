"""`rcst serve`: the token-subset server behind gRPC (rcst.proto).

Loads the server model once, compiles one program per kept-token bucket
before it listens, and answers `Classify` (one payload -> logits) through a
`DynamicBatcher`. Payloads are decoded and checked in the request's thread,
so a malformed one is answered INVALID_ARGUMENT with what is wrong and never
reaches a batch. Listens on 127.0.0.1 unless told otherwise; the standard
gRPC health service reports SERVING once compiled. `ClassifyBatch` takes
several payloads in one call (an edge's batch of offloaded images); they
join the same dynamic batches, and each is answered as `Classify` answers it
alone, or with its own named error.
"""

from __future__ import annotations

import dataclasses
import math
import time
from concurrent import futures
from typing import Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from rcst_jax import __version__
from rcst_jax.core import spmd
from rcst_jax.inference import patches
from rcst_jax.inference.server import Server
from rcst_jax.models.checkpoints import Model, variables_digest
from rcst_jax.payload import codecs
from rcst_jax.payload import message as payload
from rcst_jax.serving import protocol
from rcst_jax.serving import rcst_pb2 as pb
from rcst_jax.serving.batcher import DynamicBatcher
from rcst_jax.serving.protocol import SERVICE


def max_payload_bytes(server: Server) -> int:
  """The largest payload any codec may produce for this server: every patch
  sent (`payload.encode_payload`'s bound on a coded body)."""
  geo = server.geometry
  return payload.HEADER_BYTES + payload.index_bytes(geo.num_patches, geo.num_patches) \
      + codecs.max_body_bytes(geo.num_patches, geo.patch, geo.channels)


@dataclasses.dataclass
class ServeOptions:
  # Rows per server call at most (one compiled shape per bucket; a call runs
  # its real rows only, row by row: `Server.row_by_row`).
  batch: int = 8
  buckets: Sequence[int] = patches.BUCKETS
  max_wait_ms: float = 2.0       # how long a batch waits for more requests
  max_requests: int = 64         # requests per batch (over all buckets), and
                                 # payloads per ClassifyBatch call
  workers: int = 16              # gRPC handler threads (concurrent requests)
  # Server calls in flight at once (a batch's buckets run side by side);
  # 0: 2 on a CPU host with 2+ cores (rcst serve runs XLA on one thread a call).
  calls_in_flight: int = 0
  max_message_bytes: int | None = None  # default: the largest valid payload + 1 KiB
  deadline_s: float = 30.0       # the longest a request waits (the client's, if shorter)


class Service:
  """The servicer: decode, check, batch, answer."""

  def __init__(self, model: Model, options: ServeOptions = ServeOptions()):
    self.options = options
    # Row by row: each request's logits are those of the batch-1 program, bit
    # for bit, whatever it is batched with.
    self.server = Server(model, options.batch, tuple(options.buckets), row_by_row=True,
                         concurrency=spmd.host_concurrency(options.calls_in_flight))
    self.max_message_bytes = int(options.max_message_bytes or max_payload_bytes(self.server) + 1024)
    self.shapes = self.server.warm_up()
    self.batcher = DynamicBatcher(self.server.logits_from_decoded, options.max_requests,
                                  options.max_wait_ms / 1000)
    self.digest = variables_digest(model.variables)

  def submit(self, data: bytes) -> tuple[futures.Future, float]:
    """A payload decoded, checked and queued for a batch: (its pending
    `Answer`, seconds decoding), or `payload.PayloadError`."""
    t0 = time.perf_counter()
    with self.batcher.arriving() as arrival:
      decoded = self.server.decode(data)
      decode_s = time.perf_counter() - t0
      return arrival.submit(decoded), decode_s

  def _deadline(self, context) -> float:
    return time.perf_counter() + min(context.time_remaining() or math.inf,
                                     self.options.deadline_s)

  @staticmethod
  def _wait(pending: futures.Future, until: float, context):
    remaining = max(0.0, until - time.perf_counter())
    try:
      return pending.result(timeout=remaining)
    except futures.TimeoutError:
      context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"deadline: the server call did not finish within {remaining:.3f} s")

  @staticmethod
  def _reply(answer, decode_s: float) -> pb.ClassifyReply:
    return pb.ClassifyReply(logits=answer.logits.tolist(), batch_requests=answer.batch_requests,
                            queue_ms=answer.queue_s * 1e3, compute_ms=answer.compute_s * 1e3,
                            decode_ms=decode_s * 1e3)

  def classify(self, request: pb.ClassifyRequest, context) -> pb.ClassifyReply:
    until = self._deadline(context)
    try:
      pending, decode_s = self.submit(request.payload)
    except payload.PayloadError as e:
      context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"payload: {e}")
    return self._reply(self._wait(pending, until, context), decode_s)

  def classify_batch(self, request: pb.ClassifyBatchRequest, context) -> pb.ClassifyBatchReply:
    until, n = self._deadline(context), len(request.payloads)
    if n > self.options.max_requests:
      context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                    f"{n} payloads in one call; this server takes at most "
                    f"{self.options.max_requests}")
    submitted = []
    # Held while the call's payloads are decoded one after another, so a
    # forming batch waits for the rest of them rather than starting between two.
    with self.batcher.arriving():
      for i, data in enumerate(request.payloads):
        try:
          submitted.append(self.submit(data))
        except payload.PayloadError as e:
          submitted.append(f"payload {i}: {e}")
    return pb.ClassifyBatchReply(replies=[
        pb.ClassifyReply(error=s) if isinstance(s, str)
        else self._reply(self._wait(s[0], until, context), s[1]) for s in submitted])

  def describe(self, request, context) -> pb.DescribeReply:
    geo = self.server.geometry
    return pb.DescribeReply(version=__version__, model_digest=self.digest, grid=geo.grid,
                            patch=geo.patch, num_classes=self.server.model.num_classes,
                            buckets=list(self.server.buckets), batch=self.options.batch,
                            max_message_bytes=self.max_message_bytes,
                            max_batch_payloads=self.options.max_requests)

  def handler(self) -> grpc.GenericRpcHandler:
    """Every method of `protocol.METHODS`, served by the method of that name."""
    impl = {protocol.CLASSIFY: self.classify, protocol.CLASSIFY_BATCH: self.classify_batch,
            protocol.DESCRIBE: self.describe}
    return grpc.method_handlers_generic_handler(SERVICE, {
        name: grpc.unary_unary_rpc_method_handler(
            impl[name], request_deserializer=request.FromString,
            response_serializer=reply.SerializeToString)
        for name, (request, reply) in protocol.METHODS.items()})


class RcstServer:
  """A started `rcst serve`: ``port`` (the one bound; pass port 0 for any free
  one), ``stop()``. The model is compiled before the port opens."""

  def __init__(self, model: Model, address: str = "127.0.0.1:0",
               options: ServeOptions = ServeOptions(), also: Sequence[str] = ()):
    """``also``: more addresses to listen on, e.g. "unix:/path/to.sock" for
    an edge on the same host (benchmarks/bench_link.py's kernel-shaped link)."""
    self.service = Service(model, options)
    cap = self.service.max_message_bytes
    self.grpc = grpc.server(
        futures.ThreadPoolExecutor(max_workers=options.workers, thread_name_prefix="rcst-rpc"),
        handlers=[self.service.handler()],
        options=[("grpc.max_receive_message_length", cap),
                 ("grpc.max_send_message_length", protocol.MAX_REPLY_BYTES),
                 ("grpc.so_reuseport", 0),
                 # No bandwidth-probing PINGs: each one's ACK is 17 bytes up
                 # after the reply, metered into the edge's next request. The
                 # default 64 KiB window then splits a whole raw payload into
                 # more DATA frames (130 B of framing against 58), 0.05 %.
                 ("grpc.http2.bdp_probe", 0)])
    self.health = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
    self.port = self.grpc.add_insecure_port(address)
    for a, bound in [(address, self.port)] + [(a, self.grpc.add_insecure_port(a)) for a in also]:
      if not bound:
        raise OSError(f"rcst serve: cannot listen on {a}")
    self.host = address.rsplit(":", 1)[0]
    self.grpc.start()
    for name in ("", SERVICE):
      self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

  @property
  def address(self) -> str:
    return f"{self.host}:{self.port}"

  def stop(self, grace: float | None = 1.0) -> None:
    self.health.enter_graceful_shutdown()
    self.grpc.stop(grace).wait()
    self.service.batcher.close()

  def wait(self) -> None:
    self.grpc.wait_for_termination()
