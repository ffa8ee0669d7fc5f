"""A TCP relay on loopback that counts a link's bytes: `rcst run --meter`.

`Link(target)` listens on 127.0.0.1 and forwards every connection to
``target`` ((host, port), or a Unix socket path), counting the bytes each
way: what the edge's requests cost on the wire, HTTP/2 and gRPC framing
included. A measurement tool: `RemoteServer` goes through one only when
asked (``metered=True``), since every byte then crosses two more sockets.

For the benchmarks it can also shape the link: ``rate_bps`` paces each
direction like a token-bucket filter with no burst (1,500-byte pieces at the
rate) and ``delay_s`` adds one-way propagation delay, the user-space stand-in
for ``tc tbf`` + ``netem``. A Unix socket target keeps the relay's second hop
off the loopback interface, so a kernel `tc tbf` on ``lo`` (benchmarks/tbf.py)
shapes only the edge's hop (benchmarks/bench_link.py).
"""

from __future__ import annotations

import collections
import socket
import threading
import time

PIECE = 1500  # bytes paced at once: one Ethernet MTU


class _Direction:
  """One way of one connection: a reader stamping arrivals, a sender pacing them."""

  def __init__(self, link: "Link", src: socket.socket, dst: socket.socket, counter: str):
    self.link, self.src, self.dst, self.counter = link, src, dst, counter
    self.queue: collections.deque = collections.deque()
    self.ready = threading.Condition()
    self.done = False
    for target in (self._read, self._send):
      threading.Thread(target=target, daemon=True).start()

  def _read(self) -> None:
    try:
      while True:
        data = self.src.recv(65536)
        if not data:
          break
        with self.ready:
          self.queue.append((time.perf_counter(), data))
          self.ready.notify()
    except OSError:
      pass
    with self.ready:
      self.done = True
      self.ready.notify()

  def _send(self) -> None:
    link, free = self.link, 0.0
    try:
      while True:
        with self.ready:
          while not self.queue and not self.done:
            self.ready.wait()
          if not self.queue:
            break
          arrived, data = self.queue.popleft()
        _sleep_until(arrived + link.delay_s)
        for i in range(0, len(data), PIECE if link.rate_bps else len(data)):
          piece = data[i:i + PIECE] if link.rate_bps else data
          if link.rate_bps:
            free = max(free, time.perf_counter()) + len(piece) * 8 / link.rate_bps
            _sleep_until(free)
          link.count(self.counter, len(piece))  # before: the reply may be read at once
          self.dst.sendall(piece)
    except OSError:
      pass
    for s in (self.dst, self.src):  # one side gone: close both, as a broken link would
      try:
        s.shutdown(socket.SHUT_RDWR)
      except OSError:
        pass


def _sleep_until(t: float) -> None:
  while (left := t - time.perf_counter()) > 0:
    time.sleep(left)


def _connect(target) -> socket.socket:
  if isinstance(target, str):  # a Unix socket path
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
      s.connect(target)
    except OSError:
      s.close()
      raise
  else:
    s = socket.create_connection(target, timeout=5)
  s.settimeout(None)
  return s


class Link:
  """Relay 127.0.0.1:``port`` -> ``target``; ``up`` and ``down``: bytes
  forwarded towards the target and back."""

  def __init__(self, target: tuple[str, int] | str, rate_bps: float | None = None,
               delay_s: float = 0.0):
    self.target, self.rate_bps, self.delay_s = target, rate_bps, delay_s
    self.up = self.down = 0
    self._lock = threading.Lock()
    self._listener = socket.create_server(("127.0.0.1", 0))
    self.port = self._listener.getsockname()[1]
    self._closed = False
    threading.Thread(target=self._accept, daemon=True).start()

  @property
  def address(self) -> str:
    return f"127.0.0.1:{self.port}"

  def count(self, counter: str, n: int) -> None:
    with self._lock:
      setattr(self, counter, getattr(self, counter) + n)

  def totals(self) -> tuple[int, int]:
    with self._lock:
      return self.up, self.down

  def _accept(self) -> None:
    while not self._closed:
      try:
        client, _ = self._listener.accept()
      except OSError:
        return
      try:
        upstream = _connect(self.target)
      except OSError:  # target down: refuse as it would have
        client.close()
        continue
      for s in (client, upstream):
        if s.family != socket.AF_UNIX:
          s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
      _Direction(self, client, upstream, "up")
      _Direction(self, upstream, client, "down")

  def close(self) -> None:
    self._closed = True
    self._listener.close()
