"""The `rcst` command line's arguments, and `main`, which runs the chosen
command (`commands`; `serve` for the networked ones) and turns an expected
failure into one line on stderr and an exit code.
"""

from __future__ import annotations

import argparse
import sys

from rcst_edge import errors
from rcst_jax import __version__
from rcst_jax.cli import argtypes, commands, serve
from rcst_jax.core import compile_cache, xla_cpu

DESCRIPTION = "The `rcst` command line: a thin layer over the library."


def _add_model_commands(sub) -> None:
  p = sub.add_parser("convert", help="convert a timm checkpoint to Flax/orbax")
  p.add_argument("--timm", required=True, help="timm model name, optionally .tag")
  p.add_argument("--weights", help=".safetensors or torch state dict (weights_only)")
  p.add_argument("--out", required=True, help="output model directory")
  p.add_argument("--num-classes", type=int, default=None)
  p.add_argument("--overwrite", action="store_true")
  p.set_defaults(func=commands.convert)

  p = sub.add_parser("predict", help="top-5 predictions for image files, JSON lines")
  p.add_argument("--model", required=True, help="model directory")
  p.add_argument("--batch-size", type=argtypes.positive_int, default=16)
  p.add_argument("images", nargs="+")
  p.set_defaults(func=commands.predict)

  p = sub.add_parser("export", help="the edge step (softmax, acceptance, APS set, Grad-CAM, "
                                    "patch scores) as one ONNX file; needs the export venv "
                                    "(make export-env)")
  p.add_argument("--edge", required=True, help="edge model directory (an EfficientNet)")
  p.add_argument("--out", required=True, help="output .onnx file")
  p.add_argument("--patch", type=argtypes.positive_int, default=16,
                 help="the server's patch size: patch scores on an (image size / patch)^2 "
                      "grid (default 16)")
  p.add_argument("--layer", default="features", help="Grad-CAM layer (default features)")
  p.add_argument("--int8", metavar="IMAGES",
                 help="also quantise the convolutions to int8 (ONNX Runtime static "
                      "quantisation), with activation ranges from IMAGES: a directory of "
                      "image files or synthetic:N; --out is then the int8 file")
  p.add_argument("--check", type=argtypes.int_in(0, 4096), default=0, metavar="N",
                 help="then run the file with ONNX Runtime against the Flax edge on N "
                      "generated demo images and print the largest differences")
  p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
  p.set_defaults(func=commands.export)


def _add_config_commands(sub) -> None:
  for name, func, text, default, what in (
      ("evaluate", commands.evaluate, "calibrate + sweep every method, write tables/figures",
       None, "ml_collections config file; then --config.x=y overrides"),
      ("train", commands.train, "train the demo models on the synthetic data (CPU)", None,
       "e.g. configs/demo_train.py; then --config.x=y"),
      ("demo", commands.demo, "the full evaluation on the embedded synthetic demo", "demo",
       "demo, demo:smoke, demo:quick=N or a file"),
      ("calibrate", commands.calibrate, "Algorithm 1: write the calibration JSON", None,
       "a config name or file; then --config.x=y")):
    p = sub.add_parser(name, help=text)
    p.add_argument("--config", required=default is None and name != "calibrate",
                   default=default, help=what)
    if name == "calibrate":
      p.add_argument("--out", help="calibration JSON path (default: <output_dir>/calibration.json)")
      p.add_argument("--verify", metavar="FILE",
                     help="recompute the calibration FILE records (its certificate's request) "
                          "from the config's data and models; exit 2 if anything differs")
      p.add_argument("--reseal", metavar="FILE",
                     help="vouch for a calibration FILE edited on purpose: seal it anew and "
                          "record the fields that changed (no --config; run and explain then "
                          "warn that no guarantee applies to them)")
    if name != "train":
      p.add_argument("--overwrite", action="store_true",
                     help="replace outputs rcst wrote even if they changed since (rcst never "
                          "replaces files it did not write)")
    p.set_defaults(func=func, takes_overrides=True)
  p = sub.add_parser("configs", help="list the shipped configs and their variants")
  p.set_defaults(func=commands.configs)


def _add_run_commands(sub) -> None:
  tau_help = ("patch threshold; default: the calibration's certified (lambda, tau), the "
              "same for run and explain")
  p = sub.add_parser("run", help="Algorithm 2 on image files: per-image decisions, JSON lines")
  p.add_argument("--server", required=True,
                 help="the server model directory (in this process), or HOST:PORT of a "
                      "`rcst serve`")
  p.add_argument("--deadline", type=argtypes.positive_float, default=10.0,
                 help="seconds per attempt of a call to a remote server (default 10)")
  p.add_argument("--retries", type=argtypes.int_in(0, 10), default=3,
                 help="retries of a call a remote server did not answer, 0..10 (default 3), "
                      "after 0.25 s x 2^attempt capped at 2 s, half of it random")
  p.add_argument("--call-budget", type=argtypes.float_in(0, 600, low_open=True), default=20.0,
                 help="seconds a call to a remote server may take, retries and pauses "
                      "included, in (0, 600] (default 20)")
  p.add_argument("--down-for", type=argtypes.float_in(0, 3600), default=30.0,
                 help="seconds a remote server found down is not called again, 0..3600 "
                      "(default 30): meanwhile offloaded images keep the edge's prediction "
                      "at once, marked server_unreachable")
  p.add_argument("--on-server-error", choices=("edge", "fail"), default="edge",
                 help="an unreachable server, or one answering from other weights: keep "
                      "the edge's prediction, marked server_unreachable or "
                      "server_other_weights (default), or stop with an error")
  p.add_argument("--send", choices=("each", "batch"), default="each",
                 help="a remote server: one call per offloaded image (default; each image's "
                      "own wire bytes and round trip), or one call per --batch-size images "
                      "(the call's bytes shared among them by size; less framing and server "
                      "CPU per image)")
  p.add_argument("--meter", action="store_true",
                 help="a remote server: count each request's bytes on the wire through a "
                      "loopback relay, printed as wire_bytes_up/down per image; for "
                      "measurements (each byte crosses two more sockets)")
  p.add_argument("--codec", type=argtypes.codec, default=None,
                 help="how the kept patches are coded: raw, zstd, webp-lossless, jpeg:Q, "
                      "jpeg420:Q; default: the certified codec (raw with --tau)")
  p.add_argument("images", nargs="+")
  p.set_defaults(func=commands.run)
  q = sub.add_parser("explain", help="PNG: image, APS set, Grad-CAM, patches that would be sent")
  q.add_argument("--out", required=True, help="output PNG")
  q.add_argument("image")
  q.set_defaults(func=commands.explain)
  for p in (p, q):
    p.add_argument("--batch-size", type=argtypes.positive_int, default=16,
                   help="images per edge/server call (explain pads to it, as run does)")
    p.add_argument("--edge", required=True)
    p.add_argument("--calibration", required=True)
    p.add_argument("--tau", type=argtypes.unit_float, default=None, help=tau_help)
    p.add_argument("--allow-other-weights", action="store_true",
                   help="use a calibration made for other weights, and a remote server's "
                        "answers from other weights (no guarantee)")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="rcst", description=DESCRIPTION)
  parser.add_argument("--version", action="version", version=f"rcst_jax {__version__}")
  sub = parser.add_subparsers(dest="command", required=True)
  _add_model_commands(sub)
  _add_config_commands(sub)
  _add_run_commands(sub)
  serve.add_serve_command(sub)
  return parser


def main(argv=None) -> int:
  """Exit codes: 0 ok, 1 some items failed (each reported), 2 refused or failed
  with a reason (one line on stderr, no traceback), 130 interrupted. Any other
  exception is a bug and keeps its traceback."""
  xla_cpu.tune()  # before any computation starts a backend
  compile_cache.enable()
  for stream in (sys.stdout, sys.stderr):  # file names need not be UTF-8: never crash on one
    getattr(stream, "reconfigure", lambda **k: None)(errors="backslashreplace")
  args, extra = build_parser().parse_known_args(argv)
  if extra and not getattr(args, "takes_overrides", False):
    build_parser().error(f"unrecognized arguments: {' '.join(extra)}")
  try:
    return args.func(args, extra) or 0
  except KeyboardInterrupt:
    print(f"\nrcst {args.command}: interrupted; rerun to resume", file=sys.stderr)
    return 130
  except Exception as e:
    if not errors.is_expected(e):
      raise
    print(f"rcst {args.command}: error: {errors.describe(e)}", file=sys.stderr)
    return 2
