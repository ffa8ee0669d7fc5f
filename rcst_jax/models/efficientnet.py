"""EfficientNet (B0-B3, TF ports, Lite0) in Flax, numerically equal to timm.

Architectures are data: timm's block strings (``'ir_r2_k3_s2_e6_c24_se0.25'``)
are decoded and scaled with timm's channel/depth rules, so one module covers
every variant and the small demo configs (``create('efficientnet_b0',
channel_multiplier=0.25, depth_multiplier=0.34, num_classes=10)``).

Layout is NHWC. Parameter names follow timm's module names (``conv_stem``,
``bn1``, ``blocks_{stage}_{block}/conv_dw``, ...) so ``from_timm`` is a pure
rename-and-transpose.

Grad-CAM taps. ``out['conv_head']`` (1x1 head conv, before ``bn2``) and
``out['features']`` (after ``bn2`` + activation, the map that is pooled) pass
through ``self.perturb``. Adding zeros there changes nothing, but the
gradient with respect to those zeros is dL/dA, so ONE forward+backward pass
gives the activations and their gradients::

  logits, fmap, vjp = rcst_jax.saliency.forward_with_taps(model, variables, x, 'features')
  grads = vjp(jax.nn.one_hot(c, num_classes))   # d logits[:, c] / d out['features']

By hand: the taps live in the 'perturbations' collection under the names in
``TAPS``; take ``jax.grad`` of a function of ``{**variables, 'perturbations':
zeros}`` with respect to the zeros (shapes from ``apply(...,
mutable=['perturbations'])`` under ``jax.eval_shape``).

Without a 'perturbations' collection (plain ``apply``) the taps are no-ops.

CPU inference forms, each behind an 'auto' switch that keeps the standard
form on TPU/GPU: shifted-slice depthwise convs (``depthwise_impl``), 1x1 convs
and the stem as matmuls (``conv_impl``), the trunk in micro-batches of 2
images up to the last downsampling (``inference_chunk``). ``fold_batchnorm``
(once, at load; see ``checkpoints.Model.inference``) folds every BatchNorm
into its conv.
Numbers: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rcst_jax.core.spmd import map_chunks, on_cpu
from rcst_jax.data.preprocess import IMAGENET_MEAN, IMAGENET_STD
from rcst_jax.models import variants
from rcst_jax.models.state_dict import StateDictReader, check_against_template

# timm's _gen_efficientnet / _gen_efficientnet_lite stage definitions.
B0_BLOCKS = (
    ("ds_r1_k3_s1_e1_c16_se0.25",),
    ("ir_r2_k3_s2_e6_c24_se0.25",),
    ("ir_r2_k5_s2_e6_c40_se0.25",),
    ("ir_r3_k3_s2_e6_c80_se0.25",),
    ("ir_r3_k5_s1_e6_c112_se0.25",),
    ("ir_r4_k5_s2_e6_c192_se0.25",),
    ("ir_r1_k3_s1_e6_c320_se0.25",),
)
LITE_BLOCKS = tuple(tuple(s.replace("_se0.25", "") for s in st) for st in B0_BLOCKS)

ACTIVATIONS = {"swish": nn.silu, "relu": nn.relu, "relu6": nn.relu6,
               "hard_swish": nn.hard_swish}
_ACT_CODES = {"re": "relu", "r6": "relu6", "hs": "hard_swish", "sw": "swish"}

# out[key] -> name in the 'perturbations' collection (must differ from the
# 'conv_head' submodule's name, since Flax scopes share one namespace).
TAPS = {"conv_head": "conv_head_tap", "features": "features_tap"}

INCEPTION_MEAN, INCEPTION_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def _cfg(size, crop_pct, tag, mean=IMAGENET_MEAN, std=IMAGENET_STD):
  # Default pretrained cfg of timm 1.0 for the name (tag pinned for reference).
  return {"num_classes": 1000, "input_size": (3, size, size), "crop_pct": crop_pct,
          "interpolation": "bicubic", "mean": mean, "std": std, "tag": tag}


def _effnet(cm, dm, drop):
  return {"block_strings": B0_BLOCKS, "channel_multiplier": cm,
          "depth_multiplier": dm, "drop_rate": drop}


# TF ports: TF 'SAME' padding and TF's BatchNorm epsilon.
_TF = {"padding": "same", "bn_eps": 1e-3}
# Lite: ReLU6, no SE, stem/head widths and first/last stage depths not scaled.
_LITE = {"block_strings": LITE_BLOCKS, "act": "relu6", "fix_stem": True,
         "fix_head": True, "fix_first_last": True}

# drop_rate is the paper's training dropout; it only acts with train=True.
VARIANTS = {
    "efficientnet_b0": {"arch": _effnet(1.0, 1.0, 0.2), "cfg": _cfg(224, 0.875, "ra_in1k")},
    "efficientnet_b1": {"arch": _effnet(1.0, 1.1, 0.2),
                        "cfg": _cfg(240, 0.9, "ra4_e3600_r240_in1k",
                                    INCEPTION_MEAN, INCEPTION_STD)},
    "efficientnet_b2": {"arch": _effnet(1.1, 1.2, 0.3), "cfg": _cfg(256, 0.875, "ra_in1k")},
    "efficientnet_b3": {"arch": _effnet(1.2, 1.4, 0.3), "cfg": _cfg(288, 0.875, "ra2_in1k")},
    "tf_efficientnet_b0": {"arch": {**_effnet(1.0, 1.0, 0.2), **_TF},
                           "cfg": _cfg(224, 0.875, "ns_jft_in1k")},
    "tf_efficientnet_b1": {"arch": {**_effnet(1.0, 1.1, 0.2), **_TF},
                           "cfg": _cfg(240, 0.882, "ns_jft_in1k")},
    "tf_efficientnet_b2": {"arch": {**_effnet(1.1, 1.2, 0.3), **_TF},
                           "cfg": _cfg(260, 0.89, "ns_jft_in1k")},
    "tf_efficientnet_b3": {"arch": {**_effnet(1.2, 1.4, 0.3), **_TF},
                           "cfg": _cfg(300, 0.904, "ns_jft_in1k")},
    "tf_efficientnet_lite0": {"arch": {**_LITE, **_TF, "drop_rate": 0.2},
                              "cfg": _cfg(224, 0.875, "in1k", INCEPTION_MEAN, INCEPTION_STD)},
}


# ---------------------------------------------------------------- arch rules

def make_divisible(v, divisor=8, min_value=None, round_limit=0.9):
  """Nearest multiple of divisor, never more than 10% below v (timm's rule)."""
  min_value = min_value or divisor
  new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
  return new_v + divisor if new_v < round_limit * v else new_v


def round_channels(chs, multiplier=1.0, divisor=8):
  return make_divisible(chs * multiplier, divisor) if multiplier else chs


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  kind: str  # 'ds' (depthwise-separable) or 'ir' (inverted residual)
  in_chs: int
  out_chs: int
  mid_chs: int
  kernel: int
  stride: int
  se_chs: int  # 0: no squeeze-excite
  act: str | None  # None: the model's activation
  skip: bool
  drop_path: float


def decode_block(block_str: str) -> tuple[dict, int]:
  """'ir_r2_k3_s2_e6_c24_se0.25' -> (options, repeats)."""
  kind, *ops = block_str.split("_")
  if kind not in ("ds", "dsa", "ir"):
    raise ValueError(f"unsupported block type {kind!r} in {block_str!r}")
  opts = {"kind": kind, "act": None, "noskip": kind == "dsa", "se": 0.0, "e": 1.0}
  for op in ops:
    if op in ("noskip", "skip"):
      opts["noskip"] = op == "noskip"
    elif op.startswith("n") and op[1:] in _ACT_CODES:
      opts["act"] = _ACT_CODES[op[1:]]
    else:
      m = re.fullmatch(r"([a-z]+)(\d.*)", op)
      if not m:
        raise ValueError(f"cannot parse {op!r} in {block_str!r}")
      opts[m.group(1)] = float(m.group(2))
  if kind != "ir":
    opts["e"] = 1.0  # timm ignores 'e' on ds blocks (no expansion conv)
  return opts, int(opts["r"])


def _scale_depth(repeats: Sequence[int], multiplier: float) -> list[int]:
  """timm's 'ceil' depth scaling, distributed over a stage's block strings from the back."""
  total = sum(repeats)
  total_scaled = int(math.ceil(total * multiplier))
  out = []
  for r in reversed(repeats):
    rs = max(1, round(r / total * total_scaled))
    out.append(rs)
    total -= r
    total_scaled -= rs
  return out[::-1]


def build_specs(m: "EfficientNet") -> tuple[int, list[list[BlockSpec]], int]:
  """(stem channels, stages of BlockSpecs, head channels) for a module's arch fields."""
  rc = lambda c: round_channels(c, m.channel_multiplier)
  stem = m.stem_size if m.fix_stem else rc(m.stem_size)
  decoded = []
  for i, stage in enumerate(m.block_strings):
    parsed = [decode_block(s) for s in stage]
    fixed = m.fix_first_last and i in (0, len(m.block_strings) - 1)
    reps = _scale_depth([r for _, r in parsed], 1.0 if fixed else m.depth_multiplier)
    decoded.append([o for (o, _), r in zip(parsed, reps) for _ in range(r)])
  total = sum(len(s) for s in decoded)
  stages, in_chs, idx = [], stem, 0
  for stage in decoded:
    specs = []
    for j, o in enumerate(stage):
      stride = int(o["s"]) if j == 0 else 1
      out_chs = rc(int(o["c"]))
      mid = make_divisible(in_chs * o["e"]) if o["kind"] == "ir" else in_chs
      # SE width comes from the block *input* width: timm divides the ratio by e.
      se = round(mid * (o["se"] / o["e"])) if o["se"] else 0
      skip = stride == 1 and in_chs == out_chs and not o["noskip"]
      specs.append(BlockSpec(o["kind"], in_chs, out_chs, mid, int(o["k"]), stride, se,
                             o["act"], skip, m.drop_path_rate * idx / total))
      in_chs, idx = out_chs, idx + 1
    stages.append(specs)
  head = m.num_features if m.fix_head else rc(m.num_features)
  return stem, stages, head


def conv_padding(size: int, k: int, s: int, mode: str) -> tuple[int, int]:
  """Padding of one spatial dim: timm's symmetric rule, or TF 'SAME' from the actual size."""
  if mode == "same":
    pad = max((math.ceil(size / s) - 1) * s + k - size, 0)
    return pad // 2, pad - pad // 2  # the extra pixel goes after, as in TF
  p = ((s - 1) + (k - 1)) // 2
  return p, p


# ---------------------------------------------------------------- layers

# timm's TF-style init: conv normal(0, sqrt(2 / fan_out)), linear uniform(+-1/sqrt(out)).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
dw_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")  # fan_out / groups = k*k
dense_init = nn.initializers.variance_scaling(1.0 / 3, "fan_out", "uniform")


class Conv(nn.Module):
  """Dense kxk conv with nn.Conv's parameters ('kernel' HWIO, optional 'bias').

  impl 'xla' is lax.conv_general_dilated. 'dot' writes the same sum as one
  matmul: a 1x1 conv is [B*H*W, Cin] @ [Cin, Cout], a kxk conv (the stem)
  gathers its k*k strided taps along channels first (im2col). XLA on CPU runs
  the matmul form faster than its convolution (small channel counts above
  all). 'auto' picks 'dot' on CPU only.
  """
  features: int
  kernel_size: int = 1
  stride: int = 1
  padding: Sequence[tuple[int, int]] = ((0, 0), (0, 0))
  use_bias: bool = False
  impl: str = "auto"
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    k, s = self.kernel_size, self.stride
    kernel = self.param("kernel", conv_init, (k, k, x.shape[-1], self.features), jnp.float32)
    bias = (self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
            if self.use_bias else None)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    impl = self.impl
    if impl == "auto":
      impl = "dot" if on_cpu() else "xla"
    if impl == "xla":
      y = jax.lax.conv_general_dilated(x, kernel, (s, s), tuple(self.padding),
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    elif impl == "dot":
      if k > 1 or s > 1 or any(p != (0, 0) for p in self.padding):
        x = _im2col(x, k, s, self.padding)
      y = jnp.dot(x, kernel.reshape(-1, self.features))
    else:
      raise ValueError(f"conv_impl must be auto, xla or dot, got {impl!r}")
    return y if bias is None else y + bias


def _im2col(x, k, s, pads):
  """[B, H, W, C] -> [B, Ho, Wo, k*k*C], taps ordered (row, col, channel) like HWIO."""
  xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
  ho = (xp.shape[1] - k) // s + 1
  wo = (xp.shape[2] - k) // s + 1
  taps = [jax.lax.slice(xp, (0, i, j, 0),
                        (xp.shape[0], i + s * (ho - 1) + 1, j + s * (wo - 1) + 1, xp.shape[3]),
                        (1, s, s, 1))
          for i in range(k) for j in range(k)]
  return jnp.concatenate(taps, axis=-1)


class DepthwiseConv(nn.Module):
  """Per-channel kxk conv; 'kernel' is (k, k, 1, C) whichever way it is computed.

  'grouped' uses a feature-grouped convolution; 'shifted' sums k*k strided
  slices of the padded input times the per-channel tap weight, which XLA on
  CPU runs several times faster. 'auto' picks 'shifted' on CPU only.
  """
  kernel_size: int
  stride: int = 1
  padding: str = "symmetric"
  impl: str = "auto"
  dtype: Any = None
  use_bias: bool = False  # True for BatchNorm folded into the kernel

  @nn.compact
  def __call__(self, x):
    y = self._conv(x)
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],), jnp.float32)
      y = y + jnp.asarray(bias, y.dtype)
    return y

  def _conv(self, x):
    k, s, c = self.kernel_size, self.stride, x.shape[-1]
    kernel = self.param("kernel", dw_init, (k, k, 1, c), jnp.float32)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    pads = [conv_padding(x.shape[d], k, s, self.padding) for d in (1, 2)]
    impl = self.impl
    if impl == "auto":
      impl = "shifted" if on_cpu() else "grouped"
    if impl == "grouped":
      return jax.lax.conv_general_dilated(
          x, kernel, (s, s), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"),
          feature_group_count=c)
    if impl != "shifted":
      raise ValueError(f"depthwise_impl must be auto, grouped or shifted, got {impl!r}")
    xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    ho = (xp.shape[1] - k) // s + 1
    wo = (xp.shape[2] - k) // s + 1
    out = None
    for i in range(k):
      for j in range(k):
        tap = jax.lax.slice(xp, (0, i, j, 0),
                            (xp.shape[0], i + s * (ho - 1) + 1, j + s * (wo - 1) + 1, c),
                            (1, s, s, 1))
        term = tap * kernel[i, j, 0]
        out = term if out is None else out + term
    return out


class Affine(nn.Module):
  """x * scale + bias per channel: a BatchNorm at inference, folded (fold_batchnorm)."""
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    x, scale, bias = nn.dtypes.promote_dtype(x, scale, bias, dtype=self.dtype)
    return x * scale + bias


class SqueezeExcite(nn.Module):
  se_chs: int
  act: Callable
  dtype: Any = None
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x):
    conv = lambda f, name: Conv(f, use_bias=True, impl=self.conv_impl, dtype=self.dtype,
                                name=name)
    s = jnp.mean(x, axis=(1, 2), keepdims=True)
    s = self.act(conv(self.se_chs, "conv_reduce")(s))
    return x * nn.sigmoid(conv(x.shape[-1], "conv_expand")(s))


class Block(nn.Module):
  """timm's DepthwiseSeparableConv ('ds') or InvertedResidual ('ir')."""
  spec: BlockSpec
  act: Callable
  conv: Callable  # (features, k, stride, name) -> x -> y, bias-free
  norm: Callable  # name -> BatchNorm
  depthwise: Callable  # (k, stride, name) -> DepthwiseConv
  dtype: Any = None
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x, train: bool = False):
    sp = self.spec
    shortcut = x
    if sp.kind == "ir":  # pointwise expansion, then dw / se / linear projection
      x = self.act(self.norm(name="bn1")(self.conv(sp.mid_chs, 1, name="conv_pw")(x)))
      x = self.depthwise(sp.kernel, sp.stride, name="conv_dw")(x)
      x = self.act(self.norm(name="bn2")(x))
      names = ("conv_pwl", "bn3")
    else:
      x = self.depthwise(sp.kernel, sp.stride, name="conv_dw")(x)
      x = self.act(self.norm(name="bn1")(x))
      names = ("conv_pw", "bn2")
    if sp.se_chs:
      x = SqueezeExcite(sp.se_chs, self.act, self.dtype, self.conv_impl, name="se")(x)
    x = self.norm(name=names[1])(self.conv(sp.out_chs, 1, name=names[0])(x))
    if sp.skip:
      if train and sp.drop_path > 0:  # stochastic depth: drop whole residual branches
        keep = 1.0 - sp.drop_path
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0], 1, 1, 1))
        x = jnp.where(mask, x / keep, 0)
      x = x + shortcut
    return x


class EfficientNet(nn.Module):
  """EfficientNet; ``__call__(x NHWC normalised, train)`` -> ``(logits, out)``.

  ``out``: 'conv_head', 'features', 'pre_logits', 'logits'. Training::

    (logits, out), upd = model.apply(variables, x, train=True,
                                     mutable=['batch_stats'],
                                     rngs={'dropout': key})

  train=True normalises with batch statistics and updates the running ones;
  dropout (``drop_rate``) and stochastic depth (``drop_path_rate``) act only
  then. ``model.init`` compiles one threefry kernel per parameter, which is
  slow on CPU (tens of seconds); load converted weights where possible.
  """
  block_strings: tuple = B0_BLOCKS
  channel_multiplier: float = 1.0
  depth_multiplier: float = 1.0
  stem_size: int = 32
  num_features: int = 1280
  fix_stem: bool = False
  fix_head: bool = False
  fix_first_last: bool = False
  act: str = "swish"
  padding: str = "symmetric"  # 'symmetric' (timm/PyTorch) or 'same' (TF ports)
  bn_eps: float = 1e-5
  bn_momentum: float = 0.9  # Flax convention; = PyTorch momentum 0.1
  num_classes: int = 1000
  drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  depthwise_impl: str = "auto"
  conv_impl: str = "auto"  # 'xla' | 'dot' (matmul forms); 'auto': 'dot' on CPU
  fold_bn: bool = False  # variables from fold_batchnorm (inference only)
  # Inference micro-batch of the stages above the last resolution: -1 auto
  # (2 images on CPU, the whole batch elsewhere), 0 the whole batch, n > 0
  # chunks of n images.
  inference_chunk: int = -1
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.fold_bn and train:
      raise ValueError("fold_bn=True is inference only; train the unfolded model")
    chunk = self._chunk(x.shape[0], train)
    x = self._chunked_trunk(x, chunk) if chunk else self.trunk(x, train)
    act = ACTIVATIONS[self.act]
    out = {}
    out["conv_head"] = x = self.perturb(TAPS["conv_head"], x)
    bn2 = Affine(dtype=self.dtype, name="bn2") if self.fold_bn else self._norm(train)("bn2")
    x = act(bn2(x))
    out["features"] = x = self.perturb(TAPS["features"], x)
    out["pre_logits"] = x = jnp.mean(x, axis=(1, 2))
    if train:  # identity at inference; left out there so exporters need not differentiate it
      x = nn.Dropout(self.drop_rate, deterministic=False)(x)
    if self.num_classes:
      x = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=dense_init,
                   name="classifier")(x)
    out["logits"] = x
    return x, out

  def _norm(self, train):
    if self.fold_bn:  # each BatchNorm already sits in the conv before it (bias)
      return lambda name: (lambda x: x)
    return lambda name: nn.BatchNorm(
        use_running_average=not train, momentum=self.bn_momentum, epsilon=self.bn_eps,
        dtype=self.dtype, name=name)

  def trunk(self, x, train: bool = False, start: int = 0, stop: int | None = None):
    """Stem, blocks and conv_head: everything before the Grad-CAM taps.
    ``start``/``stop`` run only stages [start, stop) (the stem with the first,
    conv_head with the last), for micro-batching the high-resolution part."""
    stem, stages, head = build_specs(self)
    stop = len(stages) if stop is None else stop
    act, norm = ACTIVATIONS[self.act], self._norm(train)

    def conv(features, k, s=1, name=None, use_bias=self.fold_bn):
      # Pads depend on the input size for TF 'SAME', so resolve them per call;
      # the Conv is created in whichever module calls this.
      def apply(x):
        pads = tuple(conv_padding(x.shape[d], k, s, self.padding) for d in (1, 2))
        return Conv(features, k, s, pads, use_bias, self.conv_impl, self.dtype, name=name)(x)
      return apply

    dw = lambda k, s, name: DepthwiseConv(k, s, self.padding, self.depthwise_impl,
                                          self.dtype, self.fold_bn, name=name)
    if start == 0:
      x = act(norm("bn1")(conv(stem, 3, 2, "conv_stem")(x)))
    for i, stage in enumerate(stages):
      if not start <= i < stop:
        continue
      for j, spec in enumerate(stage):
        block_act = ACTIVATIONS[spec.act] if spec.act else act
        x = Block(spec, block_act, conv, norm, dw, self.dtype, self.conv_impl,
                  name=f"blocks_{i}_{j}")(x, train)
    # The conv_head tap is the raw conv output, so bn2 is never folded into
    # it: folded, it is a per-channel affine (fused with the activation).
    if stop < len(stages):
      return x
    return conv(head, 1, name="conv_head", use_bias=False)(x)

  def _chunk(self, batch: int, train: bool) -> int:
    n = self.inference_chunk
    if n < 0:
      n = 2 if on_cpu() else 0
    if train or self.is_initializing() or not 0 < n < batch:
      return 0
    return n

  def _chunked_trunk(self, x, n):
    """The trunk's high-resolution stages over micro-batches of n images
    (lax.map), batch padded to a multiple of n; the rest on the whole batch.
    On CPU the whole-batch activations of B0 at 224 px reach ~10 MB per
    image; per micro-batch they stay in cache and in reused heap memory
    instead of a fresh, page-faulted temp buffer per call. Under jit
    with the batch sharded over devices, XLA all-gathers the batch in front
    of this loop and every device runs all of it: run the model per device
    instead (rcst_jax.core.spmd.per_device, as inference.edge.edge_step does)."""
    fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(EfficientNet)
              if f.init and f.name not in ("parent", "name")}
    # Only the stages above the last resolution: from the last downsampling
    # on (7x7 at 224 px) activations are small and micro-batches would turn
    # the 1x1 convs into ~98-row matmuls (B0 batch 16: 210 -> 230 img/s).
    stages = build_specs(self)[1]
    split = max((i for i, stage in enumerate(stages) if stage[0].stride > 1),
                default=len(stages))
    inner = _Trunk(**{**fields, "inference_chunk": 0}, stop=split)
    variables = {k: v for k, v in self.variables.items() if k in ("params", "batch_stats")}
    ys = map_chunks(lambda xc: inner.apply(variables, xc), (x,), n)
    return self.trunk(ys, start=split)


class _Trunk(EfficientNet):
  """The trunk up to stage ``stop`` (None: through conv_head), parameter names
  unchanged: the micro-batched part of EfficientNet._chunked_trunk."""
  stop: int | None = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    return self.trunk(x, train, stop=self.stop)


# ---------------------------------------------------------------- public API

def create(name: str, **overrides) -> EfficientNet:
  """Module for a timm name; overrides set any EfficientNet field (num_classes, ...)."""
  return variants.build(EfficientNet, VARIANTS, "EfficientNet", name, {}, overrides)


def fold_batchnorm(module: EfficientNet, variables) -> tuple[EfficientNet, dict]:
  """The inference form: every BatchNorm folded into the conv before it.

  conv(x) * s + (beta - mean * s), s = gamma / sqrt(var + eps), is one conv
  with kernel * s (per output channel) and a bias. Returns ``(module with
  fold_bn=True, {'params': ...})``; call it once at load, not per step.
  bn2 stays a separate per-channel affine so ``out['conv_head']`` (the
  Grad-CAM tap before it) is still the raw conv output.
  """
  if module.fold_bn:
    raise ValueError("module already expects folded variables")
  params, stats = variables["params"], variables["batch_stats"]
  f64 = lambda a: np.asarray(a, np.float64)

  def scale_shift(bn, st):
    s = f64(bn["scale"]) / np.sqrt(f64(st["var"]) + module.bn_eps)
    return s, f64(bn["bias"]) - f64(st["mean"]) * s

  def fold(conv, bn, st):  # HWIO and depthwise (k, k, 1, C): output channels last
    s, t = scale_shift(bn, st)
    return {"kernel": f64(conv["kernel"]) * s, "bias": t}

  out = {}
  for name, p in params.items():
    if name.startswith("blocks_"):
      st = stats[name]
      pairs = ((("conv_pw", "bn1"), ("conv_dw", "bn2"), ("conv_pwl", "bn3"))
               if "conv_pwl" in p else (("conv_dw", "bn1"), ("conv_pw", "bn2")))
      block = {k: v for k, v in p.items() if not k.startswith("bn") and not k.startswith("conv_")}
      for c, b in pairs:
        block[c] = fold(p[c], p[b], st[b])
      out[name] = block
    elif name == "conv_stem":
      out[name] = fold(p, params["bn1"], stats["bn1"])
    elif name == "bn2":
      s, t = scale_shift(p, stats["bn2"])
      out[name] = {"scale": s, "bias": t}
    elif name != "bn1":
      out[name] = p
  folded = module.clone(fold_bn=True)
  variables = jax.tree.map(lambda a: np.asarray(a, np.float32), {"params": out})
  check_against_template(variables, param_template(folded))
  # On the device once (numpy leaves would be copied in on every call), with
  # the sharding of the input variables (e.g. replicated over a mesh).
  like = params["conv_stem"]["kernel"]
  return folded, jax.device_put(variables, getattr(like, "sharding", None))


def param_template(module: EfficientNet, image_size: int = 64):
  """Shapes of {'params', 'batch_stats'} (no perturbations), without computing anything."""
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  return jax.eval_shape(
      lambda x: module.init(jax.random.PRNGKey(0), x, mutable=["params", "batch_stats"]), x)


def from_timm(reader: StateDictReader, module: EfficientNet) -> dict:
  """timm EfficientNet state dict -> {'params', 'batch_stats'} for ``module``.

  Every tensor is taken with the shape timm must have for this architecture;
  leftovers, missing keys and wrong shapes raise ConversionError.
  """
  params, stats = {}, {}

  def conv(key, cin, cout, k, bias=False):  # OIHW -> HWIO
    p = {"kernel": reader.take(f"{key}.weight", (cout, cin, k, k)).transpose(2, 3, 1, 0)}
    if bias:
      p["bias"] = reader.take(f"{key}.bias", (cout,))
    return p

  def dwconv(key, c, k):  # (C, 1, kh, kw) -> (kh, kw, 1, C), the same transpose
    return {"kernel": reader.take(f"{key}.weight", (c, 1, k, k)).transpose(2, 3, 1, 0)}

  def bn(key, c):
    t = lambda n: reader.take(f"{key}.{n}", (c,))
    return ({"scale": t("weight"), "bias": t("bias")},
            {"mean": t("running_mean"), "var": t("running_var")})

  def put(tree_p, tree_s, name, key, c):
    tree_p[name], tree_s[name] = bn(key, c)

  stem, stages, head = build_specs(module)
  params["conv_stem"] = conv("conv_stem", 3, stem, 3)
  put(params, stats, "bn1", "bn1", stem)
  for i, stage in enumerate(stages):
    for j, sp in enumerate(stage):
      key, p, s = f"blocks.{i}.{j}", {}, {}
      if sp.kind == "ir":
        p["conv_pw"] = conv(f"{key}.conv_pw", sp.in_chs, sp.mid_chs, 1)
        put(p, s, "bn1", f"{key}.bn1", sp.mid_chs)
        p["conv_dw"] = dwconv(f"{key}.conv_dw", sp.mid_chs, sp.kernel)
        put(p, s, "bn2", f"{key}.bn2", sp.mid_chs)
        proj, proj_bn = "conv_pwl", "bn3"
      else:
        p["conv_dw"] = dwconv(f"{key}.conv_dw", sp.in_chs, sp.kernel)
        put(p, s, "bn1", f"{key}.bn1", sp.in_chs)
        proj, proj_bn = "conv_pw", "bn2"
      if sp.se_chs:
        p["se"] = {"conv_reduce": conv(f"{key}.se.conv_reduce", sp.mid_chs, sp.se_chs, 1, True),
                   "conv_expand": conv(f"{key}.se.conv_expand", sp.se_chs, sp.mid_chs, 1, True)}
      p[proj] = conv(f"{key}.{proj}", sp.mid_chs, sp.out_chs, 1)
      put(p, s, proj_bn, f"{key}.{proj_bn}", sp.out_chs)
      params[f"blocks_{i}_{j}"], stats[f"blocks_{i}_{j}"] = p, s
  params["conv_head"] = conv("conv_head", stages[-1][-1].out_chs, head, 1)
  put(params, stats, "bn2", "bn2", head)
  if module.num_classes:
    params["classifier"] = {
        "kernel": reader.take("classifier.weight", (module.num_classes, head)).T,
        "bias": reader.take("classifier.bias", (module.num_classes,))}
  reader.finish()
  variables = {"params": params, "batch_stats": stats}
  check_against_template(variables, param_template(module))
  return jax.tree.map(np.ascontiguousarray, variables)
