"""The edge step of Algorithm 2: one jitted forward + backward per batch.

uint8 images -> edge softmax, CRC acceptance (Eq. 15), APS set (Eqs. 17-18),
APS-guided Grad-CAM and P x P patch scores (Eqs. 19-23). `softmax_fn` is the
edge's forward alone (Algorithm 1's calibration pass, the baseline edge).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from rcst_edge.deployment import OperatingPoint
from rcst_edge.onnx_edge import OnnxEdge
from rcst_jax.core import spmd
from rcst_jax.data import normalize
from rcst_jax.inference import saliency, selection
from rcst_jax.models.checkpoints import Model
from rcst_jax.stats import conformal


@functools.partial(jax.jit, static_argnames=("module", "mean", "std", "layer", "grid",
                                             "sharding"))
def _edge_step(variables, images, lambda_hat, q_hat, *, module, mean, std, layer, grid,
               sharding=None):
  # Per device: the micro-batched trunk would otherwise run the whole batch on
  # every device (see rcst_jax.core.spmd).
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
             accept=conformal.accepts(p_max, lambda_hat), aps_size=res["aps_mask"].sum(-1).astype(jnp.int32))
  del res["logits"]
  return res


def edge_step(edge: Model, images, lambda_hat, q_hat, *, layer: str = "features",
              grid: int = 14, sharding=None) -> dict:
  """The complete edge computation for a batch of uint8 images [B, H, W, 3].

  Returns probs [B,C], p_max, pred, accept (p_max >= lambda_hat, Eq. 15),
  aps_mask [B,C] (Eqs. 17-18), aps_size, cam [B,h,w] (Eq. 22 before Up) and
  patch_scores [B, grid*grid] (Eq. 23). ``sharding``: the NamedSharding that
  splits ``images`` along the batch (multi-device): each device then runs its
  own rows (:func:`rcst_jax.core.spmd.per_device`); the results are the same.
  """
  edge = edge.inference()  # e.g. BatchNorm folded; computed once per Model
  return _edge_step(edge.variables, images, jnp.float32(lambda_hat), jnp.float32(q_hat),
                    module=edge.module, mean=tuple(edge.metadata["mean"]),
                    std=tuple(edge.metadata["std"]), layer=layer, grid=grid, sharding=sharding)


@functools.partial(jax.jit, static_argnames=("module", "mean", "std", "with_attn", "sharding"))
def _softmax(variables, images, *, module, mean, std, with_attn, sharding=None):
  # One jitted function for every softmax_fn: a shape compiles once per process.
  return spmd.per_device(functools.partial(_softmax_rows, module=module, mean=mean, std=std,
                                           with_attn=with_attn), sharding)(variables, images)


def _softmax_rows(variables, images, *, module, mean, std, with_attn):
  logits, out = module.apply(variables, normalize(images, mean, std))
  probs = jax.nn.softmax(logits.astype(jnp.float32), -1)
  return (probs, out["cls_attn"].astype(jnp.float32)) if with_attn else probs


def softmax_fn(model: Model, sharding=None, with_attn: bool = False):
  """Jitted softmax of the model's inference form (the form edge_step runs),
  with the CLS attention (the baseline edge's patch scores) if ``with_attn``.
  ``sharding`` splits the batch: each device runs its own rows (rcst_jax.core.spmd)."""
  model = model.inference()
  static = dict(module=model.module, mean=tuple(model.metadata["mean"]),
                std=tuple(model.metadata["std"]), with_attn=with_attn, sharding=sharding)
  return lambda images: _softmax(model.variables, images, **static)


def edge_view(e: dict) -> dict:
  """The proposed edge's outputs as `methods.decide` reads them."""
  return {"pred": e["pred"], "accept": e["accept"], "scores": e["patch_scores"]}


def baseline_outputs(probs, attn, eta: float) -> dict:
  """Im et al.'s DeiT-Tiny edge from its softmax [n, C] and CLS attention
  [n, N] (`softmax_fn(..., with_attn=True)`): top-1, max softmax, the
  min-entropy acceptance at ``eta`` and the patch scores (numpy)."""
  probs = np.asarray(probs)
  return {"pred": probs.argmax(-1).astype(np.int32), "p_max": probs.max(-1),
          "accept": np.asarray(selection.min_entropy_accept(probs, eta)),
          "scores": np.asarray(attn)}


def baseline_view(base: dict, keys, seed: int, num_patches: int) -> dict:
  """The baseline edge's outputs as `methods.decide` reads them: random-k's
  ranks by image key."""
  return {**base, "rank": selection.random_ranks(keys, seed, num_patches)}


def pad_rows(a, rows: int) -> np.ndarray:
  """``a`` padded with zero rows to ``rows`` (one compiled shape per batch size)."""
  a = np.asarray(a)
  return np.pad(a, [(0, rows - len(a))] + [(0, 0)] * (a.ndim - 1))


def edge_outputs(edge, images, lambda_hat, q_hat, *, layer: str = "features", grid: int = 14,
                 sharding=None) -> dict:
  """`edge_step`'s outputs from the edge that decides: a Flax `Model`, or an
  `rcst export` file on ONNX Runtime (`rcst_edge.onnx_edge.OnnxEdge`, whose
  layer and grid were fixed when it was exported). Calibration, the sweep and
  the certificate all score through here, so they score as the run decides."""
  if isinstance(edge, OnnxEdge):
    out = edge(np.asarray(images), OperatingPoint(float(lambda_hat), float(q_hat), 0.0))
    out.pop("keep")
    return out
  return edge_step(edge, images, lambda_hat, q_hat, layer=layer, grid=grid, sharding=sharding)


def edge_step_batched(edge: Model, images, lambda_hat, q_hat, *, layer: str, grid: int,
                      batch_size: int, sharding=None, concurrency: int = 0) -> dict:
  """`edge_step` over images in memory, `batch_size` at a time (the last batch
  padded, so one shape compiles), as numpy arrays; ``concurrency`` batches in
  flight (0: `spmd.host_concurrency`'s choice)."""
  def run(start):
    chunk = images[start:start + batch_size]
    x = chunk if len(chunk) == batch_size else pad_rows(chunk, batch_size)
    if sharding is not None:
      x = jax.device_put(x, sharding)
    e = jax.device_get(edge_outputs(edge, x, lambda_hat, q_hat, layer=layer, grid=grid,
                                    sharding=sharding))
    return {k: np.asarray(v)[:len(chunk)] for k, v in e.items()}
  parts = list(spmd.host_map(run, range(0, len(images), batch_size),
                             spmd.host_concurrency(concurrency, sharding)))
  if not parts:
    raise ValueError("no images given")
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
