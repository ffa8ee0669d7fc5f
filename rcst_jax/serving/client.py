"""The networked edge's side of the link: one payload -> the server's logits
over gRPC, with deadlines, bounded retries and an optional wire meter.

UNAVAILABLE and DEADLINE_EXCEEDED are retried with exponential backoff
(``retries`` times), then raised as `ServerUnreachable`; anything else the
server answers (a refused payload, a message over its cap) is a
`ServerRefused` naming the status, never retried. With ``metered`` (off by
default: `rcst run --meter`) the channel runs through a `meter.Link` relay,
so each reply carries the bytes its request and answer took on the wire,
HTTP/2 and gRPC framing included; unmetered, those are None.
`classify_batch` sends several payloads per call (`ClassifyBatch`): one
call's transport cost shared by its payloads, which is what lets a served
edge keep up with the in-process server (benchmarks/bench_transports.py).
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Sequence

import grpc
import numpy as np

from rcst_jax.core import errors
from rcst_jax.payload.geometry import Geometry
from rcst_jax.serving import protocol
from rcst_jax.serving import rcst_pb2 as pb
from rcst_jax.serving.meter import Link

_RETRIED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


ServerUnreachable = errors.ServerUnreachable  # raised here, known below (inference)


class ServerRefused(errors.RcstError):
  """The server answered with an error status (named in the message)."""

  def __init__(self, message: str, code: grpc.StatusCode):
    super().__init__(message)
    self.code = code


@dataclasses.dataclass(frozen=True)
class Reply:
  logits: np.ndarray
  rtt_s: float          # request sent -> answer received, the successful attempt
  compute_s: float      # the server call that answered it (reported by the server)
  queue_s: float        # waiting on the server for its batch
  decode_s: float
  batch_requests: int
  wire_up: int | None   # bytes on the wire towards the server (None unmetered)
  wire_down: int | None
  attempts: int


def _reply(r: pb.ClassifyReply, rtt: float, up: int | None, down: int | None,
           attempts: int) -> Reply:
  return Reply(np.asarray(r.logits, np.float32), rtt, r.compute_ms / 1e3, r.queue_ms / 1e3,
               r.decode_ms / 1e3, r.batch_requests, up, down, attempts)


def _calls(payloads: Sequence[bytes], most: int, cap: int):
  """``payloads`` cut, in order, into runs of at most ``most`` whose sizes
  (each with its protobuf field prefix, at most 6 bytes) add up to at most
  ``cap``; a payload over ``cap`` alone goes in a call of its own (the server
  then refuses it as too large)."""
  part, size = [], 0
  for p in payloads:
    if part and (len(part) == most or size + len(p) + 6 > cap):
      yield part
      part, size = [], 0
    part.append(p)
    size += len(p) + 6
  if part:
    yield part


def _share(total: int, sizes: Sequence[int]) -> list[int]:
  """``total`` split in proportion to ``sizes``, in whole bytes that add up
  to it (largest remainders first)."""
  weights = np.asarray(sizes, np.float64) + 1  # an empty payload still costs framing
  exact = total * weights / weights.sum()
  out = np.floor(exact).astype(np.int64)
  out[np.argsort(out - exact, kind="stable")[:total - out.sum()]] += 1
  return out.tolist()


def parse_address(address: str) -> tuple[str, int]:
  m = re.fullmatch(r"(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.\-]+):(\d{1,5})", address)
  if not m or not 0 < int(m.group(2)) < 65536:
    raise errors.RcstError(f"server address must be HOST:PORT, got {address!r}")
  return m.group(1).strip("[]"), int(m.group(2))


class RemoteServer:
  """A `rcst serve` at ``address`` (HOST:PORT); ``geometry``: the patch
  geometry the edge encodes for (the calibration's)."""

  def __init__(self, address: str, *, deadline_s: float = 10.0, retries: int = 3,
               backoff_s: float = 0.25, metered: bool = False, geometry: Geometry = Geometry(),
               link: Link | None = None):
    """``metered``: through a new `meter.Link` relay of its own, to count
    each call's bytes on the wire; ``link``: a relay already in front of the
    server, metering (and maybe shaping) the channel, which goes through it
    instead (`close` closes it too)."""
    self.address, self.deadline_s, self.geometry = address, deadline_s, geometry
    self.retries, self.backoff_s = retries, backoff_s
    target = parse_address(address) if link is None else None
    self.link = link if link is not None else Link(target) if metered else None
    self.channel = grpc.insecure_channel(
        self.link.address if self.link else address,
        options=[("grpc.max_receive_message_length", protocol.MAX_REPLY_BYTES),
                 # The server's own cap on requests decides (`Describe`).
                 ("grpc.max_send_message_length", 1 << 22),
                 ("grpc.enable_retries", 0),  # ours are bounded and counted
                 ("grpc.http2.bdp_probe", 0),  # no bandwidth pings on a metered link
                 # The replies are a few hundred bytes: a small receive window
                 # spares a connection WINDOW_UPDATE (13 bytes up) per request.
                 ("grpc.http2.lookahead_bytes", 16384),
                 ("grpc.initial_reconnect_backoff_ms", 100),
                 ("grpc.max_reconnect_backoff_ms", 1000)])
    self._classify = self._method(protocol.CLASSIFY)
    self._classify_batch = self._method(protocol.CLASSIFY_BATCH)
    self._describe = self._method(protocol.DESCRIBE)
    self._limits = None  # (payloads, bytes) per ClassifyBatch call, from Describe

  @property
  def metered(self) -> bool:
    """Whether each `Reply` carries its bytes on the wire."""
    return self.link is not None

  def _method(self, name: str):
    request, reply = protocol.METHODS[name]
    return self.channel.unary_unary(protocol.path(name),
                                    request_serializer=request.SerializeToString,
                                    response_deserializer=reply.FromString)

  def _call(self, fn, request):
    # A blocking call: this thread polls for the answer itself. The future API
    # hands it over from gRPC's polling thread: 0.57-0.58 against 0.33-0.37 ms
    # of client CPU a call (benchmarks/bench_client_calls.py). The deadline
    # goes out as grpc-timeout; gRPC re-sends a recent value by its HPACK
    # index (1 byte a request).
    for attempt in range(self.retries + 1):
      t0 = time.perf_counter()
      try:
        answer = fn(request, timeout=self.deadline_s, wait_for_ready=attempt > 0)
        return answer, time.perf_counter() - t0, attempt + 1
      except grpc.RpcError as e:
        code, details = e.code(), e.details()
      if code not in _RETRIED:
        raise ServerRefused(f"{self.address} answered {code.name}: {details}", code) from None
      if attempt == self.retries:
        raise ServerUnreachable(
            f"{self.address}: {code.name} after {attempt + 1} attempts of "
            f"{self.deadline_s:g} s: {details}") from None
      time.sleep(self.backoff_s * 2 ** attempt)

  def describe(self) -> pb.DescribeReply:
    return self._call(self._describe, pb.DescribeRequest())[0]

  def _metered_call(self, fn, request):
    """`_call`, and the bytes up and down the link took meanwhile (None unmetered)."""
    if not self.link:
      return *self._call(fn, request), None, None
    before = self.link.totals()
    answer, rtt, attempts = self._call(fn, request)
    after = self.link.totals()
    return answer, rtt, attempts, after[0] - before[0], after[1] - before[1]

  def classify(self, data: bytes) -> Reply:
    r, rtt, attempts, up, down = self._metered_call(self._classify,
                                                    pb.ClassifyRequest(payload=data))
    return _reply(r, rtt, up, down, attempts)

  def classify_batch(self, payloads: Sequence[bytes]) -> list[Reply | ServerRefused]:
    """Each payload's `Reply`, or the `ServerRefused` that names why the
    server refused it (`ServerUnreachable` is raised, as by `classify`). The
    payloads go in as few calls as the server's limits allow (`Describe`). A
    call's wire bytes are shared among its payloads in proportion to their
    sizes (summing to the call's exactly; None unmetered); its round trip
    is each one's ``rtt_s``."""
    if self._limits is None:
      d = self.describe()
      # 64 bytes of the size cap kept for the request's own framing (`_calls`
      # counts each payload's field prefix).
      self._limits = (d.max_batch_payloads or 1, d.max_message_bytes - 64)
    out: list = []
    for part in _calls(payloads, *self._limits):
      try:
        r, rtt, attempts, up, down = self._metered_call(
            self._classify_batch, pb.ClassifyBatchRequest(payloads=part))
      except ServerRefused as e:  # the whole call (a payload over the size cap, alone)
        out += [e] * len(part)
        continue
      if len(r.replies) != len(part):
        raise ServerRefused(f"{self.address} answered {len(r.replies)} replies to "
                            f"{len(part)} payloads", grpc.StatusCode.INTERNAL)
      sizes = [len(p) for p in part]
      up, down = ((_share(up, sizes), _share(down, sizes)) if self.metered
                  else ([None] * len(part),) * 2)
      for i, x in enumerate(r.replies):
        out.append(ServerRefused(f"{self.address} answered INVALID_ARGUMENT: {x.error}",
                                 grpc.StatusCode.INVALID_ARGUMENT) if x.error
                   else _reply(x, rtt, up[i], down[i], attempts))
    return out

  def close(self) -> None:
    self.channel.close()
    if self.link:
      self.link.close()
