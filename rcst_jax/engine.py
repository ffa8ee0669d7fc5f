"""The sweep engine: Algorithm 1 once, then Algorithm 2 for every operating point.

Flow (one way): calibration set -> edge softmax -> Algorithm 1 (lambda_hat,
q_hat). Test set, chunk by chunk: the edge step (CRC acceptance, APS Grad-CAM
patch scores) and the baseline edge (softmax + CLS attention) once per image;
`methods.decide` gives every method's decisions over its whole grid in one
vmapped call; the server runs once per distinct (image, kept-patch set) over
all points; `methods.combine` (Eq. 27) gives the final predictions. These are
the functions `rcst run` uses, so the sweep cannot disagree with it.

Each finished chunk is written atomically under ``cache/<fingerprint>/``; a
restarted run skips finished chunks and recomputes a corrupt one. The
fingerprint hashes the whole resolved config except `NOT_RESULTS` and
`certify`, each model's weights and preprocessing metadata, the data's
identity and `CACHE_VERSION`, so a stale cache is never reused.

The whole-system certificate is keyed apart, so a new certificate request
never reruns the sweep: calibration outcomes at every tau are cached by what
they depend on (`_outcome_id`), the certificate is recomputed from them on
every run (milliseconds), and the Certified row's test predictions are cached
per certified point (``certified_<id>/``); only a newly certified point runs
the models, on that one point.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import time
import warnings
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rcst_jax import conformal, methods, offline, pipeline, transmit
from rcst_jax.checkpoints import Model, variables_digest
from rcst_jax.data import batches, normalize
from rcst_jax.data.sources import Sources
from rcst_jax.fileio import atomic_savez, plain
from rcst_jax.geometry import Geometry
from rcst_jax.models.loading import Models

CACHE_VERSION = 4
# Config keys that cannot change any cached number: where outputs go, how
# much is printed or drawn, how models are found (they are identified by
# content below), how many devices share the work. Everything else is hashed.
NOT_RESULTS = ("output_dir", "progress", "gallery_size", "per_image", "models_dir", "edge",
               "server", "baseline_edge", "devices", "multihost", "compare_dtype")
# Keyed apart (see the module docstring): changing it never invalidates chunks.
CERTIFY_KEY = "certify"
_MODEL_META = ("timm_name", "num_classes", "input_size", "crop_pct", "interpolation", "mean",
               "std", "arch_overrides")
_CHUNK_KEYS = ("labels", "keys", "offloaded", "kept", "server_pred", "pred", "edge_pred",
               "edge_p_max", "edge_accept", "edge_aps_size", "edge_aps_cover", "base_pred",
               "base_p_max", "base_accept")
_POINT_KEYS = ("offloaded", "kept", "server_pred", "pred")  # [points, n] arrays


# ---------------------------------------------------------------- identity


def fingerprint(config, models: Models, sources: Sources) -> str:
  cfg = {k: v for k, v in plain(config).items() if k not in NOT_RESULTS + (CERTIFY_KEY,)}
  ident = {"version": CACHE_VERSION, "config": cfg, "data": sources.identity(),
           "models": {name: {"digest": variables_digest(m.variables),
                             "meta": {k: m.metadata.get(k) for k in _MODEL_META}}
                      for name, m in models.named().items()}}
  return hashlib.sha1(json.dumps(plain(ident), sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- devices


def make_mesh(devices: str | int = "all") -> Mesh:
  """A 1-D mesh over the batch axis of this host's devices."""
  local = jax.local_devices()
  n = len(local) if devices == "all" else int(devices)
  return Mesh(np.asarray(local[:n]), ("batch",))


def _probs_fn(model: Model, with_attn: bool):
  mean, std = tuple(model.metadata["mean"]), tuple(model.metadata["std"])
  module = model.module

  @jax.jit
  def fn(variables, images):
    logits, out = module.apply(variables, normalize(images, mean, std))
    probs = jax.nn.softmax(logits.astype(jnp.float32), -1)
    return (probs, out["cls_attn"].astype(jnp.float32)) if with_attn else (probs, None)
  return fn


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


# ---------------------------------------------------------------- engine


def _point_arrays(off, keep, fallback, server_pred) -> dict:
  """What a chunk stores per operating point (`_POINT_KEYS`), Eq. 27 included."""
  return {"offloaded": off, "kept": keep.sum(-1).astype(np.int16), "server_pred": server_pred,
          "pred": methods.combine(off, server_pred, fallback)}


class Interrupted(RuntimeError):
  """Raised by the test hook that simulates a disconnect mid-run."""


@dataclasses.dataclass
class Evaluation:
  config: object
  models: Models
  sources: Sources
  out_dir: str
  transform: object = None   # data.Preprocess the run used (recorded in the calibration)
  progress: bool = True

  def __post_init__(self):
    self.mesh = make_mesh(self.config.get("devices", "all"))
    ndev = self.mesh.devices.size
    for key in ("batch_size", "server_batch"):
      if int(self.config[key]) % ndev:
        raise ValueError(f"{key} {self.config[key]} must be a multiple of the {ndev} devices")
    self.geometry = Geometry.of_server(self.models.server)
    self._check_against_geometry()
    self.points = methods.operating_points(self.config)
    self.fp = fingerprint(self.config, self.models, self.sources)
    self.cache_dir = os.path.join(self.out_dir, "cache", self.fp)
    os.makedirs(self.cache_dir, exist_ok=True)
    self.skipped = collections.Counter()
    self.certificate = None
    self.certification_grid = None
    self.timings = collections.defaultdict(float)
    self.batch_sharding = NamedSharding(self.mesh, PartitionSpec("batch"))
    rep = NamedSharding(self.mesh, PartitionSpec())
    put = lambda m: dataclasses.replace(m, variables=jax.device_put(m.variables, rep))
    self._edge, self._server, self._base = (
        put(self.models.edge), put(self.models.server), put(self.models.baseline_edge))
    self._base_probs = _probs_fn(self._base, True)

  def _check_against_geometry(self):
    """The config checks that need the server's patch count (config_schema does the rest)."""
    from rcst_jax.errors import ConfigError
    n = self.geometry.num_patches
    if max(self.config.buckets) < n:
      raise ConfigError(f"config.buckets = {tuple(self.config.buckets)}: the largest bucket must "
                        f"hold all {n} patches of the server's grid")
    bad = [k for k in self.config.k_grid if k > n]
    if bad:
      raise ConfigError(f"config.k_grid = {tuple(self.config.k_grid)}: {bad} exceed the {n} "
                        "patches of the server's grid")

  def _batches(self, source, indices, desc):
    return batches(source, indices, int(self.config.batch_size),
                   skipped=self.skipped, progress=self.progress, desc=desc)

  # -- calibration (Algorithm 1)

  def calibrate(self) -> conformal.Calibration:
    """Algorithm 1 (cached with the chunks), plus the whole-system certificate
    when config.certify.enabled: recomputed from the cached calibration
    outcomes on every call, so a new epsilon, delta, risk or test runs no model."""
    t0 = time.perf_counter()
    path = os.path.join(self.cache_dir, "calibration.json")
    cal = None
    if os.path.exists(path):
      try:
        cal = conformal.Calibration.from_json(path)
      except (conformal.CalibrationError, OSError, UnicodeDecodeError) as e:
        warnings.warn(f"cached calibration {path} is unreadable ({e}); recomputing")
    if cal is None:
      cal = offline.algorithm1(
          self.config, self._edge, self.sources, self.transform,
          server_metadata=self.models.server.metadata, geometry=self.geometry,
          server_digest=variables_digest(self.models.server.variables),
          sharding=self.batch_sharding, skipped=self.skipped, progress=self.progress)
      if jax.process_index() == 0:  # one writer for shared files
        cal.to_json(path)
    t1 = time.perf_counter()
    self.timings["calibration_s"] += t1 - t0
    if self.config.get("certify") and self.config.certify.enabled:
      cert, self.certification_grid = self.certify(cal)
      cal = dataclasses.replace(cal, certificate=cert)
      self.timings["certification_s"] += time.perf_counter() - t1
    return cal

  # -- chunks of the test set

  def _chunk_path(self, c: int) -> str:
    return os.path.join(self.cache_dir, f"chunk_{c:05d}.npz")

  def chunks(self) -> list[np.ndarray]:
    idx = np.asarray(self.sources.test_indices)
    size = int(self.config.chunk_size)
    return [idx[i:i + size] for i in range(0, len(idx), size)]

  def load_chunk(self, c: int) -> dict | None:
    """A finished chunk's arrays, or None (missing, or corrupt: then removed)."""
    return self._load(self._chunk_path(c), _CHUNK_KEYS, len(self.points))

  def _load(self, path: str, keys, points: int) -> dict | None:
    if not os.path.exists(path):
      return None
    try:
      with np.load(path, allow_pickle=False) as z:
        d = {k: z[k] for k in keys}
      n = len(d["keys"])
      if d["pred"].shape != (points, n) or d["kept"].shape != (points, n):
        raise ValueError(f"shapes {d['pred'].shape} for {points} points x {n} images")
      return d
    except Exception as e:  # zip CRC, truncation, missing keys: all mean recompute
      warnings.warn(f"cached chunk {path} is corrupt ({type(e).__name__}: {e}); recomputing")
      os.unlink(path)
      return None

  # -- the Certified row, cached per certified point

  def _certified_path(self, c: int) -> str:
    cert = self.certificate
    ident = {k: cert[k] for k in ("certified", "lambda_hat", "tau", "q_hat")}
    h = hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(self.cache_dir, f"certified_{h}", f"chunk_{c:05d}.npz")

  def load_certified(self, c: int) -> dict | None:
    return self._load(self._certified_path(c), ("keys",) + _POINT_KEYS, 1)

  def _save_certified(self, c: int, keys, row: dict) -> None:
    path = self._certified_path(c)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_savez(path, keys=np.asarray(keys, str), **row)

  def _certified_view(self, images) -> dict:
    """Its own acceptance and APS q_hat (fitted on the first split): its own edge view."""
    cal = self._certified_cal
    return pipeline.edge_view(pipeline.edge_step_batched(
        self._edge, images, cal.lambda_hat, cal.q_hat, layer=self.config.gradcam_layer,
        grid=self.geometry.grid, batch_size=int(self.config.batch_size),
        sharding=self.batch_sharding))

  def run_certified_chunk(self, c: int, indices: np.ndarray, main: dict) -> None:
    """The Certified row of a chunk whose sweep is cached: server-only's row when
    nothing was certified (lambda = inf, tau = 0 keeps every patch), else the
    edge on the chunk's images and one server pass at the certified tau."""
    keys = main["keys"]
    if not self.certificate["certified"] or not len(keys):
      j = self.points.index((methods.SERVER_ONLY, None))
      return self._save_certified(c, keys, {k: main[k][j:j + 1] for k in _POINT_KEYS})
    images, got = [], []
    for b in batches(self.sources.test_source, indices, int(self.config.batch_size),
                     skipped=collections.Counter(), progress=self.progress,
                     desc=f"chunk {c} certified"):
      images.append(b.images[b.valid])
      got.extend(k for k, ok in zip(b.keys, b.valid) if ok)
    if list(got) != [str(k) for k in keys]:
      raise RuntimeError(f"chunk {c}: the test images changed since the sweep was cached")
    images = np.concatenate(images)
    t0 = time.perf_counter()
    row = _point_arrays(*self._sweep({"certified": self._certified_view(images)}, images,
                                     [(methods.CERTIFIED, (self.certificate["tau"],))]))
    self.timings["certified_s"] += time.perf_counter() - t0
    self._save_certified(c, keys, row)

  def _edge_pass(self, indices, cal, desc, source=None, with_base=True):
    edge, base = collections.defaultdict(list), collections.defaultdict(list)
    images, labels, keys = [], [], []
    grid, layer = self.geometry.grid, self.config.gradcam_layer
    source = self.sources.test_source if source is None else source
    for b in self._batches(source, indices, desc):
      v = b.valid
      x = jax.device_put(b.images, self.batch_sharding)
      e = jax.device_get(pipeline.edge_step(self._edge, x, cal.lambda_hat, cal.q_hat,
                                            layer=layer, grid=grid,
                                            sharding=self.batch_sharding))
      lab = b.labels[v]
      for k in ("pred", "p_max", "accept", "aps_size", "patch_scores"):
        edge[k].append(e[k][v])
      edge["aps_cover"].append(e["aps_mask"][v][np.arange(v.sum()), lab])
      images.append(b.images[v])
      labels.append(lab)
      keys.extend(k for k, ok in zip(b.keys, v) if ok)
      if not with_base:
        continue
      bp, attn = jax.device_get(self._base_probs(self._base.variables, x))
      base["pred"].append(bp[v].argmax(-1).astype(np.int32))
      base["p_max"].append(bp[v].max(-1))
      base["accept"].append(np.asarray(transmit.min_entropy_accept(bp[v], self.config.eta)))
      base["scores"].append(attn[v])
    cat = lambda d: {k: np.concatenate(v) for k, v in d.items()}
    if not labels:
      return None
    return cat(edge), cat(base), np.concatenate(images), np.concatenate(labels), keys

  def run_chunk(self, c: int, indices: np.ndarray, cal: conformal.Calibration) -> None:
    t0 = time.perf_counter()
    got = self._edge_pass(indices, cal, f"chunk {c} edge")
    self.timings["edge_s"] += time.perf_counter() - t0
    if got is None:  # every item of the chunk was bad
      empty = {k: np.zeros((0,) if k in ("labels", "keys") else (len(self.points), 0))
               for k in _CHUNK_KEYS}
      atomic_savez(self._chunk_path(c), **empty)
      if self.certificate is not None:
        self.run_certified_chunk(c, indices, empty)
      return
    edge, base, images, labels, keys = got
    views = {methods.EDGE: pipeline.edge_view(edge),
             methods.BASELINE: {**base, "rank": transmit.random_ranks(
                 keys, self.config.seed, self.geometry.num_patches)}}
    plan = [(m, methods.grid(m, self.config)) for m in methods.METHODS]
    certified = self.certificate is not None and self.certificate["certified"]
    if certified:  # in the same sweep, so its rows dedup against the others'
      t = time.perf_counter()
      views["certified"] = self._certified_view(images)
      self.timings["edge_s"] += time.perf_counter() - t
      plan.append((methods.CERTIFIED, (self.certificate["tau"],)))
    t1 = time.perf_counter()
    rows = _point_arrays(*self._sweep(views, images, plan))
    self.timings["server_s"] += time.perf_counter() - t1
    p = len(self.points)
    main = {k: v[:p] for k, v in rows.items()}
    atomic_savez(self._chunk_path(c), labels=labels, keys=np.asarray(keys, str), **main,
                 **{f"edge_{k}": v for k, v in edge.items() if k != "patch_scores"},
                 **{f"base_{k}": v for k, v in base.items() if k != "scores"})
    if certified:
      self._save_certified(c, keys, {k: v[p:] for k, v in rows.items()})
    elif self.certificate is not None:
      self.run_certified_chunk(c, indices, {"keys": np.asarray(keys, str), **main})

  def _sweep(self, views, images, plan):
    """Every (method, params) of `plan` on one batch of images: decisions in one
    vmapped call per method, the server once per distinct (image, kept set)."""
    off, keep, fallback = [], [], []
    for m, params in plan:
      o, k, f = methods.decide(m, views[m.edge], params, self.config.empty_policy)
      off.append(o)
      keep.append(k)
      fallback.append(np.broadcast_to(f, o.shape))
    off, keep, fallback = map(np.concatenate, (off, keep, fallback))
    rows_image, rows_keep, ids = dedup_rows(off, keep)
    server_pred = np.full(off.shape, -1, np.int32)
    if len(rows_image):
      srv = pipeline.Server(self._server, int(self.config.server_batch),
                            tuple(self.config.buckets), self.batch_sharding,
                            min_batch=int(self.config.get("server_min_batch", 0)) or None)
      row_pred = srv.logits_from_images(images, rows_keep, rows=rows_image).argmax(-1)
      server_pred[off] = row_pred[ids[off]]
    return off, keep, fallback, server_pred

  # -- whole-system certification (Learn-then-Test)

  def certify(self, cal: conformal.Calibration) -> tuple[dict, dict]:
    """Calibration outcomes at every tau (q_hat fitted on the first split only),
    then Pareto Testing over the (lambda, tau) grid. Returns (certificate, grid)."""
    from rcst_jax import certification
    c = self.config.certify
    taus = tuple(float(t) for t in self.config.tau_grid)
    # Outcomes do not depend on epsilon, delta, the risks, the test or the
    # lambda grid: a changed certificate request reuses them, no model runs.
    path = os.path.join(self.out_dir, "cache", "outcomes", f"{self._outcome_id()}.npz")
    if os.path.exists(path):
      try:
        with np.load(path, allow_pickle=False) as z:
          out = {k: z[k] for k in z.files}
        return certification.certify_run(self.config, out, taus, self.geometry,
                                         float(out.pop("q_hat_fit")), int(out.pop("n_fit")))
      except (OSError, ValueError, KeyError) as e:
        warnings.warn(f"cached certification outcomes {path} are unreadable ({e}); recomputing")
    idx = self.sources.cal_indices
    perm = np.random.default_rng(int(c.seed)).permutation(len(idx))
    n_fit = int(round(float(c.split) * len(idx)))
    fit, test = np.sort(idx[perm[:n_fit]]), np.sort(idx[perm[n_fit:]])
    fit_sources = Sources(self.sources.cal_source, self.sources.cal_source, fit, fit,
                          name=self.sources.name)
    t0 = time.perf_counter()
    cal_fit = offline.algorithm1(self.config, self._edge, fit_sources, self.transform,
                                 server_metadata=self.models.server.metadata,
                                 geometry=self.geometry, server_digest=None,
                                 sharding=self.batch_sharding, progress=self.progress)
    self.timings["certification_calibration_s"] += time.perf_counter() - t0
    probe = dataclasses.replace(cal_fit, lambda_hat=float("inf"), lambda_valid=False)
    parts = []
    for name, part in (("fit", fit), ("test", test)):
      t0 = time.perf_counter()
      got = self._edge_pass(part, probe, f"certification {name}", self.sources.cal_source,
                            with_base=False)
      self.timings["certification_edge_s"] += time.perf_counter() - t0
      if got is None:
        raise ValueError(f"no usable image in the certification {name} split")
      edge, _, images, labels, _ = got
      t0 = time.perf_counter()
      off, keep, _, server_pred = self._sweep(
          {methods.EDGE: pipeline.edge_view(edge)}, images,
          [(methods.SERVER_ONLY, (None,)), (methods.PROPOSED, taus)])
      self.timings["certification_server_s"] += time.perf_counter() - t0
      parts.append({"labels": labels, "edge_pred": edge["pred"], "p_max": edge["p_max"],
                    "server_only_pred": server_pred[0], "server_pred": server_pred[1:],
                    "kept": keep[1:].sum(-1)})
    out = {k: np.concatenate([p[k] for p in parts], axis=-1) for k in parts[0]}
    if jax.process_index() == 0:
      atomic_savez(path, **out, q_hat_fit=np.float64(cal_fit.q_hat),
                   n_fit=np.int64(len(parts[0]["labels"])))
    return certification.certify_run(self.config, out, taus, self.geometry,
                                     cal_fit.q_hat, len(parts[0]["labels"]))

  def _outcome_id(self) -> str:
    """What the certification outcomes depend on: not the test itself."""
    keys = ("data", "alpha_aps", "gradcam_layer", "tau_grid", "dtype", "matmul_precision",
            "batch_size", "server_batch", "server_min_batch", "buckets")
    cfg = plain(self.config)
    ident = {"version": CACHE_VERSION, "config": {k: cfg.get(k) for k in keys},
             "split": [cfg["certify"]["split"], cfg["certify"]["seed"]],
             "data": self.sources.identity(),
             "models": [variables_digest(m.variables) for m in (self.models.edge,
                                                                self.models.server)]}
    return hashlib.sha1(json.dumps(plain(ident), sort_keys=True).encode()).hexdigest()[:16]

  def arrays(self) -> dict:
    """Every finished chunk concatenated (images along the last axis), with the
    Certified row appended when the run has a certificate."""
    n = len(self.chunks())
    data = [self.load_chunk(c) for c in range(n)]
    rows = [self.load_certified(c) for c in range(n)] if self.certificate is not None else []
    if any(d is None for d in data + rows):
      raise RuntimeError("some chunks are missing; run() first")
    for d, row in zip(data, rows):
      if not np.array_equal(row["keys"], d["keys"]):
        raise RuntimeError("the cached Certified row does not match its chunk's images")
      for k in _POINT_KEYS:
        d[k] = np.concatenate([d[k], row[k].astype(d[k].dtype)])
    data = [d for d in data if len(d["labels"])]
    if not data:
      raise ValueError("no usable test image (all were skipped as bad items)")
    return {k: np.concatenate([d[k] for d in data], axis=-1) for k in _CHUNK_KEYS}

  def all_points(self) -> list:
    """The sweep's operating points, then the Certified point when there is one."""
    if self.certificate is None:
      return list(self.points)
    return list(self.points) + [(methods.CERTIFIED, self.certificate["tau"])]

  # -- the whole run

  def run(self, stop_after: int | None = None, on_chunk: Callable | None = None) -> dict:
    # float32 matmuls on TPU default to bfloat16 passes; "highest" keeps timm parity.
    with jax.default_matmul_precision(self.config.get("matmul_precision", "highest")):
      return self._run(stop_after, on_chunk)

  def _run(self, stop_after, on_chunk) -> dict:
    from tqdm.auto import tqdm
    from rcst_jax import metrics
    t0 = time.perf_counter()
    cal = self.calibrate()
    if cal.certificate is not None:
      from rcst_jax.certification import certified_calibration
      cert = self.certificate = cal.certificate
      self._certified_cal = certified_calibration(cal)
    chunks = self.chunks()
    done = certified_done = 0
    bar = tqdm(total=len(chunks), desc="test chunks", disable=not self.progress)
    pid, nproc = jax.process_index(), jax.process_count()
    for c, idx in enumerate(chunks):
      if c % nproc != pid:
        pass
      elif (main := self.load_chunk(c)) is None:
        if stop_after is not None and done >= stop_after:
          raise Interrupted(f"stopped after {done} chunks (test hook)")
        self.run_chunk(c, idx, cal)
        done += 1
        if on_chunk:
          on_chunk(c)
      elif self.certificate is not None and self.load_certified(c) is None:
        self.run_certified_chunk(c, idx, main)  # a new certified point: that row only
        certified_done += 1
      bar.update(1)
    bar.close()
    if nproc > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("rcst_chunks_done")
    arrays = self.arrays()
    points = metrics.aggregate(arrays, self.all_points(), self.geometry, cal.alpha_crc)
    self.timings["total_s"] += time.perf_counter() - t0
    return {"calibration": cal, "points": points, "arrays": arrays, "fingerprint": self.fp,
            "certification_grid": self.certification_grid,
            "skipped": dict(self.skipped), "timings": dict(self.timings),
            "chunks_computed": done, "certified_chunks_computed": certified_done}
