"""DeiT parity with timm at random init: full image, token subsets, CLS attention."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import max_rel_err, timm_state_dict_numpy

from rcst_jax.inference import patches as P
from rcst_jax.models import deit
from rcst_jax.models.state_dict import ConversionError, StateDictReader

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

MEAN = np.array(deit.IMAGENET_MEAN, np.float32)
STD = np.array(deit.IMAGENET_STD, np.float32)
TINY, BASE = "deit_tiny_patch16_224", "deit_base_patch16_224"
TINY_D = "deit_tiny_distilled_patch16_224"


@pytest.fixture(autouse=True)
def _highest_precision():
  with jax.default_matmul_precision("highest"):
    yield


def _randomize(tm, seed=0):
  """timm's init leaves biases 0, LayerNorms 1/0 and prefix tokens tiny: that
  would hide swapped or dropped tensors, so give everything random values."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in tm.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if name in ("cls_token", "pos_embed", "dist_token"):
        p.copy_(noise)
      elif name.endswith("qkv.weight"):
        # Peaked attention, so CLS-attention checks are not near-uniform;
        # milder for wider models, whose logits grow with width.
        p.mul_(5.0 * (192 / p.shape[1]) ** 0.5)
      elif name.startswith("head") and name.endswith("weight"):
        p.copy_(noise * 0.2)  # logits of a few units, so relative errors mean something
      elif name.endswith("bias"):
        p.copy_(noise * 0.1)
      elif "norm" in name:
        p.copy_(1 + 0.2 * noise)
  return tm


@functools.lru_cache(maxsize=3)
def _load(name):
  """(timm model, flax module, variables, jitted full / token forward)."""
  torch.manual_seed(0)
  tm = _randomize(timm.create_model(name, pretrained=False)).eval()
  module = deit.create(name)
  variables = deit.from_timm(StateDictReader(timm_state_dict_numpy(tm)), module)
  full = jax.jit(lambda v, x, mode: module.apply(v, x, attn_layers=mode), static_argnums=2)
  toks = jax.jit(lambda v, p, i, m: module.apply(v, p, i, m, method=module.tokens))
  return tm, module, variables, full, toks


def _pixels(b, seed):
  return np.random.default_rng(seed).integers(0, 256, (b, 224, 224, 3), dtype=np.uint8)


def _normalise(pixels):
  return ((pixels.astype(np.float32) / 255.0 - MEAN) / STD).astype(np.float32)


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _torch_embed(tm, pixels):
  """timm's embedding of the full image, position added: (prefix, patch tokens)."""
  npre = tm.num_prefix_tokens
  with torch.no_grad():
    x = tm.patch_embed(_nchw(_normalise(pixels))) + tm.pos_embed[:, npre:]
    prefix = [getattr(tm, t) for t in ("cls_token", "dist_token")[:npre]]
    prefix = torch.cat(prefix, dim=1) + tm.pos_embed[:, :npre]
  return prefix.expand(x.shape[0], -1, -1), x


def _torch_gather(tm, pixels, idx):
  """Sequence of the prefix tokens and the kept patch-token rows, in idx order."""
  prefix, x = _torch_embed(tm, pixels)
  idx = torch.from_numpy(np.asarray(idx, np.int64))
  x = torch.gather(x, 1, idx[:, :, None].expand(-1, -1, x.shape[-1]))
  return torch.cat([prefix, x], dim=1)


def _torch_on_tokens(tm, pixels, idx):
  """Reference from timm's modules: embed the full image, gather the kept token
  rows, re-prepend the prefix tokens, run blocks / norm / head(s)."""
  with torch.no_grad():
    x = tm.norm(tm.blocks(_torch_gather(tm, pixels, idx)))
    logits = tm.head(x[:, 0])
    if tm.num_prefix_tokens == 2:
      logits = (logits + tm.head_dist(x[:, 1])) / 2
  return logits.numpy()


# Ordered so the models the later tests reuse are still in _load's cache.
@pytest.mark.parametrize("name", sorted(deit.VARIANTS, key=lambda n: (n in (TINY, BASE, TINY_D), n)))
def test_full_image_matches_timm(name):
  tm, module, variables, full, _ = _load(name)
  n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(variables))
  assert n_params == sum(p.numel() for p in tm.parameters())
  for b in (1, 2):
    x = _normalise(_pixels(b, seed=b))
    logits, out = full(variables, x, "last")
    with torch.no_grad():
      seq = tm.forward_features(_nchw(x))
      ref, feats = tm.forward_head(seq).numpy(), tm.forward_head(seq, pre_logits=True).numpy()
    assert logits.shape == (b, 1000)
    assert max_rel_err(logits, ref) <= 1e-4, name
    assert max_rel_err(out["pre_logits"], feats) <= 1e-4, name


def test_parameter_counts():
  count = lambda name: sum(
      int(np.prod(a.shape)) for a in jax.tree.leaves(jax.eval_shape(
          deit.create(name).init, jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))))
  assert count(BASE) == 86_567_656
  assert count(TINY) == 5_717_416


@pytest.mark.parametrize("name", [BASE, TINY, TINY_D])
def test_token_subset_matches_timm(name):
  tm, module, variables, full, toks = _load(name)
  rng = np.random.default_rng(1)
  pixels = _pixels(5, seed=3)
  # One padded batch (one compile): kept counts 1, 17, 98, 196 in random
  # order, and a last row with all 196 patches in ascending order.
  counts = (1, 17, 98, 196, 196)
  idx = np.zeros((5, 196), np.int64)
  valid = np.arange(196)[None] < np.array(counts)[:, None]
  for row, k in zip(idx[:4], counts):
    row[:k] = rng.choice(196, size=k, replace=False)
  idx[4] = np.arange(196)
  logits, _ = toks(variables, P.gather_patches(pixels, idx), idx, valid)
  for b, k in enumerate(counts):
    ref = _torch_on_tokens(tm, pixels[b:b + 1], idx[b:b + 1, :k])
    err = max_rel_err(logits[b], ref[0])
    assert err <= 1e-4, (name, k, err)

  # All 196 in ascending order is the full image.
  with torch.no_grad():
    ref = tm(_nchw(_normalise(pixels[4:]))).numpy()
  assert max_rel_err(logits[4:], ref) <= 1e-4
  assert max_rel_err(logits[4:], full(variables, _normalise(pixels[4:]), "last")[0]) <= 1e-5


def test_padded_batch_equals_unpadded_runs():
  _, _, variables, _, toks = _load(TINY)
  rng = np.random.default_rng(2)
  pixels = _pixels(4, seed=4)
  keep = np.zeros((4, 196), bool)
  for row, k in zip(keep, (1, 30, 77, 0)):
    row[rng.choice(196, k, replace=False)] = True
  idx, valid = P.pad_selection(keep)
  assert idx.shape == (4, 80)
  patches = np.array(P.gather_patches(pixels, idx))
  # Padding slots carry garbage pixels and indices: they must not matter.
  pad = ~np.asarray(valid)
  patches[pad] = rng.integers(0, 256, patches[pad].shape)
  idx = np.where(pad, rng.integers(0, 196, idx.shape), idx)
  logits, out = toks(variables, patches, idx, valid)
  assert np.all(np.isfinite(logits)) and np.all(np.isfinite(out["cls_attn"]))
  for b in range(4):
    k = int(keep[b].sum())
    sel = np.flatnonzero(keep[b])[None]
    lo, o = toks(variables, P.gather_patches(pixels[b:b + 1], sel), sel, np.ones((1, k), bool))
    assert max_rel_err(logits[b], lo[0]) <= 1e-5, (b, k)
    np.testing.assert_allclose(out["cls_attn"][b, :k], o["cls_attn"][0], atol=1e-6)
    assert np.all(out["cls_attn"][b, k:] == 0)


def _torch_cls_attn(tm, x):
  """Recompute each block's softmax(q k^T * scale) from hooked qkv outputs;
  head-mean CLS row over the patch columns, per layer: [L, B, N]."""
  qkvs = []
  hooks = [blk.attn.qkv.register_forward_hook(lambda m, i, o: qkvs.append(o.double()))
           for blk in tm.blocks]
  try:
    with torch.no_grad():
      tm.norm(tm.blocks(x))
  finally:
    for h in hooks:
      h.remove()
  rows = []
  for qkv in qkvs:
    b, n, _ = qkv.shape
    heads = tm.blocks[0].attn.num_heads
    q, k, _ = qkv.reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
    attn = torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1)
    rows.append(attn.mean(dim=1)[:, 0, tm.num_prefix_tokens:])
  return torch.stack(rows).numpy()


def _renorm(a):
  return a / a.sum(-1, keepdims=True)


@pytest.mark.parametrize("name", [TINY, TINY_D])
def test_cls_attention_matches_torch(name):
  tm, _, variables, full, toks = _load(name)
  pixels = _pixels(2, seed=5)
  x = _normalise(pixels)
  rows = _torch_cls_attn(tm, _torch_gather(tm, pixels, np.tile(np.arange(196), (2, 1))))
  logits_last, last = full(variables, x, "last")
  logits_all, every = full(variables, x, "all")
  assert last["cls_attn"].shape == (2, 196)
  np.testing.assert_allclose(last["cls_attn"].sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(last["cls_attn"], _renorm(rows[-1]), atol=1e-6)
  np.testing.assert_allclose(every["cls_attn"], _renorm(rows.mean(0)), atol=1e-6)
  np.testing.assert_array_equal(logits_last, logits_all)  # attention read-out is side-effect free

  # Token path: attention over the kept columns only, in transmitted order.
  idx = np.random.default_rng(6).choice(196, size=(2, 17), replace=False)
  _, out = toks(variables, P.gather_patches(pixels, idx), idx, np.ones((2, 17), bool))
  rows = _torch_cls_attn(tm, _torch_gather(tm, pixels, idx))
  np.testing.assert_allclose(out["cls_attn"], _renorm(rows[-1]), atol=1e-6)


def test_conversion_refuses_bad_checkpoints():
  tm, module, _, _, _ = _load(TINY)
  sd = timm_state_dict_numpy(tm)

  missing = {k: v for k, v in sd.items() if k != "blocks.11.mlp.fc2.bias"}
  with pytest.raises(ConversionError, match=r"blocks\.11\.mlp\.fc2\.bias"):
    deit.from_timm(StateDictReader(missing), module)

  extra = dict(sd, **{"blocks.12.norm1.weight": sd["blocks.11.norm1.weight"]})
  with pytest.raises(ConversionError, match=r"blocks\.12\.norm1\.weight"):
    deit.from_timm(StateDictReader(extra), module)

  wrong = dict(sd, pos_embed=sd["pos_embed"][:, 1:])
  with pytest.raises(ConversionError, match="pos_embed"):
    deit.from_timm(StateDictReader(wrong), module)

  # A distilled checkpoint does not load into the plain model.
  distilled = dict(sd, dist_token=sd["cls_token"])
  with pytest.raises(ConversionError, match="dist_token"):
    deit.from_timm(StateDictReader(distilled), module)


def test_create_overrides_and_small_server():
  model = deit.create(TINY, num_classes=10, embed_dim=96, depth=4, num_heads=3, img_size=64,
                      drop_rate=0.1, proj_drop_rate=0.1, drop_path_rate=0.1)
  pixels = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
  x = _normalise(pixels)
  # Random values straight from numpy: compiling the initialisers' RNG is slow on CPU.
  rng = np.random.default_rng(1)
  variables = jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.1, a.shape), a.dtype),
                           jax.eval_shape(model.init, jax.random.PRNGKey(1), x))
  assert variables["params"]["pos_embed"].shape == (1, 17, 96)
  assert set(variables["params"]) == {"patch_embed", "cls_token", "pos_embed", "norm", "head"} | {
      f"blocks_{i}" for i in range(4)}
  logits, out = jax.jit(model.apply)(variables, x)
  assert logits.shape == (2, 10) and out["cls_attn"].shape == (2, 16)

  # Training mode uses dropout; evaluation is deterministic.
  train = jax.jit(lambda v, x, r: model.apply(v, x, train=True, rngs={"dropout": r}))
  assert not np.allclose(train(variables, x, jax.random.PRNGKey(2))[0], logits)

  # Token path on a 4 x 4 grid: all patches == full image; a padded row works.
  toks = jax.jit(lambda v, p, i, m: model.apply(v, p, i, m, method=model.tokens))
  idx = np.array([np.arange(16), [3] + [0] * 15])
  valid = np.array([[True] * 16, [True] + [False] * 15])
  lo, _ = toks(variables, P.gather_patches(pixels, idx), idx, valid)
  assert max_rel_err(lo[0], logits[0]) <= 1e-5
  assert np.all(np.isfinite(lo[1]))

  bf16 = deit.create(TINY, num_classes=10, embed_dim=96, depth=4, num_heads=3, img_size=64,
                     dtype=jnp.bfloat16)
  lo16, _ = jax.jit(bf16.apply)(variables, x)
  assert lo16.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(lo16, np.float32)))
  assert max_rel_err(np.asarray(lo16, np.float32), logits) < 0.1

  with pytest.raises(ValueError, match="unknown DeiT option.*widht"):
    deit.create(TINY, widht=3)
  with pytest.raises(ValueError, match="unknown DeiT variant"):
    deit.create("deit_huge_patch16_224")


def test_variant_configs_follow_timm():
  for name, spec in deit.VARIANTS.items():
    cfg = timm.create_model(name, pretrained=False, num_classes=0, depth=1).pretrained_cfg
    for key in ("num_classes", "input_size", "crop_pct", "interpolation", "mean", "std"):
      assert tuple(np.ravel(spec["cfg"][key])) == tuple(np.ravel(cfg[key])), (name, key)
    m = deit.create(name)
    assert (m.embed_dim, m.depth, m.num_heads, m.distilled) == (
        spec["arch"]["embed_dim"], 12, spec["arch"]["num_heads"], "distilled" in name)


@pytest.mark.parametrize("name", [TINY, TINY_D])
def test_micro_batched_inference_matches_whole_batch(name, monkeypatch):
  """inference_chunk (lax.map over chunks of images) gives the whole-batch
  outputs: logits and CLS attention, full image and token path, with and
  without a mask, and a batch that is not a multiple of the chunk."""
  _, _, variables, _, _ = _load(name)
  whole, chunked = deit.create(name, inference_chunk=0), deit.create(name, inference_chunk=2)
  full = lambda m: jax.jit(lambda v, x, mode: m.apply(v, x, attn_layers=mode), static_argnums=2)
  toks = lambda m: jax.jit(lambda v, p, i, k: m.apply(v, p, i, k, method="tokens"))
  pixels = _pixels(5, seed=7)
  x = _normalise(pixels)

  def same(a, b):
    assert max_rel_err(a[0], b[0]) <= 1e-6
    np.testing.assert_allclose(a[1]["cls_attn"], b[1]["cls_attn"], rtol=1e-6, atol=1e-7)

  for mode in ("last", "all"):
    same(full(chunked)(variables, x, mode), full(whole)(variables, x, mode))
  rng = np.random.default_rng(8)
  keep = np.zeros((5, 196), bool)
  for row, k in zip(keep, (1, 30, 77, 0, 196)):
    row[rng.choice(196, k, replace=False)] = True
  idx, valid = P.pad_selection(keep)
  sent = P.gather_patches(pixels, idx)
  same(toks(chunked)(variables, sent, idx, valid), toks(whole)(variables, sent, idx, valid))
  same(toks(chunked)(variables, sent, idx, None), toks(whole)(variables, sent, idx, None))

  # The CPU default (-1) chunks only past the size threshold; train never does.
  lowered = lambda m, **kw: jax.jit(lambda v, x: m.apply(v, x, **kw)).lower(variables, x).as_text()
  auto = deit.create(name)
  assert "while" not in lowered(auto)
  if jax.default_backend() == "cpu":
    monkeypatch.setattr(deit, "_CPU_CHUNK_ABOVE_BYTES", 0)
    assert "while" in lowered(auto)
  assert "while" not in lowered(chunked, train=True, rngs={"dropout": jax.random.PRNGKey(0)})
