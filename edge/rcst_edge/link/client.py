"""The networked edge's side of the link: one payload -> the server's logits
over gRPC, with deadlines, bounded retries and an optional wire meter.

UNAVAILABLE and DEADLINE_EXCEEDED are retried within a time budget (`retry`),
then raised as `ServerUnreachable`, and the server is left alone for a while;
anything else the server answers (a refused payload, a message over its cap)
is a `ServerRefused` naming the status, never retried. Given what the
calibration expects (`Expect`), the server's geometry is checked by
`Describe` before any answer is used, and the weights digest of every answer:
one from other weights raises `ServerOtherWeights` (the edge's answer stands).
With ``metered`` (off by default: `rcst run --meter`) the channel runs
through a `meter.Link` relay, so each reply carries the bytes its request and
answer took on the wire, HTTP/2 and gRPC framing included; unmetered, those
are None. `classify_batch` sends several payloads per call (`ClassifyBatch`):
one call's transport cost shared by its payloads, which is what lets a served
edge keep up with the in-process server (benchmarks/bench_transports.py).
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Sequence

import grpc
import numpy as np

from rcst_edge import errors
from rcst_edge.address import parse_address
from rcst_edge.link import protocol
from rcst_edge.link import rcst_pb2 as pb
from rcst_edge.link.meter import Link
from rcst_edge.link.retry import DownMemory, Retry
from rcst_edge.payload.geometry import Geometry

_RETRIED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


ServerUnreachable = errors.ServerUnreachable  # raised here, known below (inference)
ServerOtherWeights = errors.ServerOtherWeights


class ServerRefused(errors.RcstError):
  """The server answered with an error status (named in the message)."""

  def __init__(self, message: str, code: grpc.StatusCode):
    super().__init__(message)
    self.code = code


@dataclasses.dataclass(frozen=True)
class Expect:
  """What the calibration says the server runs (the geometry is the
  client's): `Describe` must confirm it before any answer is used, and every
  answer must come from ``digest`` (None: any weights), unless
  ``allow_other_weights`` (used with a warning, no guarantee)."""
  digest: str | None = None
  allow_other_weights: bool = False


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
  model_digest: str = ""  # the weights that answered ("": an older server sends none)


def _reply(r: pb.ClassifyReply, rtt: float, up: int | None, down: int | None,
           attempts: int, digest: str) -> Reply:
  return Reply(np.asarray(r.logits, np.float32), rtt, r.compute_ms / 1e3, r.queue_ms / 1e3,
               r.decode_ms / 1e3, r.batch_requests, up, down, attempts, digest)


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


class RemoteServer:
  """A `rcst serve` at ``address`` (HOST:PORT); ``geometry``: the patch
  geometry the edge encodes for (the calibration's)."""

  def __init__(self, address: str, *, deadline_s: float = 10.0, retry: Retry = Retry(),
               metered: bool = False, geometry: Geometry = Geometry(),
               link: Link | None = None, expect: Expect | None = None):
    """``metered``: through a new `meter.Link` relay of its own, to count
    each call's bytes on the wire; ``link``: a relay already in front of the
    server, metering (and maybe shaping) the channel, which goes through it
    instead (`close` closes it too). ``expect``: None checks nothing (the
    benchmarks); `rcst run` passes the calibration's."""
    self.address, self.deadline_s, self.geometry = address, deadline_s, geometry
    self.retry, self.expect = retry, expect
    self.down = DownMemory(retry.down_for_s)
    self._rng = retry.rng()  # the jitter's
    target = parse_address(address) if link is None else None
    self.link = link if link is not None else Link(target) if metered else None
    self.channel = grpc.insecure_channel(
        self.link.address if self.link else address,
        options=[("grpc.max_receive_message_length", protocol.MAX_REPLY_BYTES),
                 # The server's own cap on requests decides (`Describe`).
                 ("grpc.max_send_message_length", protocol.MAX_REQUEST_BYTES),
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
    self._described: pb.DescribeReply | None = None  # the last Describe that answered
    self._limits = None  # (payloads, bytes) per ClassifyBatch call, from Describe
    self._warned: set = set()

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
    down = self.down.why()
    if down:
      raise ServerUnreachable(f"{self.address}: {down}")
    start = time.monotonic()
    until, attempt = start + self.retry.budget_s, 0
    while True:
      t0 = time.perf_counter()
      try:
        answer = fn(request, timeout=max(1e-3, min(self.deadline_s, until - time.monotonic())),
                    wait_for_ready=attempt > 0)  # a restarted server is waited for
        self.down.clear()
        return answer, time.perf_counter() - t0, attempt + 1
      except grpc.RpcError as e:
        code, details = e.code(), e.details()
      if code not in _RETRIED:
        raise ServerRefused(f"{self.address} answered {code.name}: {details}", code) from None
      pause = self.retry.pause(attempt, self._rng)
      attempt += 1
      if attempt > self.retry.retries or time.monotonic() + pause >= until:
        why = (f"{code.name} after {attempt} attempt{'s' * (attempt > 1)} in "
               f"{time.monotonic() - start:.1f} s "
               f"(retries {self.retry.retries}, budget {self.retry.budget_s:g} s): {details}")
        self.down.mark(why)
        raise ServerUnreachable(f"{self.address}: {why}") from None
      time.sleep(pause)

  def describe(self) -> pb.DescribeReply:
    d = self._call(self._describe, pb.DescribeRequest())[0]
    self._described = d
    return d

  def verify(self) -> pb.DescribeReply:
    """`Describe`, checked against what the edge expects: another geometry is
    an `errors.RcstError` (every payload would be refused), other weights a
    `ServerOtherWeights` unless allowed; `ServerUnreachable` if it does not
    answer. Done before the first answer is used, if `rcst run`'s connect
    could not."""
    d = self.describe()
    geo = self.geometry
    if (d.grid, d.patch) != (geo.grid, geo.patch):
      raise errors.RcstError(f"the server at {self.address} runs a {d.grid}x{d.grid} grid of "
                             f"{d.patch}-pixel patches; the calibration is for "
                             f"{geo.grid}x{geo.grid} of {geo.patch}")
    self._vouch(d.model_digest)
    return d

  def _vouch(self, digest: str) -> None:
    """Refuses (`ServerOtherWeights`) an answer from weights other than
    ``expect.digest``; with ``allow_other_weights`` warns once instead. A
    server that sends no digest (older than the field) is taken at its last
    `Describe`'s word."""
    if self.expect is None or self.expect.digest is None:
      return
    digest = digest or (self._described.model_digest if self._described else "")
    if digest == self.expect.digest:
      return
    msg = (f"the server at {self.address} answers from other weights ({digest or 'unknown'}) "
           f"than the calibration was made for ({self.expect.digest})")
    if not self.expect.allow_other_weights:
      raise ServerOtherWeights(msg + "; its answers are not used (--allow-other-weights uses "
                               "them, with no guarantee)")
    if digest not in self._warned:
      self._warned.add(digest)
      warnings.warn(msg + ": used anyway (--allow-other-weights); the CRC guarantee does not "
                    "apply", stacklevel=3)

  def _ready(self) -> None:
    """Before a classify call: the server checked (`verify`) if that was
    never done (a server known to be down fails it at once)."""
    if self.expect is not None and self._described is None:
      self.verify()

  def _metered_call(self, fn, request):
    """`_call`, and the bytes up and down the link took meanwhile (None unmetered)."""
    if not self.link:
      return *self._call(fn, request), None, None
    before = self.link.totals()
    answer, rtt, attempts = self._call(fn, request)
    after = self.link.totals()
    return answer, rtt, attempts, after[0] - before[0], after[1] - before[1]

  def classify(self, data: bytes) -> Reply:
    """The server's answer to one payload; `ServerOtherWeights` if it came
    from weights other than expected."""
    self._ready()
    r, rtt, attempts, up, down = self._metered_call(self._classify,
                                                    pb.ClassifyRequest(payload=data))
    self._vouch(r.model_digest)
    return _reply(r, rtt, up, down, attempts, r.model_digest)

  def classify_batch(self, payloads: Sequence[bytes]) -> list[Reply | errors.RcstError]:
    """Each payload's `Reply`, or the `ServerRefused` that names why the
    server refused it, or `ServerOtherWeights` for a call answered from other
    weights (`ServerUnreachable` is raised, as by `classify`). The payloads
    go in as few calls as the server's limits allow (`Describe`). A call's
    wire bytes are shared among its payloads in proportion to their sizes
    (summing to the call's exactly; None unmetered); its round trip is each
    one's ``rtt_s``."""
    self._ready()
    if self._limits is None:
      d = self._described or self.describe()
      # 64 bytes of the size cap kept for the request's own framing (`_calls`
      # counts each payload's field prefix).
      cap = min(d.max_message_bytes, protocol.MAX_REQUEST_BYTES)
      self._limits = (d.max_batch_payloads or 1, cap - 64)
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
      try:
        self._vouch(r.model_digest)
      except ServerOtherWeights as e:
        out += [e] * len(part)
        continue
      sizes = [len(p) for p in part]
      up, down = ((_share(up, sizes), _share(down, sizes)) if self.metered
                  else ([None] * len(part),) * 2)
      for i, x in enumerate(r.replies):
        out.append(ServerRefused(f"{self.address} answered INVALID_ARGUMENT: {x.error}",
                                 grpc.StatusCode.INVALID_ARGUMENT) if x.error
                   else _reply(x, rtt, up[i], down[i], attempts, r.model_digest))
    return out

  def close(self) -> None:
    self.channel.close()
    if self.link:
      self.link.close()
