"""The paper's setting (Section 4.1): ImageNet-1K val split 10k / 40k,
EfficientNet-B0 edge, DeiT-Base server, DeiT-Tiny baseline edge,
alpha_crc = alpha_aps = 0.05, eta = 0.8.

  rcst evaluate --config imagenet \\
      --config.models_dir=/content/drive/MyDrive/rcst/models \\
      --config.output_dir=/content/drive/MyDrive/rcst/imagenet

Variants (``--config imagenet:<arg>``):
  (none)    the paper's setting
  quick=N   the first N images of the split, a fifth of them calibrating
  smoke     tiny grids and batches, 24 calibration images: for tests and CI
            (run under ``tensorflow_datasets.testing.mock_data``)

Model directories come from `rcst convert` (see the Colab notebook).
"""

import ml_collections

VARIANTS = {"": "the paper's setting", "quick=N": "first N images, N/5 calibrating",
            "smoke": "tiny grids and batches (tests, CI; tfds mock data)"}


def parse_arg(arg, extra=()):
  """'' | 'smoke' | 'quick=N' | one of ``extra`` -> (name, value)."""
  arg = (arg or "").strip()
  name, _, value = arg.partition("=")
  if name not in ("", "smoke", "quick", *extra) or (name == "quick") != bool(value):
    known = ", ".join([k or "(none)" for k in VARIANTS] + list(extra))
    raise ValueError(f"unknown config variant {arg!r}; known: {known}")
  return name, (int(value) if value else None)


def smoke(c):
  """The smallest settings that still run every method and output."""
  c.tau_grid, c.k_grid, c.delta_sum_grid = (0.3, 0.7), (10, 196), (0.4, 1.01)
  c.batch_size = c.server_batch = c.chunk_size = 8
  c.gallery_size = 2
  c.progress = False
  return c


def get_config(arg=None):
  name, value = parse_arg(arg)
  c = _base()
  if name == "quick":
    c.data.limit, c.data.n_cal = value, max(1, value // 5)
  elif name == "smoke":
    smoke(c)
    c.data.n_cal = 24
    c.data.pil_decode = False
  return c


def _base():
  c = ml_collections.ConfigDict()
  c.models_dir = "models"
  c.edge = "efficientnet_b0.ra_in1k"            # <models_dir>/<name>
  c.server = "deit_base_patch16_224.fb_in1k"
  c.baseline_edge = "deit_tiny_patch16_224.fb_in1k"
  # An `rcst export` file of the edge: it then decides, on ONNX Runtime, in
  # calibration, certification and the sweep alike (calibrated as deployed).
  c.edge_onnx = ml_collections.config_dict.placeholder(str)

  c.data = ml_collections.ConfigDict()
  c.data.name = "imagenet2012"   # or imagenet_v2, imagenette, folder
  c.data.data_dir = ml_collections.config_dict.placeholder(str)
  c.data.split = "validation"
  c.data.n_cal = 10_000          # the rest of the split is the test set
  c.data.split_seed = 0
  c.data.folder_root = ml_collections.config_dict.placeholder(str)
  c.data.label_map = ml_collections.config_dict.placeholder(str)
  c.data.pil_decode = True       # decode JPEG bytes with PIL, as timm does
  c.data.limit = 0               # >0: use only the first `limit` images (quick looks)

  c.alpha_crc = 0.05
  c.alpha_aps = 0.05
  c.eta = 0.8                    # Im et al. min-entropy threshold, bits
  c.tau_grid = (0.0, 0.1, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7, 0.8, 0.9)
  # Each baseline grid ends at full transmission (k = N; a cumulative
  # attention bound above 1, since float32 sums can exceed 1.0): the paper's
  # "Best Acc." baseline cells are those points.
  c.k_grid = (20, 40, 60, 80, 100, 120, 140, 160, 180, 196)
  c.delta_sum_grid = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.99, 1.01)
  c.empty_policy = "cls_only"    # attention-sum with 0 kept patches: CLS-only server, as Im et al.
  c.gradcam_layer = "features"   # last conv stage of EfficientNet-B0 (bn2 + act output)
  c.seed = 0                     # random-k baseline
  # How the kept patches are coded (payload/codecs.py): every method and
  # parameter is evaluated with each codec listed; "raw" is always evaluated.
  # raw | zstd | webp-lossless | jpeg:Q (4:4:4) | jpeg420:Q. A lossy codec reruns the
  # server on the decoded patches; a compressed one encodes every payload.
  c.codec_grid = ("raw",)

  c.dtype = "float32"            # or bfloat16 (TPU)
  c.matmul_precision = "highest"  # float32 parity on TPU; "default" is faster there
  c.compare_dtype = ""           # e.g. "bfloat16": rerun the sweep in it, write dtype_comparison.md
  c.devices = "all"
  c.batch_size = 128             # per step, across all local devices
  c.server_batch = 128
  # Smallest batch for a bucket's remainder (power-of-two shapes down to it,
  # see inference.server.Server); 0: server_batch, i.e. full batches only. Lower
  # (e.g. server_batch // 8) pads fewer rows for more compiled shapes.
  c.server_min_batch = 0
  # Tokens per server call at most (0: server_batch rows whatever the bucket).
  # Smaller calls of long rows run faster per row on CPU: the attention's
  # [rows, heads, T, T] scores stay in cache (the demo sets 2,048).
  c.server_token_budget = 0
  # Edge and server calls in flight at once from host threads (0: 2 on a CPU
  # backend with 2 or more cores, else 1): one XLA:CPU call of these models
  # keeps about one core busy.
  c.host_concurrency = 0
  c.chunk_size = 2048            # unit of resumption
  c.buckets = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 56, 64, 80,
               96, 112, 128, 144, 160, 176, 196)
  # Whole-system guarantee (Learn-then-Test): certify (lambda, tau) with
  # P(risk <= epsilon) >= 1 - delta on a split of the calibration set, pick the
  # cheapest; nothing certified -> server-only. Risks: accuracy_drop (system
  # minus server-only error), degradation, system_error, edge_risk (Eq. 12 at
  # alpha_crc). Tests: exact (Berger-Boos, the three-valued drop's exact
  # p-value; the most certified on the demo population,
  # benchmarks/certificate_validity.py), wsr (betting), hb, binomial.
  c.certify = ml_collections.ConfigDict()
  c.certify.enabled = False
  c.certify.epsilon = 0.01
  c.certify.delta = 0.1
  c.certify.risks = ("accuracy_drop",)
  c.certify.test = "exact"
  c.certify.lambda_grid = tuple(round(0.05 * i, 2) for i in range(21)) + (1.01,)
  # Fraction of calibration images that fits q_hat and orders the grid; the
  # rest test. 0.3 certified the cheapest points in simulation (0.2-0.5: within
  # 0.006 of each other; benchmarks/certificate_validity.py).
  c.certify.split = 0.3
  # The taus the certificate searches; () = tau_grid. Each costs a server pass
  # over every calibration image, so drop taus that never certify cheaper.
  c.certify.tau_grid = ()
  # The codecs the certificate searches, a third axis with (lambda, tau); ()
  # = raw only. With more than one, certify.cost must be "bytes".
  c.certify.codec_grid = ()
  c.certify.seed = 0
  c.certify.cost = "patches"            # pick the cheapest certified pair by patches or bytes
  c.certify.multiple_testing = "pareto"  # or "bonferroni" over the whole grid
  c.gallery_size = 6
  c.per_image = False            # also write per_image.csv (one row per image and point)
  c.output_dir = "outputs/imagenet"
  c.progress = True
  return c
