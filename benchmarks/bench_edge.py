"""The complete edge step (EfficientNet-B0 forward + softmax + CRC acceptance +
APS set + APS-guided Grad-CAM + 14x14 patch scores), JAX vs PyTorch in the
same run: pytorch-grad-cam (backpropagates to the input) and timm + autograd
only to the Grad-CAM layer (the fast torch form). Random weights.

  .venv/bin/python benchmarks/bench_edge.py [--runs 5]
"""

import argparse
import os
import sys

import jax
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import HEADER, row, time_fn, time_torch  # noqa: E402

from rcst_jax import pipeline  # noqa: E402
from rcst_jax.checkpoints import Model  # noqa: E402
from rcst_jax.models import create_model, default_cfg  # noqa: E402

LAMBDA_HAT, Q_HAT = 0.9, 0.9


def torch_edge_autograd(tm, x):
  """timm forward with a hook on bn2; autograd from g to that map only."""
  store = {}
  h = tm.bn2.register_forward_hook(lambda m, i, o: store.update(a=o))
  with torch.enable_grad():
    logits = tm(x)
  h.remove()
  probs = logits.softmax(-1)
  p_sorted, order = probs.sort(-1, descending=True)
  cum = p_sorted.cumsum(-1)
  k = ((cum <= Q_HAT).sum(-1) + 1).clamp(max=probs.shape[-1])
  in_set = torch.arange(probs.shape[-1])[None] < k[:, None]
  mask = torch.zeros_like(probs, dtype=torch.bool).scatter(1, order, in_set)
  w = torch.where(mask, probs, 0)
  w = (w / w.sum(-1, keepdim=True)).detach()
  g = (w * logits).sum()
  grads = torch.autograd.grad(g, store["a"])[0]
  cam = F.relu((grads.mean((2, 3), keepdim=True) * store["a"]).sum(1, keepdim=True))
  up = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)
  lo, hi = up.amin((2, 3), keepdim=True), up.amax((2, 3), keepdim=True)
  up = torch.where(hi > lo, (up - lo) / (hi - lo).clamp_min(1e-12), 0)
  pooled = F.adaptive_avg_pool2d(up, 14)
  lo, hi = pooled.amin((2, 3), keepdim=True), pooled.amax((2, 3), keepdim=True)
  pooled = torch.where(hi > lo, (pooled - lo) / (hi - lo).clamp_min(1e-12), 0)
  return probs.max(-1).values >= LAMBDA_HAT, pooled.flatten(1)


def torch_edge_gradcam_lib(cam, tm, x):
  from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
  with torch.no_grad():
    top = tm(x).argmax(-1)
  maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in top])
  return F.adaptive_avg_pool2d(torch.from_numpy(maps)[:, None], 14)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--runs", type=int, default=5)
  args = p.parse_args()
  import timm
  from pytorch_grad_cam import GradCAM
  torch.set_num_threads(os.cpu_count() or 1)
  print(f"backend={jax.default_backend()} cpus={os.cpu_count()} torch threads="
        f"{torch.get_num_threads()}")
  tm = timm.create_model("efficientnet_b0").eval()
  module = create_model("efficientnet_b0")
  variables = module.init(jax.random.PRNGKey(0), np.zeros((1, 224, 224, 3), np.float32))
  variables = {k: v for k, v in variables.items() if k != "perturbations"}
  edge = Model(module, variables, dict(default_cfg("efficientnet_b0"), timm_name="efficientnet_b0"))
  print(HEADER)
  with GradCAM(model=tm, target_layers=[tm.bn2]) as cam:
    for b in (1, 16):
      imgs = np.random.default_rng(b).integers(0, 256, (b, 224, 224, 3), dtype=np.uint8)
      x = ((torch.from_numpy(imgs).float() / 255 - torch.tensor(edge.metadata["mean"]))
           / torch.tensor(edge.metadata["std"])).permute(0, 3, 1, 2).contiguous()
      j = time_fn(lambda im: pipeline.edge_step(edge, im, LAMBDA_HAT, Q_HAT), imgs,
                  runs=args.runs)
      t_fast = time_torch(torch_edge_autograd, tm, x, runs=args.runs)
      t_lib = time_torch(torch_edge_gradcam_lib, cam, tm, x, runs=args.runs)
      print(row("edge step vs timm+autograd to bn2", b, j, t_fast), flush=True)
      print(row("edge step vs pytorch-grad-cam (top-1 only)", b, j, t_lib), flush=True)


if __name__ == "__main__":
  main()
