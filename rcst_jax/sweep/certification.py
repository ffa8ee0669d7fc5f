"""The certificate's model passes: Algorithm 2 on the calibration images at every tau.

`Certification.run` splits the calibration images (seeded by ``certify.seed``),
runs the models on them and returns what it found; the certified pair itself
is picked from those outcomes by `calibration.certificate.pick_certified_pair`.
The sweep engine stores what it gets back: this module writes into nothing.

The first part fits the APS q_hat that shapes the Grad-CAM and orders the
grid, the second only tests, so its losses stay exchangeable with test
images. For each image: the edge's prediction and p_max, and the server's
prediction on the full image and on the patches kept at each tau. A lambda
grid only moves acceptance, so it costs no server work. The outcomes are
cached by what they depend on (`cache.outcome_id`); the certificate is
picked from them again on every run.
"""

from __future__ import annotations

import collections
import dataclasses
import sys
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from rcst_edge.payload import codecs
from rcst_jax.calibration import algorithm1, certificate
from rcst_jax.data.sources import Sources, UnreadableImagesError
from rcst_jax.inference import edge as edge_lib
from rcst_jax.inference import methods
from rcst_jax.models.loading import Models
from rcst_jax.settings import schema
from rcst_jax.sweep import cache
from rcst_jax.sweep.passes import Passes


def split(indices: np.ndarray, fraction: float, seed: int):
  """(fitting, testing) calibration indices, each sorted."""
  perm = np.random.default_rng(int(seed)).permutation(len(indices))
  n_fit, _ = schema.certify_split_sizes(len(indices), fraction)  # what validation checked
  return np.sort(indices[perm[:n_fit]]), np.sort(indices[perm[n_fit:]])


@dataclasses.dataclass
class CertificationResult:
  certificate: dict   # sealed, for the calibration artifact
  grid: dict          # cost and risk over the grid, for the certification figure
  sizing: str         # the pilot's line: testing images the cheap pairs need
  timings: dict       # seconds per phase (certification_*_s)


@dataclasses.dataclass
class Certification:
  """The certificate of one run's calibration images: `run` once, read what it returns.

  ``passes`` and ``store`` are the sweep's (its mesh, its cache); ``cal_inputs``
  is the calibration images' digest the outcomes are cached under; bad items
  are counted into ``skipped`` by reason, as Algorithm 1 counts them.
  """
  config: object
  models: Models
  sources: Sources
  passes: Passes
  store: cache.ChunkStore
  cal_inputs: str
  transform: object = None
  progress: bool = True
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  softmax: algorithm1.Softmax | None = None  # Algorithm 1's rows, when this run computed them

  def __post_init__(self):
    self.timings = collections.defaultdict(float)

  def run(self, images, sizing: str | None = None) -> CertificationResult:
    """Runs the model passes on the calibration ``images`` (or reads their cached
    outcomes), then picks the certified pair from the outcomes. ``sizing``: the
    pilot's line when an earlier run printed it (cached outcomes recompute it)."""
    config, geometry = self.config, self.passes.geometry
    taus, specs = certificate.tau_grid(config), certificate.codec_grid(config)
    ident = cache.outcome_id(config, self.models, self.sources, self.cal_inputs)
    out = self.store.load_outcomes(ident)
    if out is None:
      out, sizing = self.outcomes(images, taus, [codecs.parse(c) for c in specs])
      if jax.process_index() == 0:
        self.store.save_outcomes(ident, out)
    out = dict(out)
    q_hat_fit, n_fit = float(out.pop("q_hat_fit")), int(out.pop("n_fit"))
    if sizing is None:  # cached outcomes: the same pilot, read back
      sizing = self._pilot({k: v[..., :n_fit] for k, v in out.items()},
                           len(out["labels"]) - n_fit)
    cert, grid = certificate.pick_certified_pair(config, out, taus, geometry, q_hat_fit, n_fit,
                                                 specs)
    return CertificationResult(cert, grid, sizing, dict(self.timings))

  def _pilot(self, fit: dict, n_test: int) -> str:
    """The pilot's estimate of the testing images the cheap pairs need, printed."""
    line = certificate.sizing(self.config, fit, self.passes.geometry, n_test)
    if jax.process_index() == 0:
      tqdm.write(line, file=sys.stderr)
    return line

  def outcomes(self, images, taus, codec_list) -> tuple[dict, str]:
    """(every calibration image's outcomes, fitting split first; the pilot's line)."""
    c = self.config.certify
    fit, test = split(self.sources.cal_indices, c.split, c.seed)
    t0 = time.perf_counter()
    q_hat = self._fit_q_hat(images, fit)
    self.timings["certification_calibration_s"] += time.perf_counter() - t0
    parts = [self._part(images, "fit", fit, q_hat, taus, codec_list)]
    # Before the long passes: how many testing images the cheap pairs need.
    sizing = self._pilot(parts[0], len(test))
    parts.append(self._part(images, "test", test, q_hat, taus, codec_list))
    out = {k: np.concatenate([p[k] for p in parts], axis=-1) for k in parts[0]}
    return {**out, "q_hat_fit": np.float64(q_hat),
            "n_fit": np.int64(len(parts[0]["labels"]))}, sizing

  def _fit_q_hat(self, images, fit) -> float:
    """Algorithm 1's APS q_hat on the fitting split: from the rows of the run's
    calibration pass when it made one (a row does not depend on its batch), else
    (Algorithm 1 read from the cache, or bad items skipped) from an edge pass."""
    rows = self.softmax.take(fit) if self.softmax is not None else None
    if rows is not None:
      return algorithm1.calibrate(rows.probs, rows.labels, self.config.alpha_crc,
                                  self.config.alpha_aps).q_hat
    return algorithm1.algorithm1(
        self.config, self.passes.edge, Sources(images, images, fit, fit, name=self.sources.name),
        self.transform, server_metadata=self.models.server.metadata,
        geometry=self.passes.geometry, server_digest=None, sharding=self.passes.sharding,
        progress=self.progress).q_hat

  def _part(self, images, name: str, indices, q_hat: float, taus, codec_list) -> dict:
    """One split's outcomes; per-configuration arrays [C * T, n], codec-major."""
    passes = self.passes
    t0 = time.perf_counter()
    got = passes.edge_pass(
        passes.batches(images, indices, f"certification {name}", self.skipped, self.progress),
        float("inf"), q_hat, with_base=False)  # accept nothing: the server at every tau
    self.timings["certification_edge_s"] += time.perf_counter() - t0
    if got is None:
      raise UnreadableImagesError(f"no usable image in the certification {name} split "
                                  f"({len(indices)} images, all skipped as bad items)")
    t0 = time.perf_counter()
    # Server-only is the reference on raw patches; raw leads every sweep's codecs.
    sweep_codecs = codecs.sweep_grid(codec_list)
    # With lossy codecs only, raw patches answer server-only alone.
    lossy_only = all(c.lossy for c in codec_list)
    off, keep, _, server_pred, by_codec, nbytes = passes.sweep(
        {methods.EDGE: edge_lib.edge_view(got.edge)}, got.images,
        [(methods.SERVER_ONLY, (None,)), (methods.PROPOSED, taus)], sweep_codecs,
        raw_points=np.arange(1 + len(taus)) == 0 if lossy_only else None)
    self.timings["certification_server_s"] += time.perf_counter() - t0
    pick = [sweep_codecs.index(c) for c in codec_list]
    return {"labels": got.labels, "edge_pred": got.edge["pred"], "p_max": got.edge["p_max"],
            "server_only_pred": server_pred[0],
            "server_pred": np.concatenate([by_codec[j, 1:] for j in pick]),
            "kept": np.tile(keep[1:].sum(-1), (len(pick), 1)),
            "bytes": np.concatenate([nbytes[j, 1:] for j in pick])}
