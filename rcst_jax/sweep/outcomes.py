"""The certification's model passes: Algorithm 2 on the calibration images at every tau.

The calibration images are split (seeded by ``certify.seed``): the first
part fits the APS q_hat that shapes the Grad-CAM and orders the grid, the
second only tests, so its losses stay exchangeable with test images. For
each image: the edge's prediction and p_max, and the server's prediction on
the full image and on the patches kept at each tau. A lambda grid only
moves acceptance, so it costs no server work. The outcomes are cached by
what they depend on (`cache.outcome_id`); the certificate itself is
recomputed from them on every run (`calibration.certificate.certify_run`).
"""

from __future__ import annotations

import sys
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from rcst_jax.calibration import algorithm1, certificate
from rcst_jax.data.sources import Sources
from rcst_jax.inference import edge as edge_lib
from rcst_jax.inference import methods
from rcst_jax.payload import codecs
from rcst_jax.sweep import cache


def certify(run, cal) -> tuple[dict, dict]:
  """(certificate, grid arrays for the figure) of an Evaluation ``run``."""
  taus, specs = certificate.tau_grid(run.config), certificate.codec_grid(run.config)
  ident = cache.outcome_id(run.config, run.models, run.sources, run.cal_inputs)
  out = run.store.load_outcomes(ident)
  if out is None:
    out = _outcomes(run, taus, [codecs.parse(c) for c in specs])
    if jax.process_index() == 0:
      run.store.save_outcomes(ident, out)
  out = dict(out)
  q_hat_fit, n_fit = float(out.pop("q_hat_fit")), int(out.pop("n_fit"))
  if run.certification_sizing is None:  # cached outcomes: the same pilot, read back
    _size(run, {k: v[..., :n_fit] for k, v in out.items()}, len(out["labels"]) - n_fit)
  return certificate.certify_run(run.config, out, taus, run.geometry, q_hat_fit, n_fit, specs)


def split(indices: np.ndarray, fraction: float, seed: int):
  """(fitting, testing) calibration indices, each sorted."""
  perm = np.random.default_rng(int(seed)).permutation(len(indices))
  n_fit = int(round(float(fraction) * len(indices)))
  return np.sort(indices[perm[:n_fit]]), np.sort(indices[perm[n_fit:]])


def _size(run, fit: dict, n_test: int) -> None:
  """The pilot's estimate of the testing images the cheap pairs need, printed."""
  run.certification_sizing = certificate.sizing(run.config, fit, run.geometry, n_test)
  if jax.process_index() == 0:
    tqdm.write(run.certification_sizing, file=sys.stderr)


def _outcomes(run, taus, codec_list) -> dict:
  c, src = run.config.certify, run.sources
  images = run.cal_held if run.cal_held is not None else src.cal_source
  fit, test = split(src.cal_indices, c.split, c.seed)
  t0 = time.perf_counter()
  cal_fit = algorithm1.algorithm1(
      run.config, run.passes.edge, Sources(images, images, fit, fit, name=src.name),
      run.transform, server_metadata=run.models.server.metadata, geometry=run.geometry,
      server_digest=None, sharding=run.passes.sharding, progress=run.progress)
  run.timings["certification_calibration_s"] += time.perf_counter() - t0
  parts = [_part(run, images, "fit", fit, cal_fit.q_hat, taus, codec_list)]
  # Before the long passes: how many testing images the cheap pairs need.
  _size(run, parts[0], len(test))
  parts.append(_part(run, images, "test", test, cal_fit.q_hat, taus, codec_list))
  out = {k: np.concatenate([p[k] for p in parts], axis=-1) for k in parts[0]}
  return {**out, "q_hat_fit": np.float64(cal_fit.q_hat),
          "n_fit": np.int64(len(parts[0]["labels"]))}


def _part(run, images, name: str, indices, q_hat: float, taus, codec_list) -> dict:
  """One split's outcomes; per-configuration arrays [C * T, n], codec-major."""
  t0 = time.perf_counter()
  got = run.passes.edge_pass(
      run.passes.batches(images, indices, f"certification {name}",
                         run.skipped, run.progress),
      float("inf"), q_hat, with_base=False)  # accept nothing: the server at every tau
  run.timings["certification_edge_s"] += time.perf_counter() - t0
  if got is None:
    raise ValueError(f"no usable image in the certification {name} split")
  t0 = time.perf_counter()
  # Server-only is the reference on raw patches; raw leads every sweep's codecs.
  sweep_codecs = codecs.sweep_grid(codec_list)
  off, keep, _, server_pred, by_codec, nbytes = run.passes.sweep(
      {methods.EDGE: edge_lib.edge_view(got.edge)}, got.images,
      [(methods.SERVER_ONLY, (None,)), (methods.PROPOSED, taus)], sweep_codecs)
  run.timings["certification_server_s"] += time.perf_counter() - t0
  pick = [sweep_codecs.index(c) for c in codec_list]
  return {"labels": got.labels, "edge_pred": got.edge["pred"], "p_max": got.edge["p_max"],
          "server_only_pred": server_pred[0],
          "server_pred": np.concatenate([by_codec[j, 1:] for j in pick]),
          "kept": np.tile(keep[1:].sum(-1), (len(pick), 1)),
          "bytes": np.concatenate([nbytes[j, 1:] for j in pick])}

