"""The exported ONNX edge step against the Flax edge step: parity and speed.

For the demo edge (weights/demo_edge + weights/demo_edge.onnx) and for timm
efficientnet_b0 / tf_efficientnet_lite0 at random init with random BatchNorm
statistics (converted here, exported with the export venv's `rcst export`):

  * max |prob| and max |patch score| differences (ONNX Runtime vs `edge_step`),
    and every decision flip (accept, APS set, kept patches at each tau of the
    demo's grid) with its reference's margin to lambda_hat / q_hat / tau;
  * edge-step images/s at batch 1 and 16, ONNX Runtime vs JAX (and, with
    --torch, timm tuned as in bench_edge.py for efficientnet_b0), interleaved
    rounds, median and best round (see common.py).

  .venv/bin/python benchmarks/bench_onnx_edge.py [--n 6000] [--timm-n 256] [--repeats 7]
      [--calibration outputs/demo/calibration.json] [--torch] [--skip-timm] [--rounds]

Runs in the main venv (torch + timm + onnxruntime); the export venv
(.venv-export, jax2onnx, no torch) only exports, in a subprocess. Demo images:
SyntheticShapes('calibration', 2n/3, seed=0) + ('test', n/3, seed=0), 6,000 at --n 6000.
Kept sets at every tau are `select_threshold` applied in numpy to each side's
patch scores (one ONNX pass, not one per tau); the graph's own `keep` output is
checked against that rule at tau 0.5.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (tunes XLA:CPU before any JAX computation)
from machine import cpu_name  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from support import randomize_batchnorm  # noqa: E402  (the parity tests' own)

from rcst_jax.data.synthetic import SyntheticShapes  # noqa: E402
from rcst_jax.export import parity  # noqa: E402
from rcst_jax.inference import edge as edge_lib  # noqa: E402
from rcst_jax.models import checkpoints  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPORT_RCST = os.path.join(ROOT, ".venv-export", "bin", "rcst")
DEMO_EDGE, DEMO_ONNX = "weights/demo_edge", "weights/demo_edge.onnx"
DEMO_LAMBDA, DEMO_Q = 0.56, 0.976
TAUS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
TIMM_MODELS = ("efficientnet_b0", "tf_efficientnet_lite0")
CHUNK = 64
SHOW = 10  # flips listed per kind


# ------------------------------------------------------------------ models

def convert_random_timm(name: str, out: str) -> str:
  """A model directory of timm ``name`` at random init with random BN stats."""
  import timm
  import torch

  from rcst_jax.models.convert import convert_state_dict
  torch.manual_seed(0)
  tm = randomize_batchnorm(timm.create_model(name, pretrained=False).eval())
  sd = {k: v.detach().cpu().float().numpy() for k, v in tm.state_dict().items()}
  _, variables, meta = convert_state_dict(name, sd)
  meta["source"] = "timm random init, random BN stats (bench_onnx_edge.py)"
  return checkpoints.save_model(out, variables, meta)


def export_onnx(edge_dir: str, out: str) -> None:
  """`rcst export` in the export venv (jax2onnx lives there)."""
  r = subprocess.run([EXPORT_RCST, "export", "--edge", edge_dir, "--out", out, "--overwrite"],
                     capture_output=True, text=True, cwd=ROOT)
  if r.returncode:
    raise RuntimeError(f"rcst export {edge_dir} failed:\n{r.stderr[-2000:]}")


# ------------------------------------------------------------------ parity

def demo_images(n: int) -> np.ndarray:
  n_cal = round(n * 2 / 3)
  srcs = [SyntheticShapes("calibration", 4000, seed=0), SyntheticShapes("test", 2000, seed=0)]
  idx = [(srcs[0], i) for i in range(min(n_cal, 4000))]
  idx += [(srcs[1], i) for i in range(min(n - len(idx), 2000))]
  return np.stack([s[i].image for s, i in idx])


def run_both(edge, sess, images, lam, q, grid: int):
  """(Flax outputs, ONNX outputs) as numpy, CHUNK images at a time."""
  ref = edge_lib.edge_step_batched(edge, images, lam, q, layer="features", grid=grid,
                                   batch_size=CHUNK)
  parts = [parity.run_onnx(sess, images[s:s + CHUNK], lam, q, 0.5)
           for s in range(0, len(images), CHUNK)]
  got = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  return {k: np.asarray(v) for k, v in ref.items()}, got


def select_threshold(scores, tau):
  """numpy `selection.select_threshold` (Eqs. 24-25)."""
  keep = scores >= np.float32(tau)
  some = keep.any(-1, keepdims=True)
  top = np.arange(scores.shape[-1]) == scores.argmax(-1)[:, None]
  return (keep & some) | (top & ~some)


def decision_flips(ref, got, lam, q):
  """Lines describing every accept / APS / kept-set flip, with margins."""
  m = parity.margins(ref["probs"], ref["aps_size"], lam, q)
  lines, counts = [], {}
  acc = np.flatnonzero(ref["accept"] != got["accept"])
  counts["accept"] = len(acc)
  lines += [f"  accept flip img {i}: p_max ref {ref['p_max'][i]:.7f} onnx {got['p_max'][i]:.7f}"
            f" |p_max - lambda| {m['accept'][i]:.2e}" for i in acc[:SHOW]]
  aps = np.flatnonzero((ref["aps_mask"] != got["aps_mask"]).any(-1))
  counts["aps_set"] = len(aps)
  lines += [f"  APS flip img {i}: size ref {ref['aps_size'][i]} onnx {got['aps_size'][i]}"
            f" margin to q_hat {m['aps_size'][i]:.2e} (set edge {m['aps_mask'][i]:.2e})"
            for i in aps[:SHOW]]
  both_reject = ~ref["accept"] & ~got["accept"]
  for tau in TAUS:
    rs, gs = ref["patch_scores"], got["patch_scores"]
    diff = (select_threshold(rs, tau) != select_threshold(gs, tau)) & both_reject[:, None]
    imgs = np.flatnonzero(diff.any(-1))
    counts[f"keep@{tau}"] = len(imgs)
    for i in imgs[:SHOW]:
      p = np.flatnonzero(diff[i])
      fallback = not (rs[i] >= np.float32(tau)).any()
      lines.append(f"  keep flip tau {tau} img {i} patches {p.tolist()}: |score - tau| "
                   f"{np.abs(rs[i, p] - tau).min():.2e} (ref {rs[i, p].tolist()}, onnx "
                   f"{gs[i, p].tolist()})" + (" (argmax fallback)" if fallback else ""))
  graph_rule = select_threshold(got["patch_scores"], 0.5) & ~got["accept"][:, None]
  counts["graph_keep_vs_rule@0.5"] = int((graph_rule != got["keep"]).any(-1).sum())
  return counts, lines


def report_parity(name, edge, sess, images, lam, q, grid):
  ref, got = run_both(edge, sess, images, lam, q, grid)
  rep = parity.compare(ref, got, lam, q)
  counts, lines = decision_flips(ref, got, lam, q)
  print(f"\n[{name}] parity on {len(images)} images, lambda_hat {lam}, q_hat {q}")
  print(f"  max |prob| {rep['max_abs_probs']:.2e}  max |patch score| "
        f"{rep['max_abs_patch_scores']:.2e}  (cam {rep['max_abs_cam']:.2e}; cam/scores on "
        f"images whose APS sets agree)  pred differ {rep['pred_differ']} "
        f"untied {rep['pred_untied']}")
  print("  flips: " + " ".join(f"{k}={v}" for k, v in counts.items()))
  for line in lines:
    print(line)
  return rep


# ------------------------------------------------------------------ speed

def ort_timer(sess, images, lam, q):
  f32 = lambda v: np.asarray(v, np.float32)
  feed = {"images": np.ascontiguousarray(images), "lambda_hat": f32(lam), "q_hat": f32(q),
          "tau": f32(0.5)}
  names = [o.name for o in sess.get_outputs()]
  sess.run(names, feed)

  def run(inner):
    common.settle(lambda: sess.run(names, feed))
    t0 = time.perf_counter()
    for _ in range(inner):
      sess.run(names, feed)
    return (time.perf_counter() - t0) / inner
  return run


def time_model(name, edge, sess, lam, q, args, worker):
  import statistics
  for b in args.batches:
    imgs = np.random.default_rng(b).integers(0, 256, (b, 224, 224, 3), dtype=np.uint8)
    timers = {"onnxruntime": ort_timer(sess, imgs, lam, q),
              "jax": common.jax_timer(lambda im: edge_lib.edge_step(edge, im, lam, q), imgs)}
    if worker is not None:
      worker.prepare("edge", b)
      timers["timm tuned"] = worker.timer("edge", b)
    samples = common.interleaved(timers, args.repeats, common.inner_for(b, args.inner))
    if worker is not None:
      worker.drop("edge", b)
    for label, f in (("median", statistics.median), ("best", min)):
      ips = {k: b / f(s) for k, s in samples.items()}
      tt = f"{ips['timm tuned']:>10.1f}" if "timm tuned" in ips else f"{'-':>10}"
      print(f"{name:<24} {label:<6} {b:>5} {ips['onnxruntime']:>11.1f} {ips['jax']:>9.1f} "
            f"{tt} {ips['onnxruntime'] / ips['jax']:>8.2f}x", flush=True)
    if args.rounds:
      for k, s in samples.items():
        print(f"    rounds, {k}: " + " ".join(f"{b / t:.1f}" for t in s))


SPEED_HEADER = (f"{'model (img/s)':<24} {'round':<6} {'batch':>5} {'onnxruntime':>11} "
                f"{'jax':>9} {'timm tuned':>10} {'ort/jax':>9}")


# ------------------------------------------------------------------ main

def models(args, tmp):
  """(name, edge dir, onnx path, lambda_hat, q_hat, images) per model."""
  lam, q = DEMO_LAMBDA, DEMO_Q
  if args.calibration:
    with open(args.calibration) as f:
      cal = json.load(f)
    lam, q = float(cal["lambda_hat"]), float(cal["q_hat"])
  yield "demo_edge", DEMO_EDGE, DEMO_ONNX, lam, q, demo_images(args.n)
  if args.skip_timm:
    return
  rng = np.random.default_rng(0)
  for name in TIMM_MODELS:
    d, onnx = os.path.join(tmp, name), os.path.join(tmp, name + ".onnx")
    convert_random_timm(name, d)
    export_onnx(d, onnx)
    imgs = rng.integers(0, 256, (args.timm_n, 224, 224, 3), dtype=np.uint8)
    yield name, d, onnx, lam, q, imgs


def start_torch(args):
  if not args.torch:
    return None, "timm tuned: skipped (pass --torch; timed for efficientnet_b0 only)"
  from torch_worker import tuned_env
  env, why = tuned_env()
  if env is None:
    return None, f"timm tuned: skipped ({why})"
  return common.TorchWorker("tuned", env), "timm tuned: bench_edge.py's tuned worker (b0)"


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--n", type=int, default=6000, help="demo parity images (6000: all)")
  p.add_argument("--timm-n", type=int, default=256, help="parity images per timm model")
  p.add_argument("--calibration", help="calibration.json with lambda_hat and q_hat")
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--inner", type=int, default=0)
  p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
  p.add_argument("--torch", action="store_true", help="also time timm tuned (b0)")
  p.add_argument("--skip-timm", action="store_true")
  p.add_argument("--rounds", action="store_true")
  args = p.parse_args()
  import jax
  import onnxruntime
  worker, note = start_torch(args)
  print(f"cpu: {cpu_name()} ({os.cpu_count()} cpus) jax={jax.__version__} "
        f"onnxruntime={onnxruntime.__version__} repeats={args.repeats} "
        f"inner={args.inner or 'auto'} settle={common.SETTLE_S}s; {note}", flush=True)
  speed = []
  try:
    with tempfile.TemporaryDirectory() as tmp:
      for name, d, onnx, lam, q, imgs in models(args, tmp):
        edge, sess = checkpoints.load_model(d), parity.session(onnx)
        report_parity(name, edge, sess, imgs, lam, q, grid=imgs.shape[1] // 16)
        speed.append((name, edge, sess, lam, q))
      print("\n" + SPEED_HEADER)
      for name, edge, sess, lam, q in speed:
        w = worker if name == "efficientnet_b0" else None
        time_model(name, edge, sess, lam, q, args, w)
  finally:
    if worker is not None:
      worker.close()


if __name__ == "__main__":
  main()
