"""Forward throughput: Flax EfficientNet-B0 and DeiT-Base (196/98/49 tokens)
next to timm on the same CPU in the same run. Random weights (speed only).

  .venv/bin/python benchmarks/bench_models.py [--runs 5]
"""

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import HEADER, row, time_fn, time_torch  # noqa: E402

from rcst_jax.models import create_model  # noqa: E402


def effnet(batches, runs):
  import timm
  tm = timm.create_model("efficientnet_b0").eval()
  for impl in ("shifted", "grouped"):
    module = create_model("efficientnet_b0", depthwise_impl=impl)
    variables = module.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))
    variables = {k: v for k, v in variables.items() if k != "perturbations"}
    fwd = jax.jit(lambda v, x: module.apply(v, x)[0])
    for b in batches:
      x = jnp.asarray(np.random.default_rng(0).normal(size=(b, 224, 224, 3)), jnp.float32)
      xt = torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2).contiguous()
      with torch.no_grad():
        t = time_torch(tm, xt, runs=runs) if impl == "shifted" else None
      print(row(f"efficientnet_b0 forward ({impl} depthwise)", b, time_fn(fwd, variables, x,
                                                                         runs=runs), t), flush=True)


def deit(batch, tokens_list, runs):
  import timm
  tm = timm.create_model("deit_base_patch16_224").eval()
  module = create_model("deit_base_patch16_224")
  variables = module.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))
  full = jax.jit(lambda v, x: module.apply(v, x)[0])
  sub = jax.jit(lambda v, p, i, m: module.apply(v, p, i, m, method="tokens")[0])
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch, 224, 224, 3)), jnp.float32)
  xt = torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2).contiguous()

  def timm_tokens(xt, idx):
    # timm on the same gathered tokens: patch_embed, +pos, gather, CLS, blocks.
    t = tm.patch_embed(xt) + tm.pos_embed[:, 1:]
    t = torch.gather(t, 1, idx[..., None].expand(-1, -1, t.shape[-1]))
    cls = (tm.cls_token + tm.pos_embed[:, :1]).expand(t.shape[0], -1, -1)
    t = tm.norm(tm.blocks(torch.cat([cls, t], 1)))
    return tm.head(t[:, 0])

  for k in tokens_list:
    idx = np.sort(np.stack([rng.choice(196, k, replace=False) for _ in range(batch)]), 1)
    patches = rng.integers(0, 256, (batch, k, 16, 16, 3), dtype=np.uint8)
    mask = np.ones((batch, k), bool)
    with torch.no_grad():
      if k == 196:
        t = time_torch(tm, xt, runs=runs)
        print(row("deit_base forward, full image", batch, time_fn(full, variables, x, runs=runs),
                  t), flush=True)
      t = time_torch(timm_tokens, xt, torch.from_numpy(idx), runs=runs)
    j = time_fn(sub, variables, patches, idx, mask, runs=runs)
    print(row(f"deit_base tokens path, {k} tokens", batch, j, t), flush=True)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--runs", type=int, default=5)
  args = p.parse_args()
  torch.set_num_threads(os.cpu_count() or 1)
  print(f"backend={jax.default_backend()} devices={jax.device_count()} cpus={os.cpu_count()} "
        f"torch={torch.__version__} threads={torch.get_num_threads()} jax={jax.__version__}")
  print(HEADER)
  effnet((1, 16), args.runs)
  deit(16, (196, 98, 49), args.runs)


if __name__ == "__main__":
  main()
