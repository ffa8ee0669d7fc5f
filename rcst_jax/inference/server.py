"""The token-subset server of Algorithm 2: DeiT on the kept patches alone.

(patches, idx, valid) -> logits, batched by kept-token bucket so jit compiles
a few shapes only. The sweep gathers the patches on the device from whole
images; `rcst run` feeds the patches it decoded from the edge's payloads.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import threading
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rcst_edge.payload import message as payload
from rcst_edge.payload.geometry import Geometry
from rcst_jax.inference import patches
from rcst_jax.inference.edge import pad_rows
from rcst_jax.models.checkpoints import Model


def _server_tokens(variables, sent, idx, valid, module):
  return module.apply(variables, sent, idx, valid, method="tokens")[0]


@functools.partial(jax.jit, static_argnames=("module",))
def _server_from_patches(variables, sent, idx, valid, *, module):
  return _server_tokens(variables, sent, idx, valid, module)


@functools.partial(jax.jit, static_argnames=("module", "patch"))
def _server_from_images(variables, images, idx, valid, *, module, patch):
  # Gathering on the device: only the kept patches enter the server.
  return _server_tokens(variables, patches.gather_patches(images, idx, patch), idx, valid,
                        module)


@functools.partial(jax.jit, static_argnames=("module",))
def _server_row_by_row(variables, sent, idx, valid, n, *, module):
  # One row at a time, the first n rows only: each row runs the batch-1
  # program, so its logits do not depend on what else the call holds (XLA:CPU
  # rounds a batch-2 matmul differently from a batch-1 one), and a call costs
  # its real rows, not its padded shape.
  def body(i, out):
    row = [jax.lax.dynamic_slice_in_dim(a, i, 1) for a in (sent, idx, valid)]
    logits = _server_tokens(variables, *row, module).astype(jnp.float32)
    return jax.lax.dynamic_update_slice_in_dim(out, logits, i, 0)
  out = jnp.zeros((idx.shape[0], module.num_classes), jnp.float32)
  return jax.lax.fori_loop(0, n, body, out)


def batch_rows(n: int, cap: int, multiple: int = 1, slack: float = 0.125,
               smallest: int = 1) -> list[int]:
  """Padded row counts of the batches that run ``n`` rows of one bucket.

  Full batches of ``cap`` rows, then the remainder as batches of
  ``multiple * 2**j >= smallest`` rows: the smallest such shape if it pads at
  most ``slack`` of its rows, else the largest one that fits and repeat. So
  the shapes per bucket are ``cap`` and at most ``1 + log2(cap / smallest)``
  powers of two, and the padding rows are about ``slack`` of the last batch
  (or below ``smallest`` rows: a floor on shapes, since every shape is one
  more compilation, and a sharded batch needs whole rows per device).
  ``cap`` must be a multiple of ``multiple``.
  """
  if cap % multiple:
    raise ValueError(f"batch of {cap} rows is not a multiple of {multiple} devices")
  out = [cap] * (n // cap)
  n -= cap * len(out)
  floor = multiple << max(0, -(-smallest // multiple) - 1).bit_length()
  while n > 0:
    units = -(-n // multiple)  # device rows needed, rounded up to a power of two
    up = min(cap, max(floor, multiple << (units - 1).bit_length()))
    if up - n <= slack * up or up <= floor:
      out.append(up)
      break
    down = multiple << ((n // multiple).bit_length() - 1)
    out.append(down)
    n -= down
  return out


@dataclasses.dataclass
class ServerStats:
  """Tokens the server processed (padding rows and slots, CLS included) and
  the useful ones (kept patches + CLS of real rows), per bucket, with the
  seconds of its calls (blocking; calls run concurrently add up to more than
  the wall time)."""
  by_bucket: dict = dataclasses.field(default_factory=dict)
  _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False,
                                            compare=False)

  def add(self, bucket: int, rows: int, padded_rows: int, useful: int, seconds: float):
    with self._lock:  # calls in flight add from their threads
      b = self.by_bucket.setdefault(bucket, dict(rows=0, batches=0, processed=0, useful=0,
                                                 seconds=0.0, shapes=set()))
      b["rows"] += rows
      b["batches"] += 1
      b["processed"] += padded_rows * (bucket + 1)
      b["useful"] += useful
      b["seconds"] += seconds
      b["shapes"].add(padded_rows)

  def merge(self, other: "ServerStats") -> "ServerStats":
    for bucket, o in other.by_bucket.items():
      b = self.by_bucket.setdefault(bucket, dict(rows=0, batches=0, processed=0, useful=0,
                                                 seconds=0.0, shapes=set()))
      for k in ("rows", "batches", "processed", "useful", "seconds"):
        b[k] += o[k]
      b["shapes"] |= o["shapes"]
    return self

  @property
  def processed(self) -> int:
    return sum(b["processed"] for b in self.by_bucket.values())

  @property
  def useful(self) -> int:
    return sum(b["useful"] for b in self.by_bucket.values())

  @property
  def ratio(self) -> float:
    return self.processed / max(self.useful, 1)

  def shapes(self) -> set:
    return {(bucket, r) for bucket, b in self.by_bucket.items() for r in b["shapes"]}


@dataclasses.dataclass
class Server:
  """Token-subset server inference, bucketed by kept-token count.

  Each bucket runs in batches of at most ``batch_size`` rows and at most
  ``token_budget`` tokens (CLS included; default: no limit below
  ``batch_size``), the remainder in power-of-two batches (:func:`batch_rows`)
  no smaller than ``min_batch`` rows. Compiled shapes per bucket: the full
  batch and powers of two (times the device count) from ``min_batch`` up.
  Every shape is one more compilation, so ``min_batch`` defaults to
  ``batch_size`` (the last batch of a bucket padded to a full one), which
  suits a sweep's large buckets; lower it (e.g. ``batch_size // 8``) for a
  long-lived server fed small calls. ``sharding``: optional NamedSharding
  for the batch axis (every batch then a multiple of its mesh size).
  ``stats`` accumulates the processed and useful tokens of every call.

  ``row_by_row`` (decoded payloads only): each call loops over its real rows
  inside one compiled program per bucket (`_server_row_by_row`), so every
  row gets bit for bit the logits of the plain batch-1 call whatever else
  the call holds, and a call of n rows costs n rows, not its padded shape:
  the form for a server fed a few concurrent requests at a time (`rcst
  serve`). A sweep's full batches run faster as plain batches.

  ``concurrency``: calls in flight at once, from host threads. XLA:CPU keeps
  about one core busy with one call of this small DeiT even with its thread
  pool, so on a 2-core host two calls at once answer 1.2-1.7x the rows per
  second (benchmarks/bench_server_calls.py). Each call's logits are the same
  whichever thread runs it. The threads are made once per Server (`rcst
  serve` runs a call every few milliseconds).
  """
  model: Model
  batch_size: int = 64
  buckets: Sequence[int] = patches.BUCKETS
  sharding: object = None
  token_budget: int | None = None
  min_batch: int | None = None
  row_by_row: bool = False
  concurrency: int = 1
  stats: ServerStats = dataclasses.field(default_factory=ServerStats, repr=False)
  _executor: concurrent.futures.ThreadPoolExecutor | None = dataclasses.field(
      default=None, init=False, repr=False, compare=False)
  _executor_lock: threading.Lock = dataclasses.field(
      default_factory=threading.Lock, init=False, repr=False, compare=False)

  @property
  def geometry(self) -> Geometry:
    return Geometry.of_server(self.model)

  def _pool(self) -> concurrent.futures.ThreadPoolExecutor:
    with self._executor_lock:
      if self._executor is None:
        self._executor = concurrent.futures.ThreadPoolExecutor(
            self.concurrency, thread_name_prefix="rcst-server")
      return self._executor

  def _cap(self, bucket: int, multiple: int) -> int:
    """Rows per full batch of ``bucket``: the token budget, in whole device rows."""
    cap = self.batch_size
    if self.token_budget is not None:
      cap = min(cap, self.token_budget // (bucket + 1))
    return max(multiple, cap // multiple * multiple)

  def _smallest(self, cap: int) -> int:
    if self.row_by_row:  # one shape per bucket: a call costs its real rows anyway
      return cap
    return cap if self.min_batch is None else min(cap, self.min_batch)

  def _run(self, fn, keep: np.ndarray, rows_to_input, inputs, **static) -> np.ndarray:
    out = np.zeros((len(keep), self.model.num_classes), np.float32)
    multiple = 1 if self.sharding is None else int(self.sharding.mesh.size)
    if self.row_by_row:
      if fn is not _server_from_patches or self.sharding is not None:
        raise ValueError("row_by_row serves decoded payloads (logits_from_decoded) on one "
                         "device only")
      fn = _server_row_by_row
    calls = []
    for rows, idx, valid in patches.iter_buckets(keep, self.buckets):
      idx, valid = np.asarray(idx), np.asarray(valid)
      cap, start = self._cap(idx.shape[1], multiple), 0
      for size in batch_rows(len(rows), cap, multiple, smallest=self._smallest(cap)):
        n = min(size, len(rows) - start)
        calls.append((size, rows[start:start + n], idx[start:start + n], valid[start:start + n]))
        start += n

    def call(size, sel, idx, valid):
      t0, n = time.perf_counter(), len(sel)
      args = [pad_rows(a, size) for a in (inputs(rows_to_input[sel], idx), idx, valid)]
      if self.sharding is not None:
        args = [jax.device_put(a, self.sharding) for a in args]
      if self.row_by_row:
        args.append(np.int32(n))
      res = fn(self.model.variables, *args, module=self.model.module, **static)
      out[sel] = np.asarray(res)[:n]
      self.stats.add(idx.shape[1], n, n if self.row_by_row else size, int(valid.sum()) + n,
                     time.perf_counter() - t0)

    if self.concurrency > 1 and len(calls) > 1:
      for f in [self._pool().submit(call, *c) for c in calls]:
        f.result()  # an error of any call is raised here
    else:
      for c in calls:
        call(*c)
    return out

  def logits_from_images(self, images: np.ndarray, keep: np.ndarray, rows=None) -> np.ndarray:
    """keep [R,N] bool -> logits [R,C] for images[rows] ([B,H,W,3] uint8; the
    kept patches are gathered on the device). ``rows`` maps keep rows to
    images (default 1:1)."""
    images, keep = np.asarray(images), np.asarray(keep, bool)
    rows = np.arange(len(keep)) if rows is None else np.asarray(rows)
    return self._run(_server_from_images, keep, rows, lambda r, _: images[r],
                     patch=self.geometry.patch)

  def decode(self, data: bytes) -> payload.Decoded:
    """One payload decoded and checked against the server's geometry
    (`payload.PayloadError` naming the problem otherwise)."""
    geo, d = self.geometry, payload.decode_payload(data)
    if d.grid != geo.grid or d.patches.shape[1:] != (geo.patch, geo.patch, geo.channels):
      raise payload.PayloadError(
          f"payload of a {d.grid}x{d.grid} grid of {d.patches.shape[1]}-pixel patches does "
          f"not match the server's {geo.grid}x{geo.grid} grid of {geo.patch}-pixel patches")
    return d

  def logits_from_payloads(self, payloads: Sequence[bytes]) -> np.ndarray:
    """The server side of `rcst run`: decode each payload, classify its tokens."""
    return self.logits_from_decoded([self.decode(p) for p in payloads])

  def logits_from_decoded(self, decoded: Sequence[payload.Decoded]) -> np.ndarray:
    """Logits [R, C] for decoded payloads (`decode`), batched by bucket."""
    geo = self.geometry
    keep = np.zeros((len(decoded), geo.num_patches), bool)
    for row, d in zip(keep, decoded):
      row[d.idx] = True

    def inputs(rows, idx):
      # Decoded patches are in ascending index order, as pad_selection's slots.
      out = np.zeros(idx.shape + (geo.patch, geo.patch, geo.channels), np.uint8)
      for j, r in enumerate(rows):
        got = decoded[r].patches
        out[j, :len(got)] = got
      return out
    return self._run(_server_from_patches, keep, np.arange(len(decoded)), inputs)

  def warm_up(self) -> int:
    """Compiles every (bucket, batch shape) that decoded payloads can run
    (`logits_from_decoded`), so no request pays for it; returns the count."""
    geo = self.geometry
    multiple = 1 if self.sharding is None else int(self.sharding.mesh.size)
    zeros = lambda rows, idx: np.zeros(idx.shape + (geo.patch, geo.patch, geo.channels),
                                       np.uint8)
    shapes = 0
    for bucket in self.buckets:
      cap = self._cap(bucket, multiple)
      smallest = self._smallest(cap)
      for size in sorted({s for n in range(1, cap + 1)
                          for s in batch_rows(n, cap, multiple, smallest=smallest)}):
        keep = np.zeros((size, geo.num_patches), bool)
        keep[:, :bucket] = True
        self._run(_server_from_patches, keep, np.arange(size), zeros)
        shapes += 1
    self.stats = ServerStats()
    return shapes
