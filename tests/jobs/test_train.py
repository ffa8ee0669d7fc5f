"""The demo trainer on tiny models and 32x32 images: learning, state, seeds, saving."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from rcst_edge.payload.patches import patchify
from rcst_jax.jobs import train as T
from rcst_jax.models import checkpoints, create_model

SIZE, CLASSES = 32, 4  # a 2x2 patch grid keeps compiles short
TINY_EFFNET = dict(channel_multiplier=0.25, depth_multiplier=0.25, drop_rate=0.0,
                   block_strings=(("ds_r1_k3_s1_e1_c16_se0.25",), ("ir_r1_k3_s2_e6_c24_se0.25",)))
TINY_DEIT = dict(img_size=SIZE, embed_dim=32, depth=1, num_heads=2)


def _config(steps=40, tokens=False):
  c = ml_collections.ConfigDict(dict(
      batch_size=8, epochs=1.0, steps=steps, lr=1e-2, warmup_steps=3, weight_decay=0.0,
      label_smoothing=0.0, grad_clip=1.0, tokens=None))
  if tokens:
    # One slot count (one compile); each image still keeps only 1-4 of its 4 patches.
    c.tokens = ml_collections.ConfigDict(dict(buckets=(4,), bucket_probs=(1.0,),
                                              min_keep=0.25, object_prob=0.5))
  return c


@pytest.fixture(scope="module")
def batch():
  """One fixed batch of 8 images whose class is its mean colour: easy to overfit."""
  rng = np.random.default_rng(0)
  labels = np.arange(8, dtype=np.int32) % CLASSES
  images = rng.integers(0, 60, (8, SIZE, SIZE, 3)) + 60 * labels[:, None, None, None]
  coverage = (rng.random((8, 4)) > 0.5).astype(np.float32)
  return images.astype(np.uint8), labels, coverage


def _deit():
  return create_model("deit_tiny_patch16_224", num_classes=CLASSES, **TINY_DEIT)


def test_effnet_overfits_a_batch_and_updates_batch_stats(batch):
  images, labels, _ = batch
  module = create_model("efficientnet_b0", num_classes=CLASSES, **TINY_EFFNET)
  variables, info = T.train_classifier(module, images, labels, _config(), seed=0, progress=False)
  assert info["loss_last"] < 0.5 * info["loss_first"]
  init = T.init_variables(module, jax.random.PRNGKey(0), images.shape[1:])
  assert set(variables) == {"params", "batch_stats"}
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()),
                       variables["batch_stats"], init["batch_stats"])
  assert min(jax.tree.leaves(moved)) > 0  # every running mean/var was updated


def test_deit_overfits_a_batch_from_token_subsets(batch):
  images, labels, coverage = batch
  variables, info = T.train_classifier(_deit(), images, labels, _config(tokens=True), seed=0,
                                       coverage=coverage, progress=False)
  assert info["loss_last"] < 0.5 * info["loss_first"]
  assert set(variables) == {"params"}


def test_training_is_reproducible(batch):
  images, labels, coverage = batch
  run = lambda seed: T.train_classifier(_deit(), images, labels, _config(steps=5, tokens=True),
                                        seed=seed, coverage=coverage, progress=False)[0]
  a, b, c = run(0), run(0), run(1)
  same = jax.tree.map(np.array_equal, a, b)
  assert all(jax.tree.leaves(same))
  assert not np.array_equal(a["params"]["head"]["kernel"], c["params"]["head"]["kernel"])


def test_select_tokens_counts_and_object_first():
  coverage = jnp.asarray(np.tile((np.arange(16) < 5).astype(np.float32), (64, 1)))
  idx, valid = T.select_tokens(jax.random.PRNGKey(0), coverage, k=8, min_keep=0.25,
                               object_prob=1.0)
  counts = np.asarray(valid.sum(1))
  assert counts.min() >= 4 and counts.max() <= 8
  assert (np.sort(np.asarray(idx)[:, :5], 1) == np.arange(5)).all()  # object patches first
  assert all(len(set(row)) == 8 for row in np.asarray(idx))


def test_augment_moves_coverage_with_the_image():
  # Each patch is painted with its own coverage value, so they must still agree after.
  rng = np.random.default_rng(1)
  coverage = rng.integers(0, 4, (16, 4)).astype(np.float32) / 4
  paint = (coverage * 255).reshape(16, 2, 2)  # row-major 2 x 2 grid of 16 x 16 patches
  images = np.repeat(np.repeat(paint, 16, axis=1), 16, axis=2)[..., None].repeat(3, axis=-1)
  out, cov = T.augment(jax.random.PRNGKey(3), jnp.asarray(images), jnp.asarray(coverage))
  np.testing.assert_allclose(patchify(out).mean(axis=(2, 3, 4)), np.asarray(cov) * 255)
  assert not np.array_equal(np.asarray(cov), coverage)


def test_saved_metadata_and_accuracy_round_trip(batch, tmp_path):
  images, labels, coverage = batch
  module = _deit()
  variables, info = T.train_classifier(module, images, labels, _config(steps=5), seed=0,
                                       progress=False)
  arch = {k: v for k, v in TINY_DEIT.items()}
  meta = T.metadata("deit_tiny_patch16_224", arch, CLASSES, list("abcd"), info, SIZE)
  path = checkpoints.save_model(str(tmp_path / "m"), variables, meta)
  model = checkpoints.load_model(path)
  assert model.metadata == checkpoints.read_metadata(path)
  assert model.metadata["train"]["steps"] == 5 and model.metadata["family"] == "deit"
  assert model.metadata["arch_overrides"] == arch and model.class_names == list("abcd")
  before = T.predict_images(module, variables, images, T.IMAGENET_MEAN, T.IMAGENET_STD, 8)
  np.testing.assert_array_equal(np.asarray(model(images)[0].argmax(-1)), before)
  keep = coverage > 0
  keep[:, 0] = True  # at least one token per image
  np.testing.assert_array_equal(T.predict_tokens(model.module, model.variables, images, keep, 8),
                                T.predict_tokens(module, variables, images, keep, 8))


def test_rcst_train_subcommand_writes_a_loadable_model(tmp_path):
  """`rcst train` (one config system with the rest of the CLI) writes to output_dir."""
  from rcst_jax import cli
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert cli.main(["train", "--config", os.path.join(repo, "configs", "demo_train.py"),
                   "--config.models=baseline_edge", "--config.data.train_size=16",
                   "--config.data.test_size=8", "--config.baseline_edge.steps=1",
                   "--config.baseline_edge.batch_size=8", "--config.baseline_edge.warmup_steps=0",
                   f"--config.output_dir={tmp_path}", "--config.progress=False"]) == 0
  model = checkpoints.load_model(str(tmp_path / "demo_baseline_edge"))
  assert model.num_classes == 12 and model.metadata["train"]["train_size"] == 16
