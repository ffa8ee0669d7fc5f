"""The complete edge step (EfficientNet-B0 forward + softmax + CRC acceptance
+ APS set + APS-guided Grad-CAM at the `features` tap + 14x14 patch scores):
rcst_jax's ``inference.edge.edge_step`` next to timm + autograd to the same tap
(bn2 + SiLU output), default and best-tuned, interleaved in one run. Random
fp32 weights; medians of interleaved rounds (see common.py).

  .venv/bin/python benchmarks/bench_edge.py [--repeats 7] [--inner N] [--no-tuned] [--rounds]

torch forms (torch_worker.py): default = forward hook on bn2 and
autograd.grad to it with the whole forward recorded (what a plain script
does); tuned = forward_features in inference mode, only the pooled head
records a graph.
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from torch_worker import LAMBDA_HAT, Q_HAT  # noqa: E402

from rcst_jax.inference import edge as edge_lib  # noqa: E402
from rcst_jax.models import create_model, default_cfg  # noqa: E402
from rcst_jax.models.checkpoints import Model  # noqa: E402


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
  p.add_argument("--inner", type=int, default=0,
                 help="timed calls per round (default 12 at batch 1, 2 above)")
  p.add_argument("--no-tuned", action="store_true")
  p.add_argument("--rounds", action="store_true", help="print every round's img/s")
  args = p.parse_args()
  workers, note = common.start_workers(not args.no_tuned)
  common.print_run_header(workers, args, note)
  module = create_model("efficientnet_b0")
  variables = common.random_variables(module, np.zeros((1, 224, 224, 3), np.float32))
  edge = Model(module, variables, dict(default_cfg("efficientnet_b0"),
                                       timm_name="efficientnet_b0"))
  print(common.HEADER)
  try:
    for b in args.batches:
      imgs = np.random.default_rng(b).integers(0, 256, (b, 224, 224, 3), dtype=np.uint8)
      step = lambda im: edge_lib.edge_step(edge, im, LAMBDA_HAT, Q_HAT)
      common.run_case("edge step (features tap)", b, step, (imgs,), workers, "edge",
                      args.repeats, args.inner, args.rounds)
  finally:
    for w in workers.values():
      w.close()


if __name__ == "__main__":
  main()
