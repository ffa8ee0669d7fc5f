"""The model passes of a sweep over one set of images, placed on the run's mesh.

`edge_pass`: the edge step (CRC acceptance, APS Grad-CAM patch scores) and,
for the baselines, the DeiT-Tiny edge (softmax + CLS attention), once per
image. `sweep`: every (method, params) of a plan decided in one vmapped call
per method (`methods.decide`), the server once per distinct (image, kept
set) over all points. These are the functions `rcst run` uses, so the sweep
cannot disagree with it.
"""

from __future__ import annotations

import collections
import dataclasses
import time

import jax
import numpy as np

from rcst_edge.payload import codecs as codecs_lib
from rcst_edge.payload import message as payload
from rcst_edge.payload.geometry import Geometry
from rcst_jax.core import spmd
from rcst_jax.data import batches
from rcst_jax.inference import edge as edge_lib
from rcst_jax.inference import methods
from rcst_jax.inference.server import Server
from rcst_jax.models.loading import Models


def dedup_rows(offloaded: np.ndarray, keep: np.ndarray):
  """Distinct (image, kept set) pairs over all points.

  offloaded [P, n], keep [P, n, N] -> (image of each row [R], keep [R, N],
  row id [P, n], -1 where not offloaded).
  """
  p, n, _ = keep.shape
  image = np.broadcast_to(np.arange(n, dtype=np.uint32)[None], (p, n))[offloaded]
  bits = np.packbits(keep[offloaded], axis=-1)
  key = np.concatenate([image.astype(">u4").view(np.uint8).reshape(-1, 4), bits], axis=1)
  key = np.ascontiguousarray(key).view(np.dtype((np.void, key.shape[1]))).ravel()
  _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
  ids = np.full((p, n), -1, np.int64)
  ids[offloaded] = inverse.ravel()
  return image[first].astype(np.int64), keep[offloaded][first], ids


def point_arrays(off, keep, fallback, server_pred, codec_server_pred, codec_bytes) -> dict:
  """What a chunk stores per operating point (cache.POINT_KEYS, [P, n], raw
  patches) and per codec and point (cache.CODEC_KEYS, [C, P, n]), Eq. 27 included."""
  return {"offloaded": off, "kept": keep.sum(-1).astype(np.int16), "server_pred": server_pred,
          "pred": methods.combine(off, server_pred, fallback),
          "codec_server_pred": codec_server_pred, "codec_bytes": codec_bytes,
          "codec_pred": methods.combine(off[None], codec_server_pred, fallback[None])}


def _rows_of(ids, off, points, codecs):
  """The distinct rows that the points marked in ``points`` send (None: all)."""
  if points is None or np.all(points):
    return None
  if any(not c.lossy and c != codecs_lib.RAW for c in codecs):
    raise ValueError("a lossless codec shares raw's answers: raw is needed at every point")
  need = np.zeros(int(ids.max()) + 1 if ids.size else 0, bool)
  need[ids[np.asarray(points, bool)[:, None] & off]] = True
  return np.flatnonzero(need)


@dataclasses.dataclass
class EdgeOutputs:
  edge: dict          # the proposed edge's per-image arrays
  base: dict          # the baseline edge's (empty without it)
  images: np.ndarray  # the usable images, uint8
  labels: np.ndarray
  keys: list


class Passes:
  """The run's models on its mesh, and the passes the sweep makes with them."""

  def __init__(self, config, models: Models, mesh, geometry: Geometry):
    self.config, self.geometry = config, geometry
    self.sharding = spmd.batch_sharding(mesh)
    rep = spmd.replicated(mesh)
    put = lambda m: dataclasses.replace(m, variables=jax.device_put(m.variables, rep))
    self.edge, self.server, self.base = (put(models.edge), put(models.server),
                                         put(models.baseline_edge))
    if models.deployed_edge is not None:  # an exported edge decides: ONNX Runtime, on the host
      self.edge = models.deployed_edge
    self._base_probs = edge_lib.softmax_fn(self.base, with_attn=True)
    # Edge and server calls in flight at once (XLA:CPU keeps one core busy per call).
    self.concurrency = spmd.host_concurrency(int(config.get("host_concurrency", 0)),
                                             self.sharding)
    self.coding_s = 0.0  # host time spent coding payloads (counting bytes, lossy pixels)

  def batches(self, source, indices, desc: str, skipped=None, progress: bool = True):
    skipped = collections.Counter() if skipped is None else skipped
    return batches(source, indices, int(self.config.batch_size), skipped=skipped,
                   progress=progress, desc=desc)

  def edge_pass(self, batch_iter, lambda_hat: float, q_hat: float,
                with_base: bool = True) -> EdgeOutputs | None:
    """The edges on every usable image of ``batch_iter`` (the proposed one
    accepting at lambda_hat, its APS sets at q_hat); None if none is usable."""
    edge, base = collections.defaultdict(list), collections.defaultdict(list)
    images, labels, keys = [], [], []

    def run(b):
      x = jax.device_put(b.images, self.sharding)
      e = jax.device_get(edge_lib.edge_outputs(
          self.edge, x, lambda_hat, q_hat, layer=self.config.gradcam_layer,
          grid=self.geometry.grid, sharding=self.sharding))
      return b, e, (jax.device_get(self._base_probs(x)) if with_base else None)
    for b, e, bp in spmd.host_map(run, batch_iter, self.concurrency):
      v = b.valid
      lab = b.labels[v]
      for k in ("pred", "p_max", "accept", "aps_size", "patch_scores"):
        edge[k].append(e[k][v])
      edge["aps_cover"].append(e["aps_mask"][v][np.arange(v.sum()), lab])
      images.append(b.images[v])
      labels.append(lab)
      keys.extend(k for k, ok in zip(b.keys, v) if ok)
      if with_base:
        self._base_pass(base, bp, v)
    if not labels:
      return None
    cat = lambda d: {k: np.concatenate(v) for k, v in d.items()}
    return EdgeOutputs(cat(edge), cat(base), np.concatenate(images), np.concatenate(labels),
                       keys)

  def _base_pass(self, base: dict, probs_attn, valid) -> None:
    bp, attn = probs_attn
    for k, v in edge_lib.baseline_outputs(bp[valid], attn[valid], self.config.eta).items():
      base[k].append(v)

  def views(self, out: EdgeOutputs) -> dict:
    """The edges' views as `methods.decide` reads them (random ranks by image key)."""
    return {methods.EDGE: edge_lib.edge_view(out.edge),
            methods.BASELINE: edge_lib.baseline_view(out.base, out.keys, self.config.seed,
                                                     self.geometry.num_patches)}

  def certified_view(self, images, point) -> dict:
    """The certified point's own edge view: its acceptance and fitted APS q_hat."""
    return edge_lib.edge_view(edge_lib.edge_step_batched(
        self.edge, images, point.lambda_hat, point.q_hat, layer=self.config.gradcam_layer,
        grid=self.geometry.grid, batch_size=int(self.config.batch_size),
        sharding=self.sharding, concurrency=self.concurrency))

  def sweep(self, views: dict, images, plan, codecs=(codecs_lib.RAW,), raw_points=None):
    """Every (method, params) of `plan` on these images under every codec of
    `codecs` (raw first): decisions in one vmapped call per method, the server
    once per distinct (image, kept set) and distinct decoded pixels.

    A lossless codec decodes to the raw patches, so it shares raw's server
    answers and only encodes; a lossy one is answered from the decoded
    patches (each image coded once: `codecs.roundtrip_images`). Bytes are
    those of the encoded payloads (`payload.coded_bytes`). Returns
    (offloaded [P, n], keep [P, n, N], fallback [P, n], server_pred [P, n],
    server_pred per codec [C, P, n], payload bytes per codec [C, P, n]; 0
    where answered on the edge). ``raw_points`` (bool [P]): the points whose
    raw answers are needed (None: all); raw server_pred is -1 at the others,
    and no lossless codec may be swept then (it shares raw's answers)."""
    off, keep, fallback = [], [], []
    for m, params in plan:
      o, k, f = methods.decide(m, views[m.edge], params, self.config.empty_policy)
      off.append(o)
      keep.append(k)
      fallback.append(np.broadcast_to(f, o.shape))
    off, keep, fallback = map(np.concatenate, (off, keep, fallback))
    if codecs[0] != codecs_lib.RAW:
      raise ValueError(f"a sweep's codecs start with raw, got {[str(c) for c in codecs]}")
    rows_image, rows_keep, ids = dedup_rows(off, keep)
    raw_rows = _rows_of(ids, off, raw_points, codecs)
    preds = np.full((len(codecs),) + off.shape, -1, np.int32)
    nbytes = np.zeros((len(codecs),) + off.shape, np.int32)
    for j, codec in enumerate(codecs if len(rows_image) else ()):
      if codec.lossy or codec == codecs_lib.RAW:
        t0 = time.perf_counter()
        pixels = codecs_lib.roundtrip_images(images, codec)
        self.coding_s += time.perf_counter() - t0
        if codec == codecs_lib.RAW and raw_rows is not None:
          row_pred = np.full(len(rows_image), -1, np.int32)
          row_pred[raw_rows] = self._server_rows(pixels, rows_keep[raw_rows],
                                                 rows_image[raw_rows])
        else:
          row_pred = self._server_rows(pixels, rows_keep, rows_image)
        if codec == codecs_lib.RAW:
          raw_pred = row_pred
      else:  # lossless: the raw patches, so raw's answers (raw comes first)
        row_pred = raw_pred
      preds[j][off] = row_pred[ids[off]]
      t0 = time.perf_counter()
      row_bytes = payload.coded_bytes(images, rows_image, rows_keep, self.geometry, codec)
      self.coding_s += time.perf_counter() - t0
      nbytes[j][off] = row_bytes[ids[off]]
    return off, keep, fallback, preds[0], preds, nbytes

  def _server_rows(self, images, rows_keep, rows_image) -> np.ndarray:
    if not len(rows_image):
      return np.zeros(0, np.int32)
    c = self.config
    srv = Server(self.server, int(c.server_batch), tuple(c.buckets), self.sharding,
                 token_budget=int(c.get("server_token_budget", 0)) or None,
                 min_batch=int(c.get("server_min_batch", 0)) or None,
                 concurrency=self.concurrency)
    return srv.logits_from_images(images, rows_keep, rows=rows_image).argmax(-1)
