"""Seeded trainer for the demo models: edge CNN, server ViT, baseline edge ViT.

The demo has no pretrained weights, so we train small config variants of the
ported modules on SyntheticShapes (in memory, uint8, 224x224):

  edge           EfficientNet on full images (BatchNorm stats in train mode)
  server         DeiT through ``tokens``: each image keeps a random subset of
                 its 16x16 patches (sometimes only the object's patches come
                 first), so it classifies from the partial sets it receives
  baseline_edge  a smaller DeiT on full images; its CLS attention drives the
                 Im et al. baselines

One recipe for all: AdamW, warmup + cosine, label smoothing, global-norm
clipping, dihedral flips (shapes and textures keep their class under them).
A run is a pure function of (config, seed): batch order, token counts and
dropout all come from the seed.

  rcst train --config configs/demo_train.py [--config.models=server] [--config.output_dir=DIR]
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from tqdm.auto import tqdm

from rcst_jax.core.fileio import atomic_savez
from rcst_jax.data.preprocess import IMAGENET_MEAN, IMAGENET_STD, normalize
from rcst_jax.data.synthetic import CLASS_NAMES, SyntheticShapes
from rcst_jax.inference import patches as P
from rcst_jax.inference.server import Server
from rcst_jax.models import checkpoints, create_model, default_cfg, family_of

PATCH = 16


# ---------------------------------------------------------------- data


def render(split: str, num: int, seed: int, workers: int = 2, progress: bool = True):
  """SyntheticShapes (images uint8 [N,S,S,3], labels [N], object coverage [N,grid^2]).

  Coverage is the fraction of each patch under the object mask: it lets the
  server train on object-first token sets, a stand-in for salient selections.
  """
  return SyntheticShapes(split, num, seed).arrays(workers=workers, progress=progress,
                                                  coverage=True)


def cached_render(cache_dir: str, split: str, num: int, seed: int, workers: int):
  """:func:`render`, kept as .npz under ``cache_dir`` (empty: no cache) for reruns."""
  if not cache_dir:
    return render(split, num, seed, workers)
  path = os.path.join(cache_dir, f"synthetic_{split}_{seed}_{num}.npz")
  if os.path.exists(path):
    with np.load(path) as f:
      return f["images"], f["labels"], f["coverage"]
  data = render(split, num, seed, workers)
  atomic_savez(path, images=data[0], labels=data[1], coverage=data[2])
  return data


# ---------------------------------------------------------------- jitted pieces


def augment(rng, images, coverage):
  """Random flips and transpose per image (the dihedral group of the square).

  The coverage grid moves with the image, so object-first selection still
  points at the object.
  """
  b, s = images.shape[0], images.shape[1]
  grid = coverage.reshape(b, s // PATCH, s // PATCH)
  flags = jax.random.bernoulli(rng, 0.5, (3, b))
  ops = (lambda x: jnp.flip(x, 1), lambda x: jnp.flip(x, 2), lambda x: jnp.swapaxes(x, 1, 2))
  for flag, op in zip(flags, ops):
    pick = lambda x: jnp.where(flag.reshape((b,) + (1,) * (x.ndim - 1)), op(x), x)
    images, grid = pick(images), pick(grid)
  return images, grid.reshape(b, -1)


def select_tokens(rng, coverage, k: int, min_keep: float, object_prob: float):
  """Per image a random patch subset, padded to ``k`` slots: (idx [B,k], valid [B,k]).

  Each image keeps between ceil(min_keep * N) and k patches (uniform count).
  With probability ``object_prob`` its object patches rank first, so small
  sets are mostly object, as salient selections are; else all ranks are random.
  """
  b, n = coverage.shape
  r_count, r_mode, r_rank = jax.random.split(rng, 3)
  low = min(k, max(1, math.ceil(min_keep * n)))
  count = jax.random.randint(r_count, (b, 1), low, k + 1)
  object_first = jax.random.bernoulli(r_mode, object_prob, (b, 1)) & (coverage > 0)
  priority = jax.random.uniform(r_rank, (b, n)) + object_first
  idx = jnp.argsort(-priority, axis=1)[:, :k].astype(jnp.int32)
  return idx, jnp.arange(k)[None, :] < count


class TrainState(train_state.TrainState):
  batch_stats: Any = None


def make_optimizer(c, steps: int):
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, c.lr, min(c.warmup_steps, steps // 2), max(steps, 1), end_value=c.lr * 0.01)
  # Decay weights only: biases, norms, tokens and position embeddings are
  # left alone, as in timm's default param groups.
  decay_mask = lambda params: jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) == "kernel", params)
  return optax.chain(optax.clip_by_global_norm(c.grad_clip),
                     optax.adamw(schedule, weight_decay=c.weight_decay, mask=decay_mask)), schedule


def make_train_step(module, c, mean, std):
  """(state, images uint8, labels, coverage, rng, k) -> (state, loss); k static.

  k = None: full images through ``__call__``; else token subsets of k slots.
  """
  def loss_fn(params, state, images, labels, coverage, rng, k):
    r_aug, r_tok, r_drop = jax.random.split(rng, 3)
    images, coverage = augment(r_aug, images, coverage)
    variables = {"params": params}
    mutable = False
    if state.batch_stats is not None:
      variables["batch_stats"], mutable = state.batch_stats, ["batch_stats"]
    if k is None:
      out = module.apply(variables, normalize(images, mean, std), train=True,
                         mutable=mutable, rngs={"dropout": r_drop})
    else:
      idx, valid = select_tokens(r_tok, coverage, k, c.tokens.min_keep, c.tokens.object_prob)
      out = module.apply(variables, P.gather_patches(images, idx, PATCH), idx, valid,
                         train=True, mutable=mutable, rngs={"dropout": r_drop},
                         method=module.tokens)
    (logits, _), new_vars = out if mutable else (out, {})
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), c.label_smoothing)
    loss = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean()
    return loss, new_vars.get("batch_stats")

  @functools.partial(jax.jit, static_argnames="k", donate_argnums=0)
  def step(state, images, labels, coverage, rng, k=None):
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state, images, labels, coverage, rng, k)
    return state.apply_gradients(grads=grads, batch_stats=stats), loss

  return step


# ---------------------------------------------------------------- training


def init_variables(module, rng, image_shape):
  # Only params and batch_stats: the Grad-CAM taps' 'perturbations' are not state.
  x = jnp.zeros((1, *image_shape), jnp.float32)
  return flax.core.unfreeze(module.init(rng, x, mutable=["params", "batch_stats"]))


def num_steps(c, num_examples: int) -> int:
  return int(c.steps) if c.get("steps") else int(c.epochs * num_examples // c.batch_size)


def train_classifier(module, images, labels, c, *, seed: int, coverage=None,
                     mean=IMAGENET_MEAN, std=IMAGENET_STD, progress: bool = True,
                     desc: str = "train"):
  """Trains ``module`` on uint8 images; returns (variables, info).

  ``c``: batch_size, epochs or steps, lr, warmup_steps, weight_decay,
  label_smoothing, grad_clip, optional ``tokens`` (buckets, bucket_probs,
  min_keep, object_prob) to train through the token entry point.
  """
  steps = num_steps(c, len(images))
  if coverage is None:
    coverage = np.ones((len(images), (images.shape[1] // PATCH) ** 2), np.float32)
  init_rng, step_rng = jax.random.split(jax.random.PRNGKey(seed))
  variables = init_variables(module, init_rng, images.shape[1:])
  tx, schedule = make_optimizer(c, steps)
  state = TrainState.create(apply_fn=module.apply, params=variables["params"], tx=tx,
                            batch_stats=variables.get("batch_stats"))
  step = make_train_step(module, c, mean, std)
  order, sizes = batch_plan(np.random.default_rng(seed), len(images), c, steps)

  bar = tqdm(range(steps), desc=desc, disable=not progress, mininterval=20)
  t0, seen, losses = time.perf_counter(), 0, []
  for i in bar:
    rows = np.sort(order[i])  # sorted rows: faster gathers, same batch
    state, loss = step(state, images[rows], labels[rows], coverage[rows],
                       jax.random.fold_in(step_rng, i), k=sizes[i])
    losses.append(loss)
    seen += len(rows)
    if i % 10 == 9 or i == steps - 1:
      rate = seen / (time.perf_counter() - t0)
      bar.set_postfix(loss=f"{float(loss):.3f}", lr=f"{float(schedule(i)):.2e}",
                      img_s=f"{rate:.1f}")
  variables = {"params": state.params}
  if state.batch_stats is not None:
    variables["batch_stats"] = state.batch_stats
  losses = np.asarray(jax.device_get(losses), np.float32)
  info = {"steps": steps, "seconds": round(time.perf_counter() - t0, 1),
          "loss_first": float(losses[0]), "loss_last": float(losses[-5:].mean())}
  return jax.device_get(variables), info


def batch_plan(rng: np.random.Generator, n: int, c, steps: int):
  """Row indices [steps, batch] (epoch-wise shuffles) and each step's token slots."""
  b = c.batch_size
  if b > n:
    raise ValueError(f"batch size {b} exceeds the {n} training examples")
  per_epoch = n // b
  epochs = -(-steps // per_epoch)
  order = np.concatenate([rng.permutation(n)[:per_epoch * b] for _ in range(epochs)])
  order = order.reshape(-1, b)[:steps]
  tok = c.get("tokens")
  if not tok:
    return order, [None] * steps
  sizes = rng.choice(np.asarray(tok.buckets), size=steps, p=np.asarray(tok.bucket_probs))
  return order, [int(s) for s in sizes]


# ---------------------------------------------------------------- evaluation


def _batched(fn, arrays, batch: int):
  """Applies fn to fixed-size batches (the last one padded) and concatenates."""
  n = len(arrays[0])
  outs = []
  for start in range(0, n, batch):
    part = [a[start:start + batch] for a in arrays]
    pad = batch - len(part[0])
    if pad:
      part = [np.concatenate([a, np.repeat(a[-1:], pad, 0)]) for a in part]
    outs.append(np.asarray(fn(*part))[:batch - pad])
  return np.concatenate(outs)


def predict_images(module, variables, images, mean, std, batch: int = 100):
  fn = jax.jit(lambda x: module.apply(variables, normalize(x, mean, std))[0].argmax(-1))
  return _batched(fn, [images], batch)


def predict_tokens(module, variables, images, keep, batch: int = 100):
  """Server predictions from the kept patches only (keep: bool [N, grid^2]),
  through the evaluation's own token server."""
  model = checkpoints.Model(module, variables, {"num_classes": module.num_classes})
  return Server(model, batch).logits_from_images(images, keep).argmax(-1)


def partial_token_sets(coverage, seed: int) -> dict[str, np.ndarray]:
  """Evaluation selections: the object's patches, and random 25 % / 50 % subsets."""
  rng = np.random.default_rng(seed)
  n, g = coverage.shape
  sets = {"object": coverage > 0}
  for frac in (0.25, 0.5):
    ranks = rng.random((n, g)).argsort(1).argsort(1)
    sets[f"random_{int(frac * 100)}"] = ranks < round(frac * g)
  return sets


def accuracy(pred, labels) -> float:
  return round(float(np.mean(np.asarray(pred) == np.asarray(labels))), 4)


# ---------------------------------------------------------------- the demo


def metadata(name: str, arch: dict, num_classes: int, class_names, train_info: dict,
             image_size: int = 224) -> dict:
  cfg = default_cfg(name)
  return {"timm_name": name, "tag": "demo", "family": family_of(name).__name__.split(".")[-1],
          "num_classes": num_classes, "input_size": [3, image_size, image_size], "crop_pct": 1.0,
          "interpolation": "bicubic", "mean": list(cfg["mean"]), "std": list(cfg["std"]),
          "arch_overrides": dict(arch), "class_names": list(class_names), "label_set": None,
          "train": train_info}


def train_one(key: str, mc, data, test, seed: int, out_dir: str, progress: bool) -> dict:
  """Trains, evaluates, saves and reloads one of the three demo models."""
  images, labels, coverage = data
  arch = dict(mc.arch)
  module = create_model(mc.name, num_classes=len(CLASS_NAMES), **arch)
  cfg = default_cfg(mc.name)
  t0 = time.perf_counter()
  variables, info = train_classifier(module, images, labels, mc, seed=seed, coverage=coverage,
                                     mean=cfg["mean"], std=cfg["std"], progress=progress,
                                     desc=key)
  acc = {"full": accuracy(predict_images(module, variables, test[0], cfg["mean"], cfg["std"]),
                          test[1])}
  if mc.get("tokens"):
    for set_name, keep in partial_token_sets(test[2], seed).items():
      acc[set_name] = accuracy(predict_tokens(module, variables, test[0], keep), test[1])
  info.update(seed=seed, train_size=len(images), test_size=len(test[1]),
              wall_seconds=round(time.perf_counter() - t0, 1), test_accuracy=acc,
              batch_size=mc.batch_size, lr=mc.lr)
  print(f"[{key}] {json.dumps(info)}", flush=True)
  path = checkpoints.save_model(os.path.join(out_dir, mc.out),
                                variables, metadata(mc.name, arch, len(CLASS_NAMES),
                                                    CLASS_NAMES, info), overwrite=True)
  info["reload_full"] = check_reload(path, test)
  return info


def check_reload(path: str, test) -> float:
  """Accuracy of the saved model after load_model (must equal the trained one)."""
  model = checkpoints.load_model(path)
  acc = accuracy(predict_images(model.module, model.variables, test[0], model.metadata["mean"],
                                model.metadata["std"]), test[1])
  print(f"reloaded {path}: full-image accuracy {acc}", flush=True)
  return acc


def train_demo(config, out_dir: str | None = None) -> dict:
  """Renders the synthetic data and trains the models named in config.models."""
  d = config.data
  out_dir = out_dir or config.output_dir
  t0 = time.perf_counter()
  train = cached_render(d.cache_dir, "train", d.train_size, d.seed, d.workers)
  test = cached_render(d.cache_dir, "test", d.test_size, d.seed, d.workers)
  print(f"data ready in {time.perf_counter() - t0:.0f}s: train {len(train[1])}, "
        f"test {len(test[1])}", flush=True)
  results = {}
  for key in [m.strip() for m in config.models.split(",") if m.strip()]:
    results[key] = train_one(key, config[key], train, test, config.seed, out_dir,
                             config.progress)
  results["total_wall_seconds"] = round(time.perf_counter() - t0, 1)
  print(json.dumps(results, indent=2), flush=True)
  return results
