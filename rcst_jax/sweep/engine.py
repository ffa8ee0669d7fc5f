"""The sweep: Algorithm 1 once, then Algorithm 2 at every operating point.

Flow (one way): calibration set -> edge softmax -> Algorithm 1 (lambda_hat,
q_hat), plus the whole-system certificate when configured (`certification`).
Test set, chunk by chunk: the edges once per image, every method's whole
grid decided at once, the server once per distinct (image, kept set)
(`passes`), Eq. 27; each finished chunk written atomically (`cache`), so a
restarted run skips finished chunks and recomputes a corrupt one. The
Certified row is cached per certified point, so a new certificate reruns
only that row, on that point.
"""

from __future__ import annotations

import collections
import dataclasses
import time

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from rcst_edge.errors import ConfigError
from rcst_edge.payload import codecs
from rcst_edge.payload.geometry import Geometry
from rcst_jax.calibration import algorithm1
from rcst_jax.calibration.artifact import Calibration
from rcst_jax.core import spmd
from rcst_jax.data import identity
from rcst_jax.data.preprocess import Held
from rcst_jax.data.sources import Sources, UnreadableImagesError
from rcst_jax.inference import methods
from rcst_jax.models.checkpoints import variables_digest
from rcst_jax.models.loading import Models
from rcst_jax.sweep import cache, metrics
from rcst_jax.sweep.certification import Certification
from rcst_jax.sweep.passes import Passes, point_arrays


def check_against_geometry(config, geometry: Geometry) -> None:
  """The config checks that need the server's patch count (config.schema does the rest)."""
  n = geometry.num_patches
  if max(config.buckets) < n:
    raise ConfigError(f"config.buckets = {tuple(config.buckets)}: the largest bucket must "
                      f"hold all {n} patches of the server's grid")
  bad = [k for k in config.k_grid if k > n]
  if bad:
    raise ConfigError(f"config.k_grid = {tuple(config.k_grid)}: {bad} exceed the {n} "
                      "patches of the server's grid")


@dataclasses.dataclass
class Sweep:
  """One run over the config's data: `calibrate` (Algorithm 1 and the
  certificate), then `run` (every chunk of the test set, cached, aggregated)."""
  config: object
  models: Models
  sources: Sources
  out_dir: str
  transform: object = None   # data.Preprocess the run used (recorded in the calibration)
  progress: bool = True

  def __post_init__(self):
    self.mesh = spmd.make_mesh(self.config.get("devices", "all"))
    ndev = self.mesh.devices.size
    for key in ("batch_size", "server_batch"):
      if int(self.config[key]) % ndev:
        raise ValueError(f"{key} {self.config[key]} must be a multiple of the {ndev} devices")
    self.geometry = Geometry.of_server(self.models.server)
    check_against_geometry(self.config, self.geometry)
    self.points = methods.operating_points(self.config)
    # The certified row needs the codecs the certificate may pick.
    certify = self.config.get("certify")
    self.codecs = codecs.sweep_grid(
        self.config.get("codec_grid", ("raw",)),
        certify.get("codec_grid", ()) if certify and certify.enabled else ())
    self.fp = cache.fingerprint(self.config, self.models, self.sources)
    self.store = cache.ChunkStore(self.out_dir, self.fp)
    self._identify_inputs()
    self.passes = Passes(self.config, self.models, self.mesh, self.geometry)
    self.skipped = collections.Counter()
    self.certificate = self.certification_grid = self.certified_point = None
    self.certification_sizing = None
    self.timings = collections.defaultdict(float)

  def _identify_inputs(self) -> None:
    """Digests of what the images hold: the calibration set's, and each test chunk's."""
    digests = identity.DigestCache(self.store.digests_path)
    src = self.sources
    self.cal_inputs = identity.combine(identity.item_digests(
        src.cal_source, src.cal_indices, digests, self.progress))
    tests = identity.item_digests(src.test_source, src.test_indices, digests, self.progress)
    size = int(self.config.chunk_size)
    self.chunk_inputs = [identity.combine(tests[i:i + size]) for i in range(0, len(tests), size)]
    digests.save()
    self.cal_sha = self.published_calibration = None

  def _chunk_inputs(self, c: int) -> dict:
    return {"inputs": self.chunk_inputs[c], "calibration": self.cal_sha}

  # -- calibration (Algorithm 1), then the certificate

  def calibrate(self) -> Calibration:
    """Algorithm 1 (cached with the chunks), plus the whole-system certificate
    when config.certify.enabled: recomputed from the cached calibration
    outcomes on every call, so a new epsilon, delta, risk or test runs no model."""
    t0 = time.perf_counter()
    certifying = bool(self.config.get("certify") and self.config.certify.enabled)
    # The certification reads the calibration images twice more: decode or render them once.
    held = Held(self.sources.cal_source) if certifying else None
    sources = (dataclasses.replace(self.sources, cal_source=held) if certifying
               else self.sources)
    cached = self.store.load_calibration(self.cal_inputs)
    softmax = None  # the calibration images' edge softmax, when computed here
    if cached is None:
      cal, softmax = algorithm1.algorithm1(
          self.config, self.passes.edge, sources, self.transform,
          server_metadata=self.models.server.metadata, geometry=self.geometry,
          server_digest=variables_digest(self.models.server.variables),
          sharding=self.passes.sharding, skipped=self.skipped, progress=self.progress,
          with_softmax=True)
      self.cal_sha = cache.sha256(cache.calibration_bytes(cal))
      if jax.process_index() == 0:  # one writer for shared files
        self.store.save_calibration(cal, inputs=self.cal_inputs)
    else:
      cal, self.cal_sha = cached
    self.published_calibration = self.store.calibration_path()
    t1 = time.perf_counter()
    self.timings["calibration_s"] += t1 - t0
    if certifying:
      cert = self._certify(held, softmax)
      cal = dataclasses.replace(cal, certificate=cert)
      # The artifact published with the results is this file, byte for byte.
      key = cache.certified_id(cert)
      if jax.process_index() == 0:
        self.store.save_calibration(cal, certified=key, inputs=self.cal_inputs,
                                    calibration=self.cal_sha)
      self.published_calibration = self.store.calibration_path(key)
      self.timings["certification_s"] += time.perf_counter() - t1
    return cal

  def _certify(self, images, softmax) -> dict:
    """The certificate from the calibration ``images`` (``softmax``: Algorithm 1's
    rows of them, None when read from the cache); keeps its figure's grid, pilot
    line and timings."""
    got = Certification(self.config, self.models, self.sources, self.passes, self.store,
                        self.cal_inputs, self.transform, self.progress, self.skipped,
                        softmax).run(images, self.certification_sizing)
    self.certification_grid, self.certification_sizing = got.grid, got.sizing
    for k, v in got.timings.items():
      self.timings[k] += v
    return got.certificate

  # -- chunks of the test set

  def chunks(self) -> list[np.ndarray]:
    idx = np.asarray(self.sources.test_indices)
    size = int(self.config.chunk_size)
    return [idx[i:i + size] for i in range(0, len(idx), size)]

  def _certified_key(self) -> str:
    return cache.certified_id(self.certificate)

  def load_main(self, c: int) -> dict | None:
    return self.store.load_chunk(c, len(self.points), len(self.codecs), **self._chunk_inputs(c))

  def load_certified(self, c: int) -> dict | None:
    return self.store.load_chunk(c, 1, len(self.codecs), certified=self._certified_key(),
                                 **self._chunk_inputs(c))

  def _save_certified(self, c: int, keys, row: dict) -> None:
    self.store.save_chunk(c, {"keys": np.asarray(keys, str), **row},
                          certified=self._certified_key(), **self._chunk_inputs(c))

  def run_certified_chunk(self, c: int, indices: np.ndarray, main: dict) -> None:
    """The Certified row of a chunk whose sweep is cached: server-only's row when
    nothing was certified (lambda = inf, tau = 0 keeps every patch), else the
    edge on the chunk's images and one server pass at the certified tau."""
    keys = main["keys"]
    if not self.certificate["certified"] or not len(keys):
      j = self.points.index((methods.SERVER_ONLY, None))
      return self._save_certified(c, keys, cache.point_rows(main, slice(j, j + 1)))
    images, got = [], []
    for b in self.passes.batches(self.sources.test_source, indices, f"chunk {c} certified",
                                 progress=self.progress):
      images.append(b.images[b.valid])
      got.extend(k for k, ok in zip(b.keys, b.valid) if ok)
    if list(got) != [str(k) for k in keys]:
      raise RuntimeError(f"chunk {c}: the test images changed since the sweep was cached")
    images = np.concatenate(images)
    t0 = time.perf_counter()
    row = point_arrays(*self.passes.sweep(
        {"certified": self.passes.certified_view(images, self.certified_point)}, images,
        [(methods.CERTIFIED, (self.certified_point.tau,))], self.codecs))
    self.timings["certified_s"] += time.perf_counter() - t0
    self._save_certified(c, keys, row)

  def _empty_chunk(self, c: int, indices) -> None:
    """Every item of the chunk was bad: an empty chunk, so a rerun skips it."""
    shape = lambda k: ((0,) if k in ("labels", "keys") else
                       (len(self.codecs), len(self.points), 0) if k in cache.CODEC_KEYS else
                       (len(self.points), 0))
    empty = {k: np.zeros(shape(k)) for k in cache.CHUNK_KEYS}
    self.store.save_chunk(c, empty, **self._chunk_inputs(c))
    if self.certificate is not None:
      self.run_certified_chunk(c, indices, empty)

  def run_chunk(self, c: int, indices: np.ndarray, cal: Calibration) -> None:
    t0 = time.perf_counter()
    got = self.passes.edge_pass(self.passes.batches(
        self.sources.test_source, indices, f"chunk {c} edge", self.skipped, self.progress),
        cal.lambda_hat, cal.q_hat)
    self.timings["edge_s"] += time.perf_counter() - t0
    if got is None:
      return self._empty_chunk(c, indices)
    views = self.passes.views(got)
    plan = [(m, methods.grid(m, self.config)) for m in methods.METHODS]
    certified = self.certificate is not None and self.certificate["certified"]
    if certified:  # in the same sweep, so its rows dedup against the others'
      t = time.perf_counter()
      views["certified"] = self.passes.certified_view(got.images, self.certified_point)
      self.timings["edge_s"] += time.perf_counter() - t
      plan.append((methods.CERTIFIED, (self.certified_point.tau,)))
    t1 = time.perf_counter()
    rows = point_arrays(*self.passes.sweep(views, got.images, plan, self.codecs))
    self.timings["server_s"] += time.perf_counter() - t1
    p = len(self.points)
    main = cache.point_rows(rows, slice(None, p))
    self.store.save_chunk(c, {
        "labels": got.labels, "keys": np.asarray(got.keys, str), **main,
        **{f"edge_{k}": v for k, v in got.edge.items() if k != "patch_scores"},
        **{f"base_{k}": v for k, v in got.base.items() if k != "scores"}},
        **self._chunk_inputs(c))
    if certified:
      self._save_certified(c, got.keys, cache.point_rows(rows, slice(p, None)))
    elif self.certificate is not None:
      self.run_certified_chunk(c, indices, {"keys": np.asarray(got.keys, str), **main})

  def arrays(self) -> dict:
    """Every finished chunk concatenated (images along the last axis), with the
    Certified row appended when the run has a certificate."""
    n = len(self.chunks())
    data = [self.load_main(c) for c in range(n)]
    rows = [self.load_certified(c) for c in range(n)] if self.certificate is not None else []
    if any(d is None for d in data + rows):
      raise RuntimeError("some chunks are missing; run() first")
    for d, row in zip(data, rows):
      if not np.array_equal(row["keys"], d["keys"]):
        raise RuntimeError("the cached Certified row does not match its chunk's images")
      for k in cache.POINT_KEYS + cache.CODEC_KEYS:
        d[k] = np.concatenate([d[k], row[k].astype(d[k].dtype)], axis=int(k in cache.CODEC_KEYS))
    data = [d for d in data if len(d["labels"])]
    if not data:
      raise UnreadableImagesError("no usable test image (all were skipped as bad items)")
    return {k: np.concatenate([d[k] for d in data], axis=-1) for k in cache.CHUNK_KEYS}

  def certified_codec(self):
    """The codec the certified point names (raw without a certificate)."""
    if self.certificate is None:
      return None
    return codecs.parse(self.certificate["codec"])

  def all_points(self) -> list:
    """The sweep's operating points, then the Certified point when there is one."""
    if self.certificate is None:
      return list(self.points)
    return list(self.points) + [(methods.CERTIFIED, self.certificate["tau"])]

  # -- the whole run

  def precision(self):
    """The run's matmul precision, as a context (the gallery's edge step uses it too)."""
    # float32 matmuls on TPU default to bfloat16 passes; "highest" keeps timm parity.
    return jax.default_matmul_precision(self.config.get("matmul_precision", "highest"))

  def run(self) -> dict:
    with self.precision():
      return self._run()

  def _run(self) -> dict:
    t0 = time.perf_counter()
    cal = self.calibrate()
    if cal.certificate is not None:
      self.certificate, self.certified_point = cal.certificate, cal.operating_point()
    done, certified_done = self._run_chunks(cal)
    arrays = self.arrays()
    codec_points = metrics.aggregate(arrays, self.all_points(), self.geometry, cal.alpha_crc,
                                     self.codecs, self.certified_codec())
    points = metrics.for_codec(codec_points, "raw")
    self.timings["coding_s"] = self.passes.coding_s  # inside certification_s and server_s
    self.timings["total_s"] += time.perf_counter() - t0
    return {"calibration": cal, "points": points, "codec_points": codec_points,
            "arrays": arrays, "fingerprint": self.fp, "codecs": [str(c) for c in self.codecs],
            "certification_grid": self.certification_grid,
            "certification_sizing": self.certification_sizing,
            "skipped": dict(self.skipped), "timings": dict(self.timings),
            "chunks_computed": done, "certified_chunks_computed": certified_done}

  def _run_chunks(self, cal: Calibration) -> tuple[int, int]:
    """Runs every chunk not cached yet (this host's share); (sweeps, Certified rows) run."""
    chunks = self.chunks()
    done = certified_done = 0
    pid, nproc = jax.process_index(), jax.process_count()
    for c, idx in enumerate(tqdm(chunks, desc="test chunks", disable=not self.progress)):
      if c % nproc != pid:
        continue
      if (main := self.load_main(c)) is None:
        self.run_chunk(c, idx, cal)
        done += 1
      elif self.certificate is not None and self.load_certified(c) is None:
        self.run_certified_chunk(c, idx, main)  # a new certified point: that row only
        certified_done += 1
    if nproc > 1:
      multihost_utils.sync_global_devices("rcst_chunks_done")
    return done, certified_done

