"""Dynamic batching: concurrent requests answered by one server call.

A request waits at most ``max_wait_s`` after the first one of its batch for
others to arrive (or until ``max_requests`` have), and only while more may
come: another request is on its way (`arriving`: received and being
decoded), or the previous batch had company (requests under load arrive
spread out, and larger batches cost less CPU each). A lone client's
requests therefore run at once instead of waiting ``max_wait_s`` each. The
batch then runs as one call, which `Server.logits_from_decoded` splits by
kept-token bucket; should it fail, each request runs again alone, so only
one that fails on its own gets the error. The server runs each bucket's
rows one by one inside one compiled loop (`Server.row_by_row`), so a
request's logits are bit for bit those it gets alone (XLA on CPU rounds a
batch of two differently from a batch of one).
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import threading
import time
from concurrent.futures import Future
from typing import Callable, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Answer:
  logits: np.ndarray   # [C] float32
  batch_requests: int  # requests answered by the same call
  queue_s: float       # from submission to the call's start
  compute_s: float     # the call


class DynamicBatcher:
  """One worker thread feeding ``run`` (items -> logits [R, C]) with batches."""

  def __init__(self, run: Callable[[Sequence], np.ndarray], max_requests: int = 32,
               max_wait_s: float = 0.002):
    if max_requests < 1 or max_wait_s < 0:
      raise ValueError(f"max_requests >= 1 and max_wait_s >= 0, got {max_requests}, "
                       f"{max_wait_s}")
    self._run, self.max_requests, self.max_wait_s = run, max_requests, max_wait_s
    self._queue: queue.Queue = queue.Queue()
    self._arriving, self._arriving_lock = 0, threading.Lock()
    self._last_batch = 0  # requests in the previous batch
    self._closed = threading.Event()
    self._thread = threading.Thread(target=self._loop, name="rcst-batcher", daemon=True)
    self._thread.start()

  @contextlib.contextmanager
  def arriving(self):
    """Around a request from its receipt: while it is inside and has not
    been submitted (``arrival.submit(item)``), a forming batch waits for it
    (up to ``max_wait_s``)."""
    arrival = _Arrival(self)
    try:
      yield arrival
    finally:
      arrival.leave()

  def submit(self, item) -> Future:
    if self._closed.is_set():
      raise RuntimeError("the batcher is closed")
    future: Future = Future()
    self._queue.put((item, future, time.perf_counter()))
    return future

  def close(self) -> None:
    self._closed.set()
    self._queue.put(None)
    self._thread.join()

  def _count_arriving(self, delta: int) -> None:
    with self._arriving_lock:
      self._arriving += delta

  def _take(self) -> list:
    first = self._queue.get()
    if first is None:
      return []
    batch, until = [first], time.perf_counter() + self.max_wait_s
    while len(batch) < self.max_requests:
      if self._last_batch <= 1 and not self._arriving and self._queue.empty():
        break  # quiet, and nothing on its way: waiting would only delay it
      try:
        nxt = self._queue.get(timeout=max(0.0, until - time.perf_counter()))
      except queue.Empty:
        break
      if nxt is None:
        self._queue.put(None)  # seen again by the loop, after this batch
        break
      batch.append(nxt)
    self._last_batch = len(batch)
    return batch

  def _loop(self) -> None:
    while True:
      batch = self._take()
      if not batch:
        return
      batch = [b for b in batch if b[1].set_running_or_notify_cancel()]
      if not batch:
        continue
      self._answer(batch)

  def _answer(self, batch: list) -> None:
    t0 = time.perf_counter()
    try:
      logits = self._run([item for item, _, _ in batch])
    except Exception as e:
      if len(batch) == 1:  # answered to its request alone; the loop goes on
        batch[0][1].set_exception(e)
      else:  # one request's failure is not its batch's: each runs again alone
        for one in batch:
          self._answer([one])
      return
    spent = time.perf_counter() - t0
    for row, (_, future, submitted) in zip(logits, batch):
      future.set_result(Answer(row, len(batch), t0 - submitted, spent))


class _Arrival:
  """One request on its way to a `DynamicBatcher` (see `arriving`)."""

  def __init__(self, batcher: DynamicBatcher):
    self._batcher, self._here = batcher, True
    batcher._count_arriving(+1)

  def leave(self) -> None:
    if self._here:
      self._here = False
      self._batcher._count_arriving(-1)

  def submit(self, item) -> Future:
    # Counted out before it is queued: a batch that saw it neither queued nor
    # on its way starts without it and the next takes it, never waits on it.
    self.leave()
    return self._batcher.submit(item)
