"""APS-guided Grad-CAM: parity with pytorch-grad-cam and torch autograd, linearity, CAM."""

import jax
import jax.numpy as jnp
import numpy as np
import paper_rules
import pytest
import torch
from conftest import randomize_batchnorm, timm_state_dict_numpy

from rcst_jax.inference import edge as edge_lib
from rcst_jax.inference import saliency
from rcst_jax.models.checkpoints import Model
from rcst_jax.models.convert import convert_state_dict

timm = pytest.importorskip("timm")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def b0():
  torch.manual_seed(0)
  tm = randomize_batchnorm(timm.create_model("efficientnet_b0", pretrained=False), 1).eval()
  module, variables, meta = convert_state_dict("efficientnet_b0", timm_state_dict_numpy(tm))
  images = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
  x = (torch.from_numpy(images).float() / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
  return tm, Model(module, variables, meta), images, x.permute(0, 3, 1, 2).contiguous()


def _one_hot_fn(classes):
  return lambda probs: jax.nn.one_hot(jnp.asarray(classes), probs.shape[-1]).astype(bool)


def _jx(model, images):
  return model.normalize(jnp.asarray(images))


def _minmax(m):
  """Per-image min-max to [0, 1] in float64 for the reference maps; a flat map
  (all zero after the ReLU) gives zeros."""
  m = np.asarray(m, np.float64)
  lo, hi = m.min(axis=(1, 2), keepdims=True), m.max(axis=(1, 2), keepdims=True)
  span = hi - lo
  return np.where(span > 0, (m - lo) / np.where(span > 0, span, 1.0), 0.0)


@pytest.mark.parametrize("inference_form", [False, True])
def test_single_class_matches_pytorch_grad_cam(b0, inference_form):
  from pytorch_grad_cam import GradCAM
  from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
  tm, model, images, x = b0
  model = model.inference() if inference_form else model  # BatchNorm folded
  classes = [3, 917]
  with jax.default_matmul_precision("highest"):
    res = saliency.aps_grad_cam(model.module, model.variables, _jx(model, images),
                                _one_hot_fn(classes))
  ours = np.asarray(saliency.minmax_normalize(saliency.upsample(res["cam"], (224, 224))))
  with GradCAM(model=tm, target_layers=[tm.bn2]) as cam:
    ref = cam(input_tensor=x, targets=[ClassifierOutputTarget(c) for c in classes])
  ref = _minmax(ref)
  assert ours.shape == ref.shape == (2, 224, 224)
  assert np.max(np.abs(ours - ref)) <= 1e-4


@pytest.mark.parametrize("inference_form", [False, True])
def test_conv_head_layer_matches_torch_autograd(b0, inference_form):
  # Grad-CAM at conv_head (before BN): torch autograd to that layer, by hand.
  tm, model, images, x = b0
  model = model.inference() if inference_form else model  # BatchNorm folded
  store = {}
  hook = tm.conv_head.register_forward_hook(lambda m, i, o: store.update(a=o))
  logits = tm(x)
  hook.remove()
  a = store["a"]
  g = torch.autograd.grad(logits[:, 5].sum(), a)[0]
  ref = torch.relu((g.mean((2, 3), keepdim=True) * a).sum(1)).detach().numpy()
  with jax.default_matmul_precision("highest"):
    res = saliency.aps_grad_cam(model.module, model.variables, _jx(model, images),
                                _one_hot_fn([5, 5]), layer="conv_head")
  ours = np.asarray(saliency.minmax_normalize(res["cam"]))
  assert np.max(np.abs(ours - _minmax(ref))) <= 1e-4


def test_aps_weighted_cam_is_the_eq19_weighted_sum_of_class_maps_before_relu(b0):
  """One backward pass with the APS weights (Eq. 19) gives the w-weighted sum of
  the per-class Grad-CAM maps before the ReLU (Eqs. 20-22). The APS set and
  the weights of the expected value are written out by hand."""
  _, model, images, _ = b0
  x = _jx(model, images)
  with jax.default_matmul_precision("highest"):
    logits, fmap, vjp = saliency.forward_with_taps(model.module, model.variables, x, "features")
    probs = jax.nn.softmax(logits)
    mask, _ = paper_rules.aps_set(np.asarray(probs), 0.02)  # a few classes per image
    assert int(mask.sum(-1).min()) >= 2
    w = paper_rules.aps_weights(np.asarray(probs), mask)
    np.testing.assert_allclose(np.asarray(saliency.aps_weights(probs, jnp.asarray(mask))), w,
                               rtol=1e-5, atol=1e-7)
    agg = saliency.grad_cam(fmap, vjp(saliency.aps_weights(probs, jnp.asarray(mask))))
    per_class = jnp.zeros(fmap.shape[:3])
    for c in np.flatnonzero(mask.any(0)):
      g = vjp(jax.nn.one_hot(jnp.full((2,), c), probs.shape[-1]))
      pre = (g.mean((1, 2), keepdims=True) * fmap).sum(-1)
      per_class = per_class + jnp.asarray(w[:, c], jnp.float32)[:, None, None] * pre
  np.testing.assert_allclose(np.asarray(agg), np.asarray(jax.nn.relu(per_class)),
                             rtol=1e-4, atol=1e-6 * float(jnp.abs(per_class).max()))


def test_pooled_feature_map_gives_analytic_cam(b0):
  _, model, images, _ = b0
  x = _jx(model, images)
  c = 42
  with jax.default_matmul_precision("highest"):
    res = saliency.aps_grad_cam(model.module, model.variables, x, _one_hot_fn([c, c]))
    _, out = model.module.apply(model.variables, x)
    feats = out["features"]
  kernel = model.variables["params"]["classifier"]["kernel"][:, c]
  h, w = feats.shape[1:3]
  analytic = jax.nn.relu((feats * (kernel / (h * w))).sum(-1))
  np.testing.assert_allclose(np.asarray(res["cam"]), np.asarray(analytic), rtol=1e-4,
                             atol=1e-6 * float(jnp.abs(analytic).max()))


def test_patch_scores_range_and_constant_map():
  cam = jnp.concatenate([jnp.zeros((1, 7, 7)), jnp.ones((1, 7, 7)) * 3,
                         jax.random.uniform(jax.random.PRNGKey(0), (1, 7, 7))])
  s = np.asarray(saliency.patch_scores(cam, (224, 224), 14))
  assert s.shape == (3, 196) and np.isfinite(s).all()
  assert (s[:2] == 0).all()  # constant maps -> zeros, never NaN
  assert s[2].min() == 0 and s[2].max() == 1


@pytest.mark.parametrize("size,grid", [(224, 14), (100, 14), (13, 5)])
def test_adaptive_avg_pool_matches_torch(size, grid):
  m = np.random.default_rng(size).random((2, size, size)).astype(np.float32)
  ref = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(m)[:, None], grid)[:, 0]
  np.testing.assert_allclose(np.asarray(saliency.adaptive_avg_pool(jnp.asarray(m), grid)),
                             ref.numpy(), rtol=1e-5, atol=1e-6)


def test_upsample_matches_torch_bilinear():
  m = np.random.default_rng(1).random((2, 7, 7)).astype(np.float32)
  ref = torch.nn.functional.interpolate(torch.from_numpy(m)[:, None], size=(224, 224),
                                        mode="bilinear", align_corners=False)[:, 0]
  np.testing.assert_allclose(np.asarray(saliency.upsample(jnp.asarray(m), (224, 224))),
                             ref.numpy(), rtol=1e-5, atol=1e-6)


def test_edge_step_accepts_by_eq15_and_builds_the_eq17_18_aps_set(b0):
  """The edge step's acceptance is float32(p_max) >= float32(lambda) and its APS
  set and size are the hand-written APS rule on its own softmax."""
  _, model, images, _ = b0
  with jax.default_matmul_precision("highest"):
    e = jax.device_get(edge_lib.edge_step(model, images, lambda_hat=0.0015, q_hat=0.05))
  probs = e["probs"]
  np.testing.assert_allclose(probs.sum(-1), 1, atol=1e-5)
  np.testing.assert_array_equal(e["p_max"], probs.max(-1))
  np.testing.assert_array_equal(e["accept"], paper_rules.accepts(probs.max(-1), 0.0015))
  mask, k = paper_rules.aps_set(probs, 0.05)
  np.testing.assert_array_equal(e["aps_mask"], mask)
  np.testing.assert_array_equal(e["aps_size"], k)
  assert e["patch_scores"].shape == (2, 196)
  assert (e["patch_scores"] >= 0).all() and (e["patch_scores"] <= 1).all()
