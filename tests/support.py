"""What many test files share: where the repository is, demo images written as
files, a guard that no model runs where a cache must answer, and timm models'
BatchNorm statistics made random (benchmarks use it too)."""

import os

from PIL import Image

from rcst_jax.data.synthetic import SyntheticShapes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTS = os.path.join(REPO, "weights")
BENCHMARKS = os.path.join(REPO, "benchmarks")


def image_files(tmp_path, n=4):
  src = SyntheticShapes("test", n, seed=5)
  paths = []
  for i in range(n):
    p = tmp_path / f"img{i}.png"
    Image.fromarray(src[i].image).save(p)
    paths.append(str(p))
  return paths


def refuse_model_calls(m):
  """Every model call `rcst calibrate` could make, refused where the library
  looks it up: Algorithm 1 (sweep.engine and sweep.certification call
  `algorithm1.algorithm1` on the module), the edge step (sweep.passes calls
  `edge_lib.edge_step`, and `edge_step_batched` for a certified view) and the
  server (`Server.logits_from_images`, the class sweep.passes instantiates)."""
  from rcst_jax.calibration import algorithm1
  from rcst_jax.inference import server
  from rcst_jax.sweep import certification, engine, passes

  def refuse(*a, **k):
    raise AssertionError("rcst calibrate ran a model although the evaluation cache has it all")
  assert engine.algorithm1 is algorithm1 and certification.algorithm1 is algorithm1
  assert passes.Server is server.Server
  for obj, name in ((algorithm1, "algorithm1"), (passes.edge_lib, "edge_step"),
                    (passes.edge_lib, "edge_step_batched"),
                    (server.Server, "logits_from_images")):
    m.setattr(obj, name, refuse)


def randomize_batchnorm(torch_model, seed: int = 0):
  """Gives every BatchNorm random affine params and running stats.

  timm's init leaves mean 0 / var 1 / weight 1 / bias 0, which hides
  conversion bugs (swapped or dropped BN tensors give identical outputs).
  """
  import torch
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in torch_model.modules():
      if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
        c = m.num_features
        m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
        m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
        m.weight.copy_(torch.rand(c, generator=g) * 1.5 + 0.25)
        m.bias.copy_(torch.randn(c, generator=g) * 0.2)
  return torch_model
