"""The embedded demo (`rcst demo`): the full pipeline on the synthetic shapes
set with the small models trained by `rcst train` and shipped
in weights/. Same geometry as ImageNet (224 x 224, 16-pixel patches).

Smoke size: rcst demo --config.data.n_cal=200 --config.data.n_test=64
"""

import ml_collections

from configs import imagenet


def get_config():
  c = imagenet.get_config()
  c.models_dir = "weights"
  c.edge = "demo_edge"
  c.server = "demo_server"
  c.baseline_edge = "demo_baseline_edge"
  c.data.name = "synthetic"
  c.data.n_cal = 1000
  c.data.n_test = 2000
  c.data.seed = 0
  c.tau_grid = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
  c.k_grid = (5, 10, 20, 30, 40, 60, 80, 100, 140, 196)
  c.delta_sum_grid = (0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.99, 1.01)
  c.batch_size = 64
  c.server_batch = 64
  c.chunk_size = 500
  c.output_dir = "outputs/demo"
  return c
