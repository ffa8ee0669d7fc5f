"""`rcst serve`: the token-subset server behind gRPC (rcst.proto).

Loads the server model once, checks its options and address, then compiles
one program per kept-token bucket before it listens, and answers `Classify`
(one payload -> logits) through a `DynamicBatcher`. Requests are parsed, and
payloads decoded and checked against the server's geometry and buckets, in
the request's thread: what cannot be served is refused alone
(INVALID_ARGUMENT, one line in the log) and never reaches a batch.

Listens on 127.0.0.1 unless told otherwise; the standard gRPC health service
reports SERVING once compiled. `ClassifyBatch` takes several payloads in one
call (an edge's batch of offloaded images); they join the same dynamic
batches, and each is answered as `Classify` answers it alone, or with its own
named error. Every answer names the weights digest that gave it.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import math
import socket
import time
from concurrent import futures
from typing import Sequence

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from rcst_edge import errors
from rcst_edge.address import parse_address
from rcst_edge.link import protocol
from rcst_edge.link import rcst_pb2 as pb
from rcst_edge.link.protocol import SERVICE
from rcst_edge.payload import codecs
from rcst_edge.payload import message as payload
from rcst_edge.payload.geometry import Geometry
from rcst_jax import __version__
from rcst_jax.core import spmd
from rcst_jax.inference import patches
from rcst_jax.inference.server import Server
from rcst_jax.models.checkpoints import Model, variables_digest
from rcst_jax.serving.batcher import DynamicBatcher

_LOG = logging.getLogger(__name__)  # one line per refused request
MAX_WAIT_MS = 1000.0  # a batch waits at most this long for company (--max-wait-ms)



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
  # Kept-token buckets; the largest must hold a whole image (N patches), the
  # edge's fallback when nothing was certified.
  buckets: Sequence[int] = patches.BUCKETS
  max_wait_ms: float = 2.0       # how long a batch waits for more requests (<= MAX_WAIT_MS)
  max_requests: int = 64         # requests per batch (over all buckets), and
                                 # payloads per ClassifyBatch call
  workers: int = 16              # gRPC handler threads (concurrent requests)
  # Server calls in flight at once (a batch's buckets run side by side);
  # 0: 2 on a CPU host with 2+ cores (rcst serve runs XLA on one thread a call).
  calls_in_flight: int = 0
  # default: the largest valid payload + 1 KiB; at most protocol.MAX_REQUEST_BYTES
  max_message_bytes: int | None = None
  deadline_s: float = 30.0       # the longest a request waits (the client's, if shorter)

  def check(self, geometry: Geometry) -> None:
    """`errors.ConfigError` naming the first option a server of ``geometry``
    cannot run with; called before anything is compiled."""
    def whole(v, low):
      return not isinstance(v, bool) and isinstance(v, int) and v >= low
    b = tuple(self.buckets)
    if not b or not all(whole(x, 1) for x in b):
      raise errors.ConfigError(f"buckets must be integers >= 1, got {list(b)}")
    n = geometry.num_patches
    if max(b) < n:
      raise errors.ConfigError(
          f"buckets {','.join(map(str, sorted(b)))}: the largest, {max(b)}, cannot hold a "
          f"whole image ({n} patches of a {geometry.grid}x{geometry.grid} grid, what the edge "
          f"sends when it keeps every patch); add {n}")
    for name, low in (("batch", 1), ("max_requests", 1), ("workers", 1),
                      ("calls_in_flight", 0)):
      if not whole(getattr(self, name), low):
        raise errors.ConfigError(f"{name} must be an integer >= {low}, "
                                 f"got {getattr(self, name)!r}")
    if not (math.isfinite(self.max_wait_ms) and 0 <= self.max_wait_ms <= MAX_WAIT_MS):
      raise errors.ConfigError(f"max_wait_ms must be a number in [0, {MAX_WAIT_MS:g}], "
                               f"got {self.max_wait_ms!r}")
    cap = self.max_message_bytes
    if cap is not None and not (whole(cap, 1) and cap <= protocol.MAX_REQUEST_BYTES):
      raise errors.ConfigError(f"max_message_bytes must be an integer in 1.."
                               f"{protocol.MAX_REQUEST_BYTES}, got {cap!r}")
    if not (math.isfinite(self.deadline_s) and self.deadline_s > 0):
      raise errors.ConfigError(f"deadline_s must be a number > 0, got {self.deadline_s!r}")


def check_address(address: str) -> None:
  """Refuses (`errors.RcstError`), before anything is compiled, an address
  this host cannot listen on: not HOST:PORT, a host it does not have, a port
  in use. gRPC binds it again at start; "unix:" paths are left to it."""
  if address.startswith("unix:"):
    return
  host, port = parse_address(address, any_port=True)
  try:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
  except socket.gaierror as e:
    raise errors.RcstError(f"cannot listen on {address}: {e.strerror}") from None
  problems = []
  for family, kind, proto, _, where in infos:
    with socket.socket(family, kind, proto) as s:
      s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
      try:
        s.bind(where)
      except OSError as e:
        if e.errno == errno.EADDRINUSE:
          raise errors.RcstError(f"cannot listen on {address}: port {port} is in use "
                                 "(another rcst serve?)") from None
        problems.append(e.strerror)
  if len(problems) == len(infos):
    raise errors.RcstError(f"cannot listen on {address}: {'; '.join(problems)}")


class Service:
  """The servicer: parse, decode, check, batch, answer."""

  def __init__(self, model: Model, options: ServeOptions = ServeOptions()):
    options.check(Geometry.of_server(model))  # before anything compiles
    self.options = options
    # Row by row: each request's logits are those of the batch-1 program, bit
    # for bit, whatever it is batched with.
    self.server = Server(model, options.batch, tuple(options.buckets), row_by_row=True,
                         concurrency=spmd.host_concurrency(options.calls_in_flight))
    self.largest = max(self.server.buckets)
    self.max_message_bytes = int(options.max_message_bytes or max_payload_bytes(self.server) + 1024)
    self.shapes = self.server.warm_up()
    self.batcher = DynamicBatcher(self.server.logits_from_decoded, options.max_requests,
                                  options.max_wait_ms / 1000)
    self.digest = variables_digest(model.variables)

  def admit(self, data: bytes) -> payload.Decoded:
    """A payload decoded and checked against everything a batch assumes (the
    grid, patch size, channels and the largest bucket), or the
    `payload.PayloadError` that refuses it alone."""
    decoded = self.server.decode(data)  # the geometry
    if len(decoded.idx) > self.largest:
      raise payload.PayloadError(f"{len(decoded.idx)} patches exceed this server's largest "
                                 f"bucket, {self.largest}")
    return decoded

  def submit(self, data: bytes) -> tuple[futures.Future, float]:
    """A payload admitted (`admit`) and queued for a batch: (its pending
    `Answer`, seconds decoding), or `payload.PayloadError`."""
    t0 = time.perf_counter()
    with self.batcher.arriving() as arrival:
      decoded = self.admit(data)
      decode_s = time.perf_counter() - t0
      return arrival.submit(decoded), decode_s

  def _deadline(self, context) -> float:
    return time.perf_counter() + min(context.time_remaining() or math.inf,
                                     self.options.deadline_s)

  @staticmethod
  def _refuse(context, method: str, code: grpc.StatusCode, message: str):
    """The request answered ``code`` with ``message``, and one line in the log."""
    _LOG.warning("refused %s from %s, %s: %s", method, context.peer(), code.name, message)
    context.abort(code, message)

  def _wait(self, pending: futures.Future, until: float, context, method: str):
    remaining = max(0.0, until - time.perf_counter())
    try:
      return pending.result(timeout=remaining)
    except futures.TimeoutError:
      self._refuse(context, method, grpc.StatusCode.DEADLINE_EXCEEDED,
                   f"deadline: the server call did not finish within {remaining:.3f} s")

  def _reply(self, answer, decode_s: float, digest: bool = True) -> pb.ClassifyReply:
    return pb.ClassifyReply(logits=answer.logits.tolist(), batch_requests=answer.batch_requests,
                            queue_ms=answer.queue_s * 1e3, compute_ms=answer.compute_s * 1e3,
                            decode_ms=decode_s * 1e3, model_digest=self.digest if digest else "")

  def classify(self, request: pb.ClassifyRequest, context) -> pb.ClassifyReply:
    until = self._deadline(context)
    try:
      pending, decode_s = self.submit(request.payload)
    except payload.PayloadError as e:
      self._refuse(context, protocol.CLASSIFY, grpc.StatusCode.INVALID_ARGUMENT, f"payload: {e}")
    return self._reply(self._wait(pending, until, context, protocol.CLASSIFY), decode_s)

  def classify_batch(self, request: pb.ClassifyBatchRequest, context) -> pb.ClassifyBatchReply:
    until, n, method = self._deadline(context), len(request.payloads), protocol.CLASSIFY_BATCH
    if n > self.options.max_requests:
      self._refuse(context, method, grpc.StatusCode.INVALID_ARGUMENT,
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
          _LOG.warning("refused %s from %s, payload %d: %s", method, context.peer(), i, e)
    return pb.ClassifyBatchReply(model_digest=self.digest, replies=[
        pb.ClassifyReply(error=s) if isinstance(s, str)
        else self._reply(self._wait(s[0], until, context, method), s[1], digest=False)
        for s in submitted])

  def describe(self, request, context) -> pb.DescribeReply:
    geo = self.server.geometry
    return pb.DescribeReply(version=__version__, model_digest=self.digest, grid=geo.grid,
                            patch=geo.patch, num_classes=self.server.model.num_classes,
                            buckets=list(self.server.buckets), batch=self.options.batch,
                            max_message_bytes=self.max_message_bytes,
                            max_batch_payloads=self.options.max_requests)

  def _parsed(self, name: str, impl, request_type):
    """``impl`` on the request parsed from its bytes here, not by gRPC (whose
    failure is INTERNAL with a traceback in the log): a malformed one is
    INVALID_ARGUMENT, named."""
    def handle(data: bytes, context):
      try:
        request = request_type.FromString(data)
      except DecodeError as e:
        self._refuse(context, name, grpc.StatusCode.INVALID_ARGUMENT,
                     f"malformed {request_type.DESCRIPTOR.name} ({len(data)} bytes): {e}")
      return impl(request, context)
    return handle

  def handler(self) -> grpc.GenericRpcHandler:
    """Every method of `protocol.METHODS`, served by the method of that name."""
    impl = {protocol.CLASSIFY: self.classify, protocol.CLASSIFY_BATCH: self.classify_batch,
            protocol.DESCRIBE: self.describe}
    return grpc.method_handlers_generic_handler(SERVICE, {
        name: grpc.unary_unary_rpc_method_handler(
            self._parsed(name, impl[name], request), request_deserializer=None,
            response_serializer=reply.SerializeToString)
        for name, (request, reply) in protocol.METHODS.items()})


class RcstServer:
  """A started `rcst serve`: ``port`` (the one bound; pass port 0 for any free
  one), ``stop()``. Its options and addresses are checked, then the model is
  compiled, then the port opens."""

  def __init__(self, model: Model, address: str = "127.0.0.1:0",
               options: ServeOptions = ServeOptions(), also: Sequence[str] = ()):
    """``also``: more addresses to listen on, e.g. "unix:/path/to.sock" for
    an edge on the same host (benchmarks/bench_link.py's kernel-shaped link)."""
    for a in (address, *also):
      check_address(a)
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
    bound = [self._listen(a) for a in (address, *also)]
    self.port = bound[0]
    self.host = address.rsplit(":", 1)[0]
    self.grpc.start()
    for name in ("", SERVICE):
      self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

  def _listen(self, address: str) -> int:
    try:
      port = self.grpc.add_insecure_port(address)
    except RuntimeError:  # taken since `check_address` (gRPC logs why)
      port = 0
    if not port:
      self.service.batcher.close()
      raise errors.RcstError(f"cannot listen on {address}")
    return port

  @property
  def address(self) -> str:
    return f"{self.host}:{self.port}"

  def stop(self, grace: float | None = 1.0) -> None:
    self.health.enter_graceful_shutdown()
    self.grpc.stop(grace).wait()
    self.service.batcher.close()

  def wait(self) -> None:
    self.grpc.wait_for_termination()
