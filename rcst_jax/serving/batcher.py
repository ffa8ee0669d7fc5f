"""Dynamic batching: concurrent requests answered by one server call.

A request waits at most ``max_wait_s`` after the first one of its batch for
others to arrive (or until ``max_requests`` have); the batch then runs as one
call, which `Server.logits_from_decoded` splits by kept-token bucket. The
server runs each bucket's rows one by one inside one compiled loop
(`Server.row_by_row`), so a request's logits are bit for bit those it gets
alone (XLA on CPU rounds a batch of two differently from a batch of one).
"""

from __future__ import annotations

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
    self._closed = threading.Event()
    self._thread = threading.Thread(target=self._loop, name="rcst-batcher", daemon=True)
    self._thread.start()

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

  def _take(self) -> list:
    first = self._queue.get()
    if first is None:
      return []
    batch, until = [first], time.perf_counter() + self.max_wait_s
    while len(batch) < self.max_requests:
      try:
        nxt = self._queue.get(timeout=max(0.0, until - time.perf_counter()))
      except queue.Empty:
        break
      if nxt is None:
        self._queue.put(None)  # seen again by the loop, after this batch
        break
      batch.append(nxt)
    return batch

  def _loop(self) -> None:
    while True:
      batch = self._take()
      if not batch:
        return
      batch = [b for b in batch if b[1].set_running_or_notify_cancel()]
      if not batch:
        continue
      t0 = time.perf_counter()
      try:
        logits = self._run([item for item, _, _ in batch])
      except Exception as e:  # answered to every request of the batch; the loop goes on
        for _, future, _ in batch:
          future.set_exception(e)
        continue
      spent = time.perf_counter() - t0
      for row, (_, future, submitted) in zip(logits, batch):
        future.set_result(Answer(row, len(batch), t0 - submitted, spent))
