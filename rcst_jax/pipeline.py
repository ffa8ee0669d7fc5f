"""Algorithm 2: the edge step, the token-subset server, and the two together.

edge_step:  uint8 images -> edge softmax, CRC acceptance (Eq. 15), APS set,
            APS-guided Grad-CAM and P x P patch scores (one jitted function,
            one forward and one backward pass per batch).
Server:     (patches, idx, valid) -> DeiT on those tokens alone, batched by
            kept-token bucket so jit compiles a few shapes only. The sweep
            engine gathers the patches on the device; `rcst run` feeds the
            patches it decoded from the payloads the edge encoded.
collaborative_inference: both, with the decision of `methods.decide` and the
            combination of `methods.combine`, i.e. the same code as the sweep.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rcst_jax import conformal, methods, patches, saliency, spmd, transmit
from rcst_jax.checkpoints import Model
from rcst_jax.data import normalize
from rcst_jax.geometry import Geometry


@functools.partial(jax.jit, static_argnames=("module", "mean", "std", "layer", "grid",
                                             "sharding"))
def _edge_step(variables, images, lambda_hat, q_hat, *, module, mean, std, layer, grid,
               sharding=None):
  # Per device: the micro-batched trunk would otherwise run the whole batch on
  # every device (see rcst_jax.spmd).
  return spmd.per_device(functools.partial(_edge_rows, module=module, mean=mean, std=std,
                                           layer=layer, grid=grid), sharding)(
      variables, images, lambda_hat, q_hat)


def _edge_rows(variables, images, lambda_hat, q_hat, *, module, mean, std, layer, grid):
  x = normalize(images, mean, std)
  res = saliency.aps_grad_cam(module, variables, x,
                              lambda probs: conformal.aps_set(probs, q_hat)[0],
                              layer=layer, grid=grid)
  probs = res["probs"]
  p_max = probs.max(-1)
  res.update(p_max=p_max, pred=jnp.argmax(probs, -1).astype(jnp.int32),
             accept=p_max >= lambda_hat, aps_size=res["aps_mask"].sum(-1).astype(jnp.int32))
  del res["logits"]
  return res


def edge_step(edge: Model, images, lambda_hat, q_hat, *, layer: str = "features",
              grid: int = 14, sharding=None) -> dict:
  """The complete edge computation for a batch of uint8 images [B, H, W, 3].

  Returns probs [B,C], p_max, pred, accept (p_max >= lambda_hat, Eq. 15),
  aps_mask [B,C] (Eqs. 17-18), aps_size, cam [B,h,w] (Eq. 22 before Up) and
  patch_scores [B, grid*grid] (Eq. 23). ``sharding``: the NamedSharding that
  splits ``images`` along the batch (multi-device): each device then runs its
  own rows (:func:`rcst_jax.spmd.per_device`); the results are the same.
  """
  edge = edge.inference()  # e.g. BatchNorm folded; computed once per Model
  return _edge_step(edge.variables, images, jnp.float32(lambda_hat), jnp.float32(q_hat),
                    module=edge.module, mean=tuple(edge.metadata["mean"]),
                    std=tuple(edge.metadata["std"]), layer=layer, grid=grid, sharding=sharding)


def edge_view(e: dict) -> dict:
  """The proposed edge's outputs as `methods.decide` reads them."""
  return {"pred": e["pred"], "accept": e["accept"], "scores": e["patch_scores"]}


# ---------------------------------------------------------------- server


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


def _pad_rows(a, rows: int):
  a = np.asarray(a)
  return np.pad(a, [(0, rows - len(a))] + [(0, 0)] * (a.ndim - 1))


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
  seconds of its calls (blocking, so per-bucket time is wall time)."""
  by_bucket: dict = dataclasses.field(default_factory=dict)

  def add(self, bucket: int, rows: int, padded_rows: int, useful: int, seconds: float):
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
  ``batch_size``), the remainder in power-of-two batches (:func:`batch_rows`),
  no smaller than ``min_batch`` rows, so padding rows cost about 1/8 of the
  last batch of a bucket, or fewer than ``min_batch`` rows. Compiled shapes:
  per bucket the full batch and powers of two (times the device count) from
  ``min_batch`` up, at most ``len(buckets) * (1 + log2(batch_size /
  min_batch))``. Each shape is one more compilation (~0.5 s for the demo
  server on CPU), which the whole demo sweep does not win back (its buckets
  get hundreds of rows per chunk: 1.125 processed/useful tokens with full
  batches only), so ``min_batch`` defaults to ``batch_size``: the last
  batch of a bucket padded to a full one, as before. Lower it (e.g.
  ``batch_size // 8``) for a long-lived server fed small calls.
  ``sharding``: optional NamedSharding for the batch axis (multi-device);
  every batch is then a multiple of its mesh size. ``stats`` accumulates the
  processed and useful tokens of every call (:class:`ServerStats`).
  """
  model: Model
  batch_size: int = 64
  buckets: Sequence[int] = patches.BUCKETS
  sharding: object = None
  token_budget: int | None = None
  min_batch: int | None = None
  stats: ServerStats = dataclasses.field(default_factory=ServerStats, repr=False)

  @property
  def geometry(self) -> Geometry:
    return Geometry.of_server(self.model)

  def _cap(self, bucket: int, multiple: int) -> int:
    """Rows per full batch of ``bucket``: the token budget, in whole device rows."""
    cap = self.batch_size
    if self.token_budget is not None:
      cap = min(cap, self.token_budget // (bucket + 1))
    return max(multiple, cap // multiple * multiple)

  def _run(self, fn, keep: np.ndarray, rows_to_input, inputs, **static) -> np.ndarray:
    out = np.zeros((len(keep), self.model.num_classes), np.float32)
    multiple = 1 if self.sharding is None else int(self.sharding.mesh.size)
    for rows, idx, valid in patches.iter_buckets(keep, self.buckets):
      idx, valid = np.asarray(idx), np.asarray(valid)
      bucket, start = idx.shape[1], 0
      cap = self._cap(bucket, multiple)
      smallest = cap if self.min_batch is None else min(cap, self.min_batch)
      for size in batch_rows(len(rows), cap, multiple, smallest=smallest):
        t0 = time.perf_counter()
        n = min(size, len(rows) - start)
        sel, part = rows[start:start + n], slice(start, start + n)
        args = [_pad_rows(a, size) for a in
                (inputs(rows_to_input[sel], idx[part]), idx[part], valid[part])]
        if self.sharding is not None:
          args = [jax.device_put(a, self.sharding) for a in args]
        res = fn(self.model.variables, *args, module=self.model.module, **static)
        out[sel] = np.asarray(res)[:n]
        self.stats.add(bucket, n, size, int(valid[part].sum()) + n, time.perf_counter() - t0)
        start += n
    return out

  def logits_from_images(self, images: np.ndarray, keep: np.ndarray, rows=None) -> np.ndarray:
    """keep [R,N] bool -> logits [R,C] for images[rows] ([B,H,W,3] uint8; the
    kept patches are gathered on the device). ``rows`` maps keep rows to
    images (default 1:1)."""
    images, keep = np.asarray(images), np.asarray(keep, bool)
    rows = np.arange(len(keep)) if rows is None else np.asarray(rows)
    return self._run(_server_from_images, keep, rows, lambda r, _: images[r],
                     patch=self.geometry.patch)

  def logits_from_payloads(self, payloads: Sequence[bytes]) -> np.ndarray:
    """The server side of `rcst run`: decode each payload, classify its tokens."""
    geo = self.geometry
    decoded = [transmit.decode_payload(p) for p in payloads]
    for _, _, grid in decoded:
      if grid != geo.grid:
        raise transmit.PayloadError(f"payload grid {grid} does not match the server's "
                                    f"{geo.grid}x{geo.grid}")
    keep = np.zeros((len(decoded), geo.num_patches), bool)
    for row, (_, idx, _) in zip(keep, decoded):
      row[idx] = True

    def inputs(rows, idx):
      # Decoded patches are in ascending index order, as pad_selection's slots.
      out = np.zeros(idx.shape + (geo.patch, geo.patch, geo.channels), np.uint8)
      for j, r in enumerate(rows):
        got = decoded[r][0]
        out[j, :len(got)] = got
      return out
    return self._run(_server_from_patches, keep, np.arange(len(decoded)), inputs)


# ---------------------------------------------------------------- Algorithm 2


def edge_step_batched(edge: Model, images, lambda_hat, q_hat, *, layer: str, grid: int,
                      batch_size: int, sharding=None) -> dict:
  """`edge_step` over images in memory, `batch_size` at a time (the last batch
  padded, so one shape compiles), as numpy arrays."""
  parts = []
  for start in range(0, len(images), batch_size):
    chunk = images[start:start + batch_size]
    x = chunk if len(chunk) == batch_size else _pad_rows(chunk, batch_size)
    if sharding is not None:
      x = jax.device_put(x, sharding)
    e = jax.device_get(edge_step(edge, x, lambda_hat, q_hat, layer=layer, grid=grid,
                                 sharding=sharding))
    parts.append({k: np.asarray(v)[:len(chunk)] for k, v in e.items()})
  if not parts:
    raise ValueError("no images given")
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def collaborative_inference(images, edge: Model, server: Model,
                            calibration: conformal.Calibration, tau: float, *,
                            batch_size: int = 16, server_batch: int = 16,
                            buckets: Sequence[int] = patches.BUCKETS) -> dict:
  """Algorithm 2 on uint8 images [B, H, W, 3], `batch_size` images per edge call.

  The edge decides with `methods.decide` (the sweep's rule), encodes each
  offloaded image's payload, and the server classifies what it decodes.
  The Grad-CAM layer is the one the calibration recorded. Returns final
  predictions, acceptance, kept-patch masks (all False for accepted images)
  and the bytes of the payloads actually encoded.
  """
  images = np.asarray(images, np.uint8)
  geo = Geometry.of_server(server)
  if images.ndim != 4 or images.shape[1:] != (geo.image_size, geo.image_size, geo.channels):
    raise ValueError(f"images must be uint8 [B, {geo.image_size}, {geo.image_size}, "
                     f"{geo.channels}] (the server's geometry), got {images.shape}")
  layer = calibration.gradcam_layer or "features"
  e = edge_step_batched(edge, images, calibration.lambda_hat, calibration.q_hat, layer=layer,
                        grid=geo.grid, batch_size=batch_size)
  off, keep, fallback = methods.decide(methods.PROPOSED, edge_view(e), [tau])
  off, keep = off[0], keep[0]
  # Edge side: one payload per offloaded image; server side: decode and classify.
  payloads = {i: transmit.encode_image_payload(images[i], keep[i], geo)
              for i in np.flatnonzero(off)}
  server_pred = np.full(len(images), -1, np.int32)
  if payloads:
    logits = Server(server, server_batch, buckets).logits_from_payloads(list(payloads.values()))
    server_pred[list(payloads)] = logits.argmax(-1)
  nbytes = np.zeros(len(images), np.int64)
  nbytes[list(payloads)] = [len(p) for p in payloads.values()]
  return {"pred": methods.combine(off, server_pred, fallback), "accepted": ~off,
          "offloaded": off, "edge_pred": fallback, "server_pred": server_pred, "keep": keep,
          "kept": keep.sum(-1), "bytes": nbytes, "p_max": e["p_max"], "probs": e["probs"],
          "aps_mask": e["aps_mask"], "patch_scores": e["patch_scores"], "cam": e["cam"]}
