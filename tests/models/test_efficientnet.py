"""EfficientNet: fp32 parity with timm at random init, conversion checks, taps."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import max_rel_err, randomize_batchnorm, timm_state_dict_numpy

from rcst_jax.models import efficientnet as E
from rcst_jax.models.state_dict import ConversionError, StateDictReader

timm = pytest.importorskip("timm")
torch = pytest.importorskip("torch")
from timm.models import _efficientnet_builder as timm_builder  # noqa: E402
from timm.models import efficientnet as timm_effnet  # noqa: E402

TOL = 1e-4


@pytest.fixture(autouse=True)
def _highest_precision():
  with jax.default_matmul_precision("highest"):
    yield


@pytest.fixture(autouse=True, scope="module")
def _torch_flush_denormals():
  # Random BN stats drive SE gates into denormals, which makes timm 2-3x slower.
  torch.set_flush_denormal(True)
  yield
  torch.set_flush_denormal(False)


def _timm(builder, seed=0, **kw):
  torch.manual_seed(seed)
  return randomize_batchnorm(builder(**kw), seed).eval()


def _convert(tm, module):
  return E.from_timm(StateDictReader(timm_state_dict_numpy(tm)), module)


def _timm_forward(tm, x_nchw):
  """logits, conv_head output and bn2 output (= forward_features) in one pass, NHWC."""
  taps = {}
  hooks = [getattr(tm, n).register_forward_hook(
      lambda mod, i, o, n=n: taps.__setitem__(n, o.numpy().transpose(0, 2, 3, 1)))
      for n in ("conv_head", "bn2")]
  with torch.no_grad():
    logits = tm(torch.from_numpy(x_nchw)).numpy()
  for h in hooks:
    h.remove()
  return logits, taps["conv_head"], taps["bn2"]


def _check_parity(tm, module, variables, size, batch, seed=0):
  """Max relative errors of logits / conv_head / features; JAX also at batch 1.

  timm runs once on the whole batch (eval mode is per-sample); the batch-1
  JAX run is compared against its first row.
  """
  apply = jax.jit(module.apply)
  x = np.random.default_rng(seed).standard_normal((batch, 3, *size)).astype(np.float32)
  ref = _timm_forward(tm, x)
  errs = {}
  for b in sorted({1, batch}):
    logits, out = apply(variables, jnp.asarray(x[:b].transpose(0, 2, 3, 1)))
    for k, a, r in zip(("logits", "conv_head", "features"),
                       (logits, out["conv_head"], out["features"]), ref):
      assert a.shape == r[:b].shape, (k, b)
      errs[k] = max(errs.get(k, 0.0), max_rel_err(a, r[:b]))
  assert all(e <= TOL for e in errs.values()), errs
  return errs


def _n_params(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", sorted(E.VARIANTS))
def test_variant_matches_timm(name):
  tm = _timm(timm.create_model, model_name=name, pretrained=False)
  assert tm.pretrained_cfg["input_size"] == E.VARIANTS[name]["cfg"]["input_size"]
  module = E.create(name)
  variables = _convert(tm, module)
  assert _n_params(variables["params"]) == sum(p.numel() for p in tm.parameters())
  errs = _check_parity(tm, module, variables, E.VARIANTS[name]["cfg"]["input_size"][1:], 3)
  print(f"\n{name}: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))


@pytest.mark.parametrize("name", sorted(E.VARIANTS))
def test_cfg_matches_timm_default(name):
  cfg = timm.models.get_pretrained_cfg(name).to_dict()
  ours = E.VARIANTS[name]["cfg"]
  for k in ("num_classes", "input_size", "crop_pct", "interpolation", "mean", "std", "tag"):
    assert tuple(np.atleast_1d(ours[k])) == tuple(np.atleast_1d(cfg[k])), k


# Demo-sized configs (overrides), odd input sizes for TF 'SAME', the grouped
# depthwise path.
SMALL = [
    ("efficientnet_b0", dict(num_classes=10, channel_multiplier=0.25, depth_multiplier=0.34),
     timm_effnet._gen_efficientnet, {}, (64, 64)),
    ("tf_efficientnet_b0", dict(channel_multiplier=0.25, depth_multiplier=0.34,
                                depthwise_impl="grouped"),
     timm_effnet._gen_efficientnet, dict(bn_eps=1e-3, pad_type="same"), (67, 53)),
    ("tf_efficientnet_lite0", dict(channel_multiplier=0.5, depth_multiplier=1.2, num_classes=7),
     timm_effnet._gen_efficientnet_lite, dict(bn_eps=1e-3, pad_type="same"), (67, 67)),
]


@pytest.mark.parametrize("name,overrides,gen,gen_kw,size", SMALL)
def test_small_config_matches_timm(name, overrides, gen, gen_kw, size):
  timm_kw = {k: v for k, v in overrides.items() if k != "depthwise_impl"}
  tm = _timm(gen, variant=name, **timm_kw, **gen_kw)
  module = E.create(name, **overrides)
  variables = _convert(tm, module)
  assert _n_params(variables["params"]) == sum(p.numel() for p in tm.parameters())
  _check_parity(tm, module, variables, size, 2)


def test_two_digit_stage_and_block_indices():
  # 12 stages, one of 11 blocks: keys like blocks.10.10.* and blocks.11.0.*.
  arch = ((("ds_r1_k3_s1_e1_c8",),) + (("ir_r1_k3_s1_e2_c8_se0.25",),) * 9
          + (("ir_r11_k3_s2_e2_c16_se0.25",), ("ir_r1_k5_s2_e3_c24_nre",)))
  tm = _timm(timm_effnet.EfficientNet, block_args=timm_builder.decode_arch_def(
      [list(st) for st in arch]), stem_size=8, num_features=32, num_classes=5,
      act_layer=torch.nn.SiLU)
  module = E.EfficientNet(block_strings=arch, stem_size=8, num_features=32, num_classes=5)
  variables = _convert(tm, module)
  assert "blocks.10.10.conv_pwl.weight" in tm.state_dict() and "blocks_11_0" in variables["params"]
  _check_parity(tm, module, variables, (24, 24), 2)


@pytest.mark.parametrize("dm", [0.34, 0.5, 1.0, 1.1, 1.2, 1.4, 1.8, 2.6, 3.1])
@pytest.mark.parametrize("fix_first_last", [False, True])
def test_depth_and_width_rules_match_timm(dm, fix_first_last):
  ours = E.build_specs(E.EfficientNet(depth_multiplier=dm, fix_first_last=fix_first_last))[1]
  theirs = timm_builder.decode_arch_def(
      [list(s) for s in E.B0_BLOCKS], dm, fix_first_last=fix_first_last)
  assert [len(s) for s in ours] == [len(s) for s in theirs]
  # Multi-string stages are split from the back like timm's.
  scaled = timm_builder._scale_stage_depth(["a", "b", "c"], [1, 2, 3], dm)
  assert E._scale_depth([1, 2, 3], dm) == [scaled.count(c) for c in "abc"]
  for chs in (8, 12, 16, 24, 40, 112, 320, 1280):
    for cm in (0.25, 0.5, 1.1, 1.2, 1.4):
      assert E.round_channels(chs, cm) == timm_builder.round_channels(chs, cm)


def test_decode_block():
  opts, reps = E.decode_block("ir_r2_k5_s2_e6_c40_se0.25_nre_noskip")
  assert reps == 2 and opts["k"] == 5 and opts["s"] == 2 and opts["e"] == 6
  assert opts["c"] == 40 and opts["se"] == 0.25 and opts["act"] == "relu" and opts["noskip"]
  with pytest.raises(ValueError, match="unsupported block type"):
    E.decode_block("er_r1_k3_s1_e4_c24")


# ---------------------------------------------------------------- conversion refusals

@pytest.fixture(scope="module")
def b0_state_dict():
  return timm_state_dict_numpy(_timm(timm.create_model, model_name="efficientnet_b0"))


@pytest.mark.parametrize("edit,pattern", [
    (lambda sd: sd.pop("blocks.3.1.conv_dw.weight"),
     r"missing key in checkpoint: 'blocks\.3\.1\.conv_dw\.weight'"),
    (lambda sd: sd.__setitem__("blocks.9.0.conv_pw.weight", np.zeros((8, 8, 1, 1), np.float32)),
     r"unexpected keys in checkpoint: 'blocks\.9\.0\.conv_pw\.weight'"),
    (lambda sd: sd.__setitem__("blocks.1.0.se.conv_reduce.weight",
                               np.zeros((5, 96, 1, 1), np.float32)),
     r"shape mismatch for 'blocks\.1\.0\.se\.conv_reduce\.weight'"),
    (lambda sd: sd.__setitem__("bn2.running_var", np.ones((1000,), np.float32)),
     r"shape mismatch for 'bn2\.running_var'"),
])
def test_conversion_refuses(b0_state_dict, edit, pattern):
  sd = dict(b0_state_dict)
  edit(sd)
  with pytest.raises(ConversionError, match=pattern):
    E.from_timm(StateDictReader(sd), E.create("efficientnet_b0"))


def test_conversion_refuses_wrong_head(b0_state_dict):
  with pytest.raises(ConversionError, match=re.escape("'classifier.weight'")):
    E.from_timm(StateDictReader(b0_state_dict), E.create("efficientnet_b0", num_classes=10))


def test_create_rejects_unknown():
  with pytest.raises(ValueError, match="unknown EfficientNet option"):
    E.create("efficientnet_b0", width=2)
  with pytest.raises(ValueError, match="unknown EfficientNet"):
    E.create("efficientnet_b9")


# ---------------------------------------------------------------- depthwise impls

@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("padding", ["symmetric", "same"])
def test_depthwise_impls_agree(k, stride, padding):
  rng = np.random.default_rng(k * 10 + stride)
  for hw in ((15, 16), (16, 15)):
    x = jnp.asarray(rng.standard_normal((2, *hw, 24)), jnp.float32)
    mods = {i: E.DepthwiseConv(k, stride, padding, i) for i in ("grouped", "shifted")}
    v = mods["grouped"].init(jax.random.PRNGKey(0), x)
    ys = {i: jax.jit(m.apply)(v, x) for i, m in mods.items()}
    assert ys["grouped"].shape == ys["shifted"].shape
    assert max_rel_err(ys["shifted"], ys["grouped"]) <= 1e-5
  with pytest.raises(ValueError, match="depthwise_impl"):
    E.DepthwiseConv(k, stride, impl="fft").apply(v, x)


# ---------------------------------------------------------------- inference forms

def test_folded_b0_matches_timm():
  # The CPU inference path: BatchNorm folded (random BN statistics), matmul
  # convs, micro-batched trunk (batch 3: padded to 4 in chunks of 2).
  tm = _timm(timm.create_model, model_name="efficientnet_b0", pretrained=False)
  module = E.create("efficientnet_b0", conv_impl="dot", inference_chunk=2)
  module, variables = E.fold_batchnorm(module, _convert(tm, module))
  assert module.fold_bn and set(variables) == {"params"}
  assert "bn1" not in variables["params"] and "bias" in variables["params"]["conv_stem"]
  errs = _check_parity(tm, module, variables, (224, 224), 3)
  print("\nfolded efficientnet_b0: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))


@pytest.mark.parametrize("conv_impl", ["xla", "dot"])
@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize("chunk", [0, 1, 2])
def test_inference_forms_match_timm(conv_impl, fold, chunk):
  # TF 'SAME' padding on an odd size exercises the stem's im2col pads.
  kw = dict(channel_multiplier=0.25, depth_multiplier=0.34, num_classes=10)
  tm = _timm(timm_effnet._gen_efficientnet, variant="tf_efficientnet_b0", **kw,
             bn_eps=1e-3, pad_type="same")
  module = E.create("tf_efficientnet_b0", **kw, conv_impl=conv_impl, inference_chunk=chunk)
  variables = _convert(tm, module)
  if fold:
    module, variables = E.fold_batchnorm(module, variables)
  _check_parity(tm, module, variables, (67, 53), 3)


def test_fold_batchnorm_is_inference_only(tiny):
  module, v, x, _ = tiny
  folded, fv = E.fold_batchnorm(module, v)
  with pytest.raises(ValueError, match="inference only"):
    folded.apply(fv, x, train=True, rngs={"dropout": jax.random.PRNGKey(0)})
  with pytest.raises(ValueError, match="already"):
    E.fold_batchnorm(folded, fv)


# ---------------------------------------------------------------- taps, training

def _numpy_variables(module, size=64, seed=0):
  """Random params and BN stats without Flax's RNG init (threefry compiles slowly on CPU)."""
  rng = np.random.default_rng(seed)
  template = E.param_template(module, size)

  def fill(path, s):
    name = jax.tree_util.keystr(path)
    if len(s.shape) > 1:  # conv / dense kernels, fan-in scaled
      return rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1]))
    if name.endswith("['scale']") or name.endswith("['var']"):
      return rng.uniform(0.5, 1.5, s.shape)
    return rng.normal(0.0, 0.2, s.shape)
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32),
                      jax.tree_util.tree_map_with_path(fill, template))


@pytest.fixture(scope="module")
def tiny():
  module = E.create("efficientnet_b0", num_classes=10, channel_multiplier=0.25,
                    depth_multiplier=0.34, drop_rate=0.2, drop_path_rate=0.2)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 64, 64, 3)), jnp.float32)
  v = _numpy_variables(module)
  return module, v, x, jax.jit(module.apply)(v, x)[0]


def test_perturb_gradients(tiny):
  module, v, x, eval_logits = tiny
  c = 3
  from rcst_jax.inference.saliency import forward_with_taps

  @jax.jit
  def taps(v, x):
    grads, out = {}, {}
    for layer in ("features", "conv_head"):
      logits, out[layer], vjp = forward_with_taps(module, v, x, layer)
      grads[layer] = vjp(jnp.broadcast_to(jax.nn.one_hot(c, 10), logits.shape))
    return logits, out, grads
  logits, out, grads = taps(v, x)
  np.testing.assert_allclose(logits, eval_logits, rtol=1e-6, atol=1e-6)
  # Pooled linear head: d z_c / d A = W[:, c] / (h * w) at every position (CAM).
  feat = out["features"]
  h, w = feat.shape[1:3]
  expect = jnp.broadcast_to(v["params"]["classifier"]["kernel"][:, c] / (h * w), feat.shape)
  assert max_rel_err(grads["features"], expect) <= 1e-6

  # conv_head tap against the head written out by hand (bn2 -> swish -> pool -> fc).
  def head(a):
    p, s = v["params"], v["batch_stats"]
    y = (a - s["bn2"]["mean"]) / jnp.sqrt(s["bn2"]["var"] + 1e-5)
    y = jax.nn.silu(y * p["bn2"]["scale"] + p["bn2"]["bias"]).mean(axis=(1, 2))
    return (y @ p["classifier"]["kernel"] + p["classifier"]["bias"])[:, c].sum()
  expect = jax.grad(head)(out["conv_head"])
  assert max_rel_err(grads["conv_head"] / jnp.abs(expect).max(),
                     expect / jnp.abs(expect).max()) <= 1e-5


def test_train_mode_updates_batch_stats_and_inference_is_deterministic(tiny):
  module, v, x, eval_logits = tiny
  (logits, _), new = jax.jit(lambda v, x: module.apply(
      v, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.PRNGKey(2)}))(v, x)
  assert logits.shape == (2, 10) and np.isfinite(logits).all()
  assert jax.tree.structure(new["batch_stats"]) == jax.tree.structure(v["batch_stats"])
  old, upd = v["batch_stats"]["bn1"]["mean"], new["batch_stats"]["bn1"]["mean"]
  assert not np.allclose(old, upd)
  # Dropout and stochastic depth are off at inference.
  plain = E.create("efficientnet_b0", num_classes=10, channel_multiplier=0.25,
                   depth_multiplier=0.34)
  np.testing.assert_array_equal(eval_logits, jax.jit(plain.apply)(v, x)[0])


def test_train_mode_matches_timm_batch_stats():
  kw = dict(channel_multiplier=0.25, depth_multiplier=0.34, num_classes=10)
  tm = _timm(timm_effnet._gen_efficientnet, variant="efficientnet_b0", **kw).train()
  module = E.create("efficientnet_b0", **kw, drop_rate=0.0)
  v = _convert(tm, module)
  x = np.random.default_rng(5).standard_normal((4, 3, 64, 64)).astype(np.float32)
  with torch.no_grad():
    ref = tm(torch.from_numpy(x)).numpy()
  (logits, _), new = jax.jit(lambda v, x: module.apply(
      v, x, train=True, mutable=["batch_stats"]))(v, jnp.asarray(x.transpose(0, 2, 3, 1)))
  assert max_rel_err(logits, ref) <= TOL
  # Same momentum convention: torch 0.1 == flax 0.9 (means; torch's var is unbiased).
  assert max_rel_err(new["batch_stats"]["bn1"]["mean"], tm.bn1.running_mean.numpy()) <= 1e-5


def test_overrides_run_in_bfloat16():
  module = E.create("efficientnet_b0", num_classes=10, channel_multiplier=0.25,
                    depth_multiplier=0.34, dtype=jnp.bfloat16, depthwise_impl="grouped")
  x = jnp.ones((1, 32, 32, 3))
  v = _numpy_variables(module, 32)
  logits, out = jax.jit(module.apply)(v, x)
  assert logits.shape == (1, 10) and logits.dtype == jnp.bfloat16
  assert out["features"].shape == (1, 1, 1, 320) and out["pre_logits"].shape == (1, 320)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(v))
