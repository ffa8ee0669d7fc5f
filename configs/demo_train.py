"""Training of the three demo models on SyntheticShapes (CPU).

  rcst train --config configs/demo_train.py
  rcst train --config configs/demo_train.py --config.models=server --config.output_dir=/tmp/w

Small config variants of the ported modules (no new architectures), 224x224
inputs and 16x16 patches as on ImageNet. The edge CNN is kept small and
briefly trained on purpose: it must be clearly weaker than the server, or
offloading would never pay. Step counts are sized from measured throughput;
see weights/README.md for the run that produced the checkpoints.
"""

import ml_collections

VARIANTS = {"": "the recipe that produced weights/"}


def _model(name, out, arch, **train):
  m = ml_collections.ConfigDict()
  m.name, m.out = name, out
  m.arch = ml_collections.ConfigDict(arch)  # create_model overrides (num_classes added)
  m.batch_size = 64
  m.epochs = 1.0
  m.steps = 0                # > 0 overrides epochs
  m.lr = 2e-3
  m.warmup_steps = 50
  m.weight_decay = 0.05
  m.label_smoothing = 0.1
  m.grad_clip = 1.0
  m.tokens = None            # ConfigDict: train through VisionTransformer.tokens
  m.update(train)
  return m


def _tokens(buckets, bucket_probs, min_keep=0.05, object_prob=0.5):
  """Per step a slot count from buckets; per image min_keep*N..slots patches kept."""
  return ml_collections.ConfigDict(dict(buckets=buckets, bucket_probs=bucket_probs,
                                        min_keep=min_keep, object_prob=object_prob))


def get_config(arg=None):
  if arg:
    raise ValueError(f"demo_train has no variant {arg!r}")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.models = "edge,server,baseline_edge"   # comma list: which to (re)train
  c.progress = True
  c.output_dir = "weights"    # the model directories go here (the checkout's weights/)

  c.data = ml_collections.ConfigDict()
  c.data.seed = 0             # SyntheticShapes seed; train split to train, test split to test
  c.data.train_size = 15_000
  c.data.test_size = 2_000
  c.data.workers = 2
  c.data.cache_dir = ""       # e.g. /tmp/rcst_cache: keep rendered arrays for reruns

  c.edge = _model("efficientnet_b0", "demo_edge",
                  dict(channel_multiplier=0.25, depth_multiplier=0.25),
                  epochs=0.5, lr=3e-3)
  c.server = _model("deit_tiny_patch16_224", "demo_server",
                    dict(embed_dim=96, depth=4, num_heads=3),
                    epochs=4.0, lr=2e-3, tokens=_tokens((32, 64, 196), (0.3, 0.5, 0.2)))
  c.baseline_edge = _model("deit_tiny_patch16_224", "demo_baseline_edge",
                           dict(embed_dim=96, depth=3, num_heads=3),
                           epochs=0.5, lr=1e-3)
  return c
