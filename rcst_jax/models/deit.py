"""DeiT server ViT, parameter-compatible with timm's ``deit_*_patch16_224``.

One module, three entry points on the same parameters:
  ``__call__(x)``                  normalised NHWC image -> (logits, out)
  ``tokens(patches, idx, mask)``   only the transmitted pixel patches and their
                                   grid indices -> (logits, out)
  ``out["cls_attn"]``              CLS attention over the patch tokens, the
                                   score of the Im et al. attention baselines

Layout follows timm/DeiT, not big_vision: ``pos_embed`` has rows for the
prefix tokens (CLS, and DIST for distilled models); the prefix is
concatenated first and pos_embed added after.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rcst_jax.core.spmd import map_chunks, on_cpu
from rcst_jax.data.preprocess import IMAGENET_MEAN, IMAGENET_STD
from rcst_jax.models import variants
from rcst_jax.models.state_dict import StateDictReader, check_against_template

# Masked attention logits. Finite so a row whose keys are all masked stays
# NaN-free; exp(-1e9 - max) is exactly 0 in float32.
_MASK_VALUE = -1e9

# inference_chunk=-1 on CPU: when the whole batch's MLP activations would
# exceed glibc's largest mmap threshold (32 MiB; larger blocks get a fresh,
# page-faulted mmap on every call), micro-batches of about this many tokens
# (max(1, this // N) images of N tokens each).
_CPU_CHUNK_TOKENS = 400
_CPU_CHUNK_ABOVE_BYTES = 32 << 20


def gelu(x):
  """Exact (erf) GELU in torch's form, x/2 (1 + erf(x/sqrt 2)). jax.nn.gelu's
  exact form goes through erfc and is 2.6x slower on XLA:CPU (0.37 vs 0.14 ms
  on 2 x 197 x 3072)."""
  return x * 0.5 * (1.0 + jax.lax.erf(x * np.float32(0.5 ** 0.5)).astype(x.dtype))


class Mlp(nn.Module):
  hidden_dim: int
  drop_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train=False):
    c = x.shape[-1]
    x = nn.Dense(self.hidden_dim, dtype=self.dtype, name="fc1")(x)
    x = gelu(x)  # timm uses exact GELU; flax defaults to tanh
    x = nn.Dropout(self.drop_rate)(x, deterministic=not train)
    x = nn.Dense(c, dtype=self.dtype, name="fc2")(x)
    return nn.Dropout(self.drop_rate)(x, deterministic=not train)


class Attention(nn.Module):
  """Multi-head self-attention; also returns the head-mean CLS attention row."""
  num_heads: int
  drop_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, key_valid=None, train=False):
    b, n, c = x.shape
    h = self.num_heads
    # timm's qkv rows are [q | k | v], each heads * head_dim wide.
    # Heads to the front once ([3, b, h, n, d]) so both attention matmuls are
    # plain batched matmuls: 1.5 vs 2.3 ms on XLA:CPU at b=2, n=197.
    qkv = nn.Dense(3 * c, dtype=self.dtype, name="qkv")(x).reshape(b, n, 3, h, c // h)
    q, k, v = qkv.transpose(2, 0, 3, 1, 4)
    logits = jnp.einsum("bhqd,bhkd->bhqk", q * (c // h) ** -0.5, k)
    logits = logits.astype(jnp.float32)  # softmax in fp32 even under bf16
    if key_valid is not None:
      logits = jnp.where(key_valid[:, None, None, :], logits, _MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1)
    y = jnp.einsum("bhqk,bhkd->bhqd", probs.astype(self.dtype), v)
    y = y.transpose(0, 2, 1, 3).reshape(b, n, c)
    y = nn.Dense(c, dtype=self.dtype, name="proj")(y)
    y = nn.Dropout(self.drop_rate)(y, deterministic=not train)
    return y, probs[:, :, 0, :].mean(axis=1)


class Block(nn.Module):
  num_heads: int
  mlp_ratio: float = 4.0
  drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, key_valid=None, train=False):
    # Stochastic depth: drop the whole residual branch per sample.
    drop_path = nn.Dropout(self.drop_path_rate, broadcast_dims=(1, 2))
    ln = lambda name: nn.LayerNorm(1e-6, dtype=self.dtype, use_fast_variance=False, name=name)
    y, cls_attn = Attention(self.num_heads, self.drop_rate, self.dtype, name="attn")(
        ln("norm1")(x), key_valid, train)
    x = x + drop_path(y, deterministic=not train)
    y = Mlp(int(x.shape[-1] * self.mlp_ratio), self.drop_rate, self.dtype, name="mlp")(
        ln("norm2")(x), train)
    return x + drop_path(y, deterministic=not train), cls_attn


class VisionTransformer(nn.Module):
  """DeiT / ViT with class token (and distillation token when ``distilled``).

  Dropout follows timm's names: ``drop_rate`` before the head(s),
  ``proj_drop_rate`` after attention projection and in the MLP,
  ``drop_path_rate`` stochastic depth rising linearly to the last block.
  """
  num_classes: int = 1000
  img_size: int = 224
  patch_size: int = 16
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  distilled: bool = False
  drop_rate: float = 0.0
  proj_drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  attn_layers: str = "last"  # 'last' (Im et al.) or 'all' (mean over blocks)
  mean: Sequence[float] = IMAGENET_MEAN
  std: Sequence[float] = IMAGENET_STD
  dtype: Any = jnp.float32
  # Inference micro-batch for the blocks (lax.map): -1 auto (on CPU, chunks
  # of about _CPU_CHUNK_TOKENS tokens once the whole batch's MLP activations
  # pass _CPU_CHUNK_ABOVE_BYTES; the whole batch elsewhere), 0 the whole
  # batch, n > 0 chunks of n images.
  inference_chunk: int = -1

  @property
  def num_prefix(self) -> int:
    return 2 if self.distilled else 1

  @property
  def grid(self) -> int:
    return self.img_size // self.patch_size

  # setup, not @nn.compact: three entry points share these submodules.
  def setup(self):
    c, p = self.embed_dim, self.patch_size
    self.patch_embed = nn.Conv(c, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype)
    self.cls_token = self.param("cls_token", nn.initializers.normal(0.02), (1, 1, c))
    if self.distilled:
      self.dist_token = self.param("dist_token", nn.initializers.normal(0.02), (1, 1, c))
    self.pos_embed = self.param(
        "pos_embed", nn.initializers.normal(0.02), (1, self.num_prefix + self.grid ** 2, c))
    dpr = np.linspace(0.0, self.drop_path_rate, self.depth)
    self.blocks = [
        Block(self.num_heads, self.mlp_ratio, self.proj_drop_rate, float(dpr[i]), self.dtype)
        for i in range(self.depth)]
    self.norm = nn.LayerNorm(1e-6, dtype=self.dtype, use_fast_variance=False)
    self.head_drop = nn.Dropout(self.drop_rate)
    if self.num_classes > 0:
      self.head = nn.Dense(self.num_classes, dtype=self.dtype)
      if self.distilled:
        self.head_dist = nn.Dense(self.num_classes, dtype=self.dtype)

  def __call__(self, x, train=False, attn_layers=None):
    """x: [B, H, W, 3] image already normalised with ``mean``/``std``."""
    x = self.patch_embed(x.astype(self.dtype))
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    return self._encode(x, self.pos_embed[:, self.num_prefix:], None, train, attn_layers)

  def tokens(self, patches, idx, mask=None, train=False, attn_layers=None):
    """Server path: sees only the transmitted patches.

    patches: [B, K, p, p, 3] pixel values 0..255 (uint8 or float).
    idx: [B, K] row-major patch indices into the (H/p) x (W/p) grid.
    mask: [B, K] bool, False for padding slots (their content is ignored).
    """
    b, k = idx.shape
    p = self.patch_size
    x = (jnp.asarray(patches, jnp.float32) / 255.0 - jnp.asarray(self.mean, jnp.float32)) \
        / jnp.asarray(self.std, jnp.float32)
    # A stride-p conv applied to a single p x p patch is the per-patch matmul.
    x = self.patch_embed(x.reshape(b * k, p, p, 3).astype(self.dtype)).reshape(b, k, self.embed_dim)
    # Kept tokens keep their own position; dropped ones are simply absent.
    pos = jnp.take(self.pos_embed[0], self.num_prefix + idx, axis=0)
    return self._encode(x, pos, mask, train, attn_layers)

  def _encode(self, x, pos, mask, train, attn_layers):
    b = x.shape[0]
    prefix = [self.cls_token] + ([self.dist_token] if self.distilled else [])
    prefix = jnp.concatenate(prefix, axis=1) + self.pos_embed[:, :self.num_prefix]
    x = jnp.concatenate([jnp.broadcast_to(prefix, (b,) + prefix.shape[1:]).astype(x.dtype),
                         x + pos.astype(x.dtype)], axis=1)
    key_valid = None
    if mask is not None:
      key_valid = jnp.concatenate(
          [jnp.ones((b, self.num_prefix), bool), jnp.asarray(mask, bool)], axis=1)

    chunk = self._chunk(b, x.shape[1], train)
    if chunk:
      x, cls_rows = self._chunked_blocks(x, key_valid, chunk)
    else:
      cls_rows = []
      for blk in self.blocks:
        x, row = blk(x, key_valid, train)
        cls_rows.append(row)
      x = self.norm(x)

    out = {"encoded": x}
    mode = attn_layers or self.attn_layers
    if mode == "last":
      attn = cls_rows[-1]
    elif mode == "all":
      attn = jnp.mean(jnp.stack(cls_rows), axis=0)
    else:
      raise ValueError(f"attn_layers must be 'last' or 'all', got {mode!r}")
    # Patch columns only, renormalised (Im et al.); all-masked rows give zeros.
    attn = attn[:, self.num_prefix:]
    total = attn.sum(axis=-1, keepdims=True)
    out["cls_attn"] = jnp.where(total > 0, attn / jnp.where(total > 0, total, 1.0), 0.0)

    cls = self.head_drop(x[:, 0], deterministic=not train)
    if not self.distilled:
      out["pre_logits"] = cls
      logits = self.head(cls) if self.num_classes > 0 else cls
    else:
      dist = self.head_drop(x[:, 1], deterministic=not train)
      out["pre_logits"] = (cls + dist) / 2
      if self.num_classes > 0:
        out["logits_cls"], out["logits_dist"] = self.head(cls), self.head_dist(dist)
        # Inference (and plain fine-tuning) average the two heads, as timm does.
        logits = (out["logits_cls"] + out["logits_dist"]) / 2
      else:
        logits = out["pre_logits"]
    out["logits"] = logits
    return logits, out

  def _chunk(self, batch: int, tokens: int, train: bool) -> int:
    n = self.inference_chunk
    if n < 0:
      hidden = batch * tokens * int(self.embed_dim * self.mlp_ratio)
      big = on_cpu() and hidden * jnp.dtype(self.dtype).itemsize > _CPU_CHUNK_ABOVE_BYTES
      n = max(1, _CPU_CHUNK_TOKENS // tokens) if big else 0
    if train or self.is_initializing() or not 0 < n < batch:
      return 0
    return n

  def _chunked_blocks(self, x, key_valid, n):
    """The blocks and final norm over micro-batches of n images (lax.map),
    batch padded to a multiple of n; returns (x, per-block CLS rows)."""
    inner = _Blocks(self.num_heads, self.mlp_ratio, self.depth, self.dtype, parent=None)
    params = self.variables["params"]
    variables = {"params": {k: params[k] for k in
                            [f"blocks_{i}" for i in range(self.depth)] + ["norm"]}}
    args = (x,) if key_valid is None else (x, key_valid)
    ys, rows = map_chunks(lambda *a: inner.apply(variables, *a), args, n)
    return ys, list(jnp.moveaxis(rows, 1, 0))  # [B, depth, N] -> depth rows of [B, N]


class _Blocks(nn.Module):
  """The blocks and final norm of a VisionTransformer, parameter names
  unchanged (``blocks_i``, ``norm``): the micro-batched inference body."""
  num_heads: int
  mlp_ratio: float
  depth: int
  dtype: Any = jnp.float32

  def setup(self):
    self.blocks = [Block(self.num_heads, self.mlp_ratio, dtype=self.dtype)
                   for _ in range(self.depth)]
    self.norm = nn.LayerNorm(1e-6, dtype=self.dtype, use_fast_variance=False)

  def __call__(self, x, key_valid=None):
    rows = []
    for blk in self.blocks:
      x, row = blk(x, key_valid)
      rows.append(row)
    return self.norm(x), jnp.stack(rows, axis=1)


def _variant(embed_dim, num_heads, distilled):
  return {
      "arch": dict(patch_size=16, embed_dim=embed_dim, depth=12, num_heads=num_heads,
                   mlp_ratio=4.0, distilled=distilled),
      # timm deit.py _cfg: the same for all six.
      "cfg": dict(num_classes=1000, input_size=(3, 224, 224), crop_pct=0.9,
                  interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD),
  }


VARIANTS = {
    "deit_tiny_patch16_224": _variant(192, 3, False),
    "deit_small_patch16_224": _variant(384, 6, False),
    "deit_base_patch16_224": _variant(768, 12, False),
    "deit_tiny_distilled_patch16_224": _variant(192, 3, True),
    "deit_small_distilled_patch16_224": _variant(384, 6, True),
    "deit_base_distilled_patch16_224": _variant(768, 12, True),
}


def create(name: str, **overrides) -> VisionTransformer:
  """Module for a variant; any field may be overridden (num_classes, depth, dtype...)."""
  name = name.split(".")[0]
  cfg = VARIANTS[name]["cfg"] if name in VARIANTS else {}
  defaults = dict(num_classes=cfg["num_classes"], img_size=cfg["input_size"][-1],
                  mean=cfg["mean"], std=cfg["std"]) if cfg else {}
  return variants.build(VisionTransformer, VARIANTS, "DeiT", name, defaults, overrides)


def from_timm(reader: StateDictReader, module: VisionTransformer) -> dict:
  """timm DeiT state dict -> Flax variables ``{'params': ...}`` for ``module``."""
  c, p = module.embed_dim, module.patch_size
  hidden = int(c * module.mlp_ratio)

  def dense(key, n_in, n_out):
    return {"kernel": reader.take(f"{key}.weight", (n_out, n_in)).T,
            "bias": reader.take(f"{key}.bias", (n_out,))}

  def norm(key):
    return {"scale": reader.take(f"{key}.weight", (c,)), "bias": reader.take(f"{key}.bias", (c,))}

  n_pos = module.num_prefix + module.grid ** 2
  params = {
      "cls_token": reader.take("cls_token", (1, 1, c)),
      "pos_embed": reader.take("pos_embed", (1, n_pos, c)),
      # OIHW -> HWIO
      "patch_embed": {
          "kernel": reader.take("patch_embed.proj.weight", (c, 3, p, p)).transpose(2, 3, 1, 0),
          "bias": reader.take("patch_embed.proj.bias", (c,))},
      "norm": norm("norm"),
  }
  if module.distilled:
    params["dist_token"] = reader.take("dist_token", (1, 1, c))
  for i in range(module.depth):
    k = f"blocks.{i}"
    params[f"blocks_{i}"] = {
        "norm1": norm(f"{k}.norm1"),
        "attn": {"qkv": dense(f"{k}.attn.qkv", c, 3 * c), "proj": dense(f"{k}.attn.proj", c, c)},
        "norm2": norm(f"{k}.norm2"),
        "mlp": {"fc1": dense(f"{k}.mlp.fc1", c, hidden), "fc2": dense(f"{k}.mlp.fc2", hidden, c)},
    }
  if module.num_classes > 0:
    params["head"] = dense("head", c, module.num_classes)
    if module.distilled:
      params["head_dist"] = dense("head_dist", c, module.num_classes)
  reader.finish()

  variables = {"params": jax.tree.map(jnp.asarray, params)}
  dummy = jnp.zeros((1, module.img_size, module.img_size, 3), jnp.float32)
  check_against_template(variables, jax.eval_shape(module.init, jax.random.PRNGKey(0), dummy))
  return variables
