"""rcst_jax on ImageNet in Colab: the source of colab/rcst_imagenet.ipynb.

Percent format; build the notebook with `python colab/build_notebook.py`.
"""


# %% [markdown] id=intro
# # Risk-calibrated semantic transmission on ImageNet (JAX, Colab TPU)
#
# This notebook reproduces the ImageNet experiment of *risk-calibrated semantic
# transmission* with `rcst_jax`, a JAX/Flax reimplementation.
#
# **The method.** An **EfficientNet-B0** on the edge device classifies each
# image. **Conformal Risk Control (CRC)** calibrates an acceptance threshold
# `lambda_hat` on the edge's top-1 probability, so that the rate of *accepted
# but wrong* edge predictions stays below `alpha_crc = 0.05`. Images that are
# not accepted are offloaded: **Adaptive Prediction Sets (APS)**, calibrated at
# `alpha_aps = 0.05`, give the set of plausible classes, **Grad-CAM** for those
# classes scores the 14 x 14 patches, and only patches scoring at least `tau`
# are sent to a **DeiT-Base** server, which classifies the image from the sent
# tokens alone. Sweeping `tau` traces the accuracy / communication-cost curve.
# The baselines (Random, Top-K and Attention-Sum patch selection, Im et al.
# 2024) use a **DeiT-Tiny** edge with a min-entropy acceptance rule.
#
# **What runs here.** The paper's exact setting (`configs/imagenet.py`): the
# 50,000 ImageNet-1k validation images split at random into 10,000 for
# calibration and 40,000 for test; pretrained timm weights
# (`efficientnet_b0.ra_in1k`, `deit_base_patch16_224.fb_in1k`,
# `deit_tiny_patch16_224.fb_in1k`) converted to Flax; every method swept over
# its threshold grid. Outputs: Table 1, Table 2, Figure 1, Figure 2, a Grad-CAM
# gallery, the calibration (`lambda_hat`, `q_hat`) and the empirical edge risk.
#
# **The paper's numbers** (quoted from the paper, *not* produced by this notebook):
#
# | Setting (paper, Table 1) | Communication cost | Top-1 accuracy |
# |---|---|---|
# | Server-only DeiT-Base | 1.00 | 81.80 % |
# | Proposed, best accuracy | 0.33 | 81.60 % |
# | Proposed, within 1 pp of server-only | 0.26 | 81.05 % |
#
# Your run's numbers appear in the results section next to these. Small
# differences are expected (timm weights and JPEG decoding versions, the random
# 10k/40k split, TPU matrix-multiply precision).
#
# **Run time** (estimates, not measurements; they depend on the TPU type and
# the host CPU): installation and weight conversion about 5-10 min; the one-time
# ImageNet build from `ILSVRC2012_img_val.tar` about 30-60 min; the evaluation
# roughly 1-3 h, mostly JPEG decoding on the host and the DeiT-Base server
# passes over all operating points. Everything that is slow is stored in
# `WORKDIR` on Google Drive: after a disconnect, run the notebook again from the
# top and it resumes where it stopped (converted models are kept, finished
# evaluation chunks are read from the cache).
#
# Use a TPU runtime: *Runtime > Change runtime type > TPU*. Then set
# `REPO_URL` below and *Runtime > Run all*.


# %% [markdown] id=settings-md
# ## Settings
#
# Set `REPO_URL`; the defaults reproduce the paper. `WORKDIR` on Google
# Drive keeps converted models, the dataset and the evaluation cache
# across sessions.


# %% id=settings
import os
import sys
import tempfile

# RCST_SMOKE=1: the project's CI smoke test (tests/system/test_notebook.py) -- random
# weights, tfds mock data, tiny grids, no Drive, no installation. Leave it unset.
SMOKE = os.environ.get("RCST_SMOKE") == "1"

# Git URL of the rcst_jax project (your fork or copy of it). The notebook
# installs it (configs and demo models are inside the package).
# For a private repository use https://<token>@github.com/<owner>/<repo>.git
REPO_URL = "https://github.com/YOUR-ACCOUNT/rcst_jax.git"  # <- set this
# True: clone to REPO_DIR and install it editable (to read or change the code);
# False: pip install straight from REPO_URL, no clone.
CLONE = False
REPO_DIR = os.environ.get("RCST_REPO_DIR") or (os.getcwd() if SMOKE else "/content/rcst_jax")

# Converted checkpoints, the ImageNet files and the evaluation cache live here.
# On Google Drive, a disconnect costs nothing: rerun from the top to resume.
WORKDIR = os.environ.get("RCST_WORKDIR") or (
    tempfile.mkdtemp(prefix="rcst_smoke_") if SMOKE else "/content/drive/MyDrive/rcst")
MODELS_DIR = os.path.join(WORKDIR, "models")
DATA_DIR = os.path.join(WORKDIR, "tensorflow_datasets")  # tfds data_dir

# "imagenet2012": the paper's data (manual download, see below).
# "imagenet_v2": automatic fallback (10,000 images, downloaded by tfds); its
# numbers are NOT comparable to the paper's (ImageNet-V2 is harder).
DATASET = "imagenet2012"

# >0: evaluate only the first QUICK_LOOK images (a fifth calibrates) to check
# the whole pipeline in a few minutes before the full run. 0: the paper's run.
QUICK_LOOK = 0

# Colab's TPU runtime ships a working jax. Set True only if the devices cell
# below shows no TPU; then restart the session (Runtime > Restart session).
UPGRADE_JAX_TPU = False

print(f"SMOKE={SMOKE}\nREPO_DIR={REPO_DIR}\nWORKDIR={WORKDIR}\nDATASET={DATASET}")


# %% [markdown] id=install-md
# ## Installation
#
# Mounts Drive, clones the project to `REPO_DIR` and installs it with the
# `convert` extra (torch + timm, for the weight conversion). If pip
# reports that it upgraded `jax` or `numpy`, restart the session and run
# all again (the steps are idempotent).


# %% id=install
import subprocess


def sh(cmd):
  """Runs a shell command, echoing it; fails the cell on a non-zero exit."""
  print("$", cmd, flush=True)
  subprocess.run(cmd, shell=True, check=True)


if SMOKE:
  print("smoke mode: rcst_jax is already importable; no Drive, no pip")
else:
  if WORKDIR.startswith("/content/drive"):
    from google.colab import drive
    drive.mount("/content/drive")
  if "YOUR-ACCOUNT" in REPO_URL:
    raise ValueError("Set REPO_URL in the settings cell to the Git URL of rcst_jax.")
  if CLONE:
    if not os.path.isdir(os.path.join(REPO_DIR, ".git")):
      sh(f"git clone --depth 1 {REPO_URL} {REPO_DIR}")
    sh(f'pip install -q -e "{REPO_DIR}[convert]"')
    sh(f"git -C {REPO_DIR} log -1 --format='rcst_jax commit %H (%cd)'")
  else:
    sh(f'pip install -q "rcst_jax[convert] @ git+{REPO_URL}"')
  if UPGRADE_JAX_TPU:
    sh('pip install -q -U "jax[tpu]"')
    print("jax upgraded: Runtime > Restart session, then run all again")

if CLONE and REPO_DIR not in sys.path:  # an editable install is only seen after a restart
  sys.path.insert(0, REPO_DIR)
os.makedirs(WORKDIR, exist_ok=True)
import rcst_jax
from rcst_jax.core import xla_cpu

xla_cpu.tune()  # the `rcst` command's XLA:CPU settings; must precede any computation
print("rcst_jax from", os.path.dirname(rcst_jax.__file__))


# %% id=devices
import jax

print("python :", sys.executable)
print("jax    :", jax.__version__, "| backend:", jax.default_backend())
print("devices:", jax.devices())
if not SMOKE and jax.default_backend() != "tpu":
  print("WARNING: no TPU. Runtime > Change runtime type > TPU (or UPGRADE_JAX_TPU=True).")


# %% [markdown] id=convert-md
# ## Models
#
# `rcst convert` loads the pretrained timm checkpoint (downloaded from the
# Hugging Face hub by timm, so it needs internet), converts it strictly to Flax
# and writes an orbax model directory under `WORKDIR/models/<name>`. A directory
# that exists is kept, so a rerun skips this step.
#
# In smoke mode the same conversion runs on *random* weights written as
# `.safetensors` (`rcst convert --weights`), and DeiT-Tiny stands in for the
# DeiT-Base server so that the CPU test stays fast.


# %% id=convert
import json

from rcst_jax import cli

EDGE = "efficientnet_b0.ra_in1k"                # proposed edge
SERVER = "deit_base_patch16_224.fb_in1k"        # server
BASELINE_EDGE = "deit_tiny_patch16_224.fb_in1k"  # baselines' edge (Im et al.)
if SMOKE:
  SERVER = BASELINE_EDGE  # smoke only: DeiT-Tiny as the server (speed on CPU)


def random_weights(name):
  """Smoke mode: a timm model at random init, saved as .safetensors."""
  import timm
  import torch
  from safetensors.torch import save_file
  torch.manual_seed(0)
  model = timm.create_model(name, pretrained=False)
  path = os.path.join(WORKDIR, "random_weights", name + ".safetensors")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
  return path


for name in dict.fromkeys([EDGE, SERVER, BASELINE_EDGE]):
  out = os.path.join(MODELS_DIR, name)
  if os.path.exists(os.path.join(out, "metadata.json")):
    print(f"{name}: already converted in {out}")
    continue
  args = ["convert", "--timm", name, "--out", out]  # = `rcst convert --timm ... --out ...`
  if SMOKE:
    args += ["--weights", random_weights(name)]
  if cli.main(args) != 0:
    raise RuntimeError(f"rcst convert failed for {name}")

for name in dict.fromkeys([EDGE, SERVER, BASELINE_EDGE]):
  meta = json.load(open(os.path.join(MODELS_DIR, name, "metadata.json")))
  print(f"{name}: {meta['family']}, {meta['num_classes']} classes, "
        f"input {meta['input_size']}, source {meta['source']}")


# %% [markdown] id=data-md
# ## Data
#
# **ImageNet-1k validation (the paper's data)** needs a one-time manual download,
# because ImageNet's licence does not allow automatic downloads:
#
# 1. Make a free account at [image-net.org](https://image-net.org/download-images),
#    then download `ILSVRC2012_img_val.tar` (6.3 GB, under *ILSVRC2012*). The
#    138 GB training tar is not needed.
# 2. Upload it to Google Drive as
#    `MyDrive/rcst/tensorflow_datasets/downloads/manual/ILSVRC2012_img_val.tar`,
#    i.e. `<DATA_DIR>/downloads/manual/ILSVRC2012_img_val.tar`.
# 3. The next cell builds the dataset once, as ArrayRecord (random access, so
#    the evaluation can resume at any chunk):
#    `tfds build imagenet2012 --data_dir=<DATA_DIR> --file_format=array_record`.
#    The result stays on Drive; later sessions skip this step.
#
# **Fallback: ImageNet-V2.** If the tar is not there, the next cell switches to
# `DATASET = "imagenet_v2"` (matched-frequency, 10,000 images, downloaded
# automatically by `tfds build imagenet_v2/matched-frequency`), calibrating on
# 2,000 and testing on 8,000 images. This checks the whole pipeline on real
# images, but its accuracies are several points lower than ImageNet's and are
# not comparable to the paper's. Set `DATASET = "imagenet_v2"` in the settings
# cell to choose it on purpose.
#
# In smoke mode the evaluation reads `tfds.testing.mock_data` instead (random
# images, decoded by tfds, hence `data.pil_decode=False`).


# %% id=data
import contextlib

from rcst_jax.data import imagenet as imagenet_data

SMOKE_EXAMPLES = 40  # smoke mode: 24 calibrate (CRC needs n >= 1/alpha - 1), 16 test


def prepared(dataset):
  """True when tfds can open `dataset` as ArrayRecord under DATA_DIR."""
  try:
    if dataset == "imagenet2012":
      imagenet_data.imagenet2012("validation", data_dir=DATA_DIR)
    else:
      imagenet_data.imagenet_v2(data_dir=DATA_DIR)
    return True
  except FileNotFoundError:
    return False


def data_context():
  """Wraps the evaluation: tfds mock data in smoke mode, else nothing."""
  if SMOKE:
    import tensorflow_datasets as tfds
    return tfds.testing.mock_data(num_examples=SMOKE_EXAMPLES)
  return contextlib.nullcontext()


def tfds_cli():
  """`tfds build` needs TensorFlow (reading does not): this runtime's, if it has
  it, else a separate virtualenv, so the kernel's jax/numpy stay untouched."""
  import importlib.util
  if importlib.util.find_spec("tensorflow") is not None:
    return "tfds"
  venv = "/content/tfds_build"
  if not os.path.exists(f"{venv}/bin/tfds"):
    sh(f"python -m venv {venv} && {venv}/bin/pip install -q tensorflow-cpu "
       "tensorflow-datasets array_record")
  return f"{venv}/bin/tfds"


if SMOKE:
  with data_context():
    assert prepared(DATASET)
  print(f"smoke mode: tfds mock data, {SMOKE_EXAMPLES} random images")
else:
  if DATASET == "imagenet2012" and not prepared("imagenet2012"):
    tar = os.path.join(DATA_DIR, "downloads", "manual", "ILSVRC2012_img_val.tar")
    if os.path.exists(tar):
      sh(f"{tfds_cli()} build imagenet2012 --data_dir={DATA_DIR} --file_format=array_record")
    else:
      print(f"{tar} not found: falling back to ImageNet-V2 "
            "(NOT the paper's data; see the steps above)")
      DATASET = "imagenet_v2"
  if DATASET == "imagenet_v2" and not prepared("imagenet_v2"):
    sh(f"{tfds_cli()} build imagenet_v2/matched-frequency --data_dir={DATA_DIR} "
       "--file_format=array_record")
  if not prepared(DATASET):
    raise RuntimeError(f"{DATASET} is not prepared under {DATA_DIR}")
  print(f"{DATASET} ready under {DATA_DIR}")


# %% [markdown] id=evaluate-md
# ## Evaluation
#
# `configs/imagenet.py` is the paper's setting; the overrides below only point
# it at `WORKDIR` and the chosen data. The run is chunked: each finished chunk
# of test images is written to `<output_dir>/cache/<fingerprint>/`, and a rerun
# skips finished chunks. The fingerprint covers the config, the model weights
# and the data, so a changed setting never reuses a stale cache. This is the
# same as `rcst evaluate --config configs/imagenet.py --config.models_dir=...`.


# %% id=evaluate
import time

from rcst_jax.cli import parse_config
from rcst_jax.jobs.evaluate import evaluate_config

OUTPUT_DIR = os.path.join(WORKDIR, "imagenet" if DATASET == "imagenet2012" else DATASET)
if QUICK_LOOK:
  OUTPUT_DIR += f"_quick{QUICK_LOOK}"  # keeps the full run's tables apart
overrides = [
    f"--config.models_dir={MODELS_DIR}",
    f"--config.output_dir={OUTPUT_DIR}",
    f"--config.edge={EDGE}",
    f"--config.server={SERVER}",
    f"--config.baseline_edge={BASELINE_EDGE}",
    f"--config.data.name={DATASET}",
]
if not SMOKE:
  overrides.append(f"--config.data.data_dir={DATA_DIR}")
if DATASET == "imagenet_v2" and not QUICK_LOOK:
  overrides.append("--config.data.n_cal=2000")  # 2k / 8k, the paper's 1:4 ratio

# Variants of configs/imagenet.py (`rcst configs` lists them): the paper's
# setting, quick=N (first N images) or smoke (tiny, for the CPU test).
variant = "smoke" if SMOKE else (f"quick={QUICK_LOOK}" if QUICK_LOOK else "")
config = parse_config(f"imagenet:{variant}" if variant else "imagenet", overrides)
print(config)

t0 = time.time()
with data_context():
  out = evaluate_config(config)
paths, result = out["paths"], out["result"]
print(f"finished in {time.time() - t0:.0f} s; {result['chunks_computed']} chunks computed "
      f"now (the rest from the cache); outputs in {OUTPUT_DIR}")
if result["skipped"]:
  print("skipped items:", result["skipped"])


# %% [markdown] id=results-md
# ## Results
#
# Table 1: accuracy and communication cost (patch-count ratio, as in the paper)
# at each method's best-accuracy point and at its cheapest point within 1 pp of
# server-only. Table 2: upload latency at 1, 8 and 20 Mb/s (the paper's
# convention: a full image is 147 KB).


# %% id=tables
from IPython.display import Image, Markdown, display

from rcst_jax.report import tables

display(Markdown("### Table 1 (this run)\n\n" + open(paths["table1.md"]).read()))
display(Markdown("### Table 2 (this run)\n\n" + open(paths["table2.md"]).read()))

# This run next to the paper's numbers (quoted in `tables.PAPER_TABLE1`, not recomputed).
display(Markdown("### Paper vs. this run\n\n" + tables.paper_comparison_markdown(result["points"])))


# %% id=figures
display(Markdown("### Figure 1: accuracy vs. communication cost"))
display(Image(filename=paths["figure1"]))
display(Markdown("### Figure 2: upload latency at the representative points"))
display(Image(filename=paths["figure2"]))
if "gallery" in paths:
  display(Markdown("### Grad-CAM gallery: APS set, saliency and the patches sent"))
  display(Image(filename=paths["gallery"]))


# %% id=calibration
cal = result["calibration"]
print(f"lambda_hat = {cal.lambda_hat:.6g}  (CRC, alpha_crc = {cal.alpha_crc}, "
      f"satisfiable: {cal.lambda_valid}): the edge accepts when p_max >= lambda_hat")
print(f"q_hat      = {cal.q_hat:.6g}  (APS, alpha_aps = {cal.alpha_aps})")
print(f"calibration images: {cal.n}; test images: {result['points'][0]['n']}")

# Empirical edge risk on the test set: the fraction of test images accepted on
# the edge AND misclassified. CRC bounds its expectation by alpha_crc (over
# draws of the calibration set), so one run may exceed alpha slightly.
pick = lambda m: next(p for p in result["points"] if p["method"] == m)
prop, base, edge = pick("proposed"), pick("attention_sum"), pick("edge_only")
ok = lambda risk, bound: "yes" if risk <= bound else "no"
rows = ["| Edge | acceptance rule | edge risk | bound | within bound | offload rate |",
        "|---|---|---|---|---|---|",
        f"| EfficientNet-B0 (proposed) | CRC, p_max >= lambda_hat | {prop['edge_risk']:.4f} "
        f"| alpha_crc = {cal.alpha_crc} | {ok(prop['edge_risk'], cal.alpha_crc)} "
        f"| {prop['offload_rate']:.3f} |",
        f"| DeiT-Tiny (baselines) | -log2 p_max < eta = {config.eta} bits | "
        f"{base['edge_risk']:.4f} | none | - | {base['offload_rate']:.3f} |",
        f"| EfficientNet-B0 alone | accept all | {edge['edge_risk']:.4f} | none | - | 0 |"]
display(Markdown("### Calibration and empirical edge risk\n\n" + "\n".join(rows)))
print(f"APS coverage on test: {prop['aps_coverage']:.4f} (target >= {1 - cal.alpha_aps:.2f}), "
      f"mean APS set size {prop['aps_set_size']:.2f}")
print("outputs:")
for name, path in sorted(paths.items()):
  print(f"  {name:>16}: {path}")


# %% [markdown] id=api-md
# ## Algorithm 2 on your own images: the Python API
#
# The five names of `rcst_jax` (README, "Python API") run one image at a time
# what the evaluation ran in bulk: the calibration file this run wrote hands out
# the operating point (the certified pair when there is one), and
# `collaborative_inference` is Algorithm 2. The cell checks that `rcst run`
# decides the same for the same files. Put your own image paths in
# `MY_IMAGES`; by default it writes four generated scenes.


# %% id=api
import glob  # noqa: F401  (for MY_IMAGES)
import io

import numpy as np
from PIL import Image as PILImage

from rcst_jax.data.sources import transform_from_record
from rcst_jax.data.synthetic import SyntheticShapes

MY_IMAGES = []  # e.g. glob.glob("/content/drive/MyDrive/photos/*.jpg")
if not MY_IMAGES:
  scenes = SyntheticShapes("test", 4, seed=11)
  os.makedirs(os.path.join(WORKDIR, "api_images"), exist_ok=True)
  for i in range(4):
    MY_IMAGES.append(os.path.join(WORKDIR, "api_images", f"{i}.png"))
    PILImage.fromarray(scenes[i].image).save(MY_IMAGES[-1])

calibration = rcst_jax.Calibration.from_json(paths["calibration"])
edge_model = rcst_jax.load_model(os.path.join(MODELS_DIR, EDGE))
server_model = rcst_jax.load_model(os.path.join(MODELS_DIR, SERVER))
certified = calibration.certificate is not None and calibration.certificate["certified"]
TAU = None if certified else 0.5  # no certified pair: the CRC lambda at an explicit tau
point = calibration.operating_point(tau=TAU)
transform = transform_from_record(calibration.transform, edge_model.metadata)
images = np.stack([transform(p) for p in MY_IMAGES])
res = rcst_jax.collaborative_inference(images, edge_model, server_model, point,
                                       layer=calibration.gradcam_layer or "features")
print(f"operating point: {point}")
for path, pred, accepted, nbytes in zip(MY_IMAGES, res["pred"], res["accepted"], res["bytes"]):
  print(f"{os.path.basename(path)}: class {int(pred)}, "
        f"{'answered on the edge' if accepted else f'{int(nbytes)} bytes sent'}")

buf = io.StringIO()
with contextlib.redirect_stdout(buf):
  args = ["run", "--edge", os.path.join(MODELS_DIR, EDGE), "--server",
          os.path.join(MODELS_DIR, SERVER), "--calibration", paths["calibration"], *MY_IMAGES]
  assert cli.main(args + (["--tau", str(TAU)] if TAU is not None else [])) == 0
lines = [json.loads(line) for line in buf.getvalue().splitlines() if line.startswith("{")]
same = [(r["prediction"], r["accepted_on_edge"], r["bytes_sent"]) for r in lines] == [
    (int(p), bool(a), int(b)) for p, a, b in zip(res["pred"], res["accepted"], res["bytes"])]
print("API", json.dumps({"same_as_rcst_run": same, "n": len(lines)}))
