"""The `rcst` command line: a thin layer over the library."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import numpy as np

from rcst_jax import __version__
from rcst_jax.calibration.artifact import Calibration
from rcst_jax.cli import argtypes
from rcst_jax.cli import serve as networked
from rcst_jax.core import errors, xla_cpu
from rcst_jax.core.fileio import dumps
from rcst_jax.data.preprocess import BadItemError
from rcst_jax.data.sources import transform_from_record
from rcst_jax.inference.collaborative import collaborative_inference
from rcst_jax.jobs.evaluate import calibrate_config, evaluate_config, verify_calibration
from rcst_jax.jobs.train import train_demo
from rcst_jax.models.checkpoints import load_model
from rcst_jax.models.predict import class_names_for, predict_files
from rcst_jax.report import explain, plots
from rcst_jax.settings import files
from rcst_jax.settings.schema import validate


def _cmd_convert(args, extra):
  # torch and timm are the optional [convert] extra: imported only when asked for.
  from rcst_jax.models.convert import convert
  out = convert(args.timm, args.out, weights=args.weights,
                num_classes=args.num_classes, overwrite=args.overwrite)
  print(dumps({"converted": args.timm, "out": out}))


def _cmd_predict(args, extra):
  model = load_model(args.model)
  failures = 0
  for record in predict_files(model, args.images, batch_size=args.batch_size):
    if "error" in record:
      failures += 1
      print(f"rcst predict: error: {record['error']}", file=sys.stderr, flush=True)
    print(dumps(record), flush=True)
  if failures:
    print(f"rcst predict: {failures} of {len(args.images)} images failed", file=sys.stderr)
  return 1 if failures else 0


def parse_config(spec: str, overrides: list[str], check: bool = True):
  """A config by name or path (`demo:smoke`, `configs/imagenet.py`) + `--config.x=y`,
  checked against the evaluation schema (config.schema) before anything runs."""
  config = files.parse(spec, overrides)
  if check:
    validate(config)
  return config


def _cmd_configs(args, extra):
  for name in files.names():
    for arg, what in files.variants(name).items():
      print(f"{name + (':' + arg if arg else ''):<24} {what}")


def _cmd_train(args, extra):
  train_demo(parse_config(args.config, extra, check=False))  # the trainer's own keys


def _cmd_evaluate(args, extra):
  _print_run(evaluate_config(parse_config(args.config, extra), overwrite=args.overwrite))


def _cmd_demo(args, extra):
  t0 = time.time()
  config = parse_config(args.config, extra)
  _print_run(evaluate_config(config, overwrite=args.overwrite))
  print(f"demo finished in {time.time() - t0:.0f} s; outputs in "
        f"{os.path.abspath(config.output_dir)}")


def _print_run(out):
  if not out:
    return
  paths, result = out["paths"], out["result"]
  cal = result["calibration"]
  print(f"calibration: lambda_hat={cal.lambda_hat:.6g} q_hat={cal.q_hat:.6g} "
        f"(alpha_crc={cal.alpha_crc}, alpha_aps={cal.alpha_aps}, n={cal.n})")
  if result["skipped"]:
    print(f"skipped items: {result['skipped']}")
  for name in ("table1.md", "table1_bytes.md", "table2.md"):
    with open(paths[name]) as f:
      print(f.read())
  for name, path in sorted(paths.items()):
    print(f"{name:>16}: {path}")


def _cmd_calibrate(args, extra):
  config = parse_config(args.config, extra)
  if args.verify:
    diffs = verify_calibration(config, args.verify)
    print(dumps({"calibration": args.verify, "verified": not diffs, "differences": diffs}))
    if diffs:
      raise errors.RcstError(f"{args.verify} does not match its recomputation: "
                             + "; ".join(diffs))
    return 0
  cal, out = calibrate_config(config, args.out, args.overwrite)
  print(dumps({"calibration": out, **cal.to_dict()}))


def _load_run(args, with_server: bool):
  """(edge, server or None, calibration, operating point) for `run` and `explain`."""
  cal = Calibration.from_json(args.calibration)
  edge = load_model(args.edge)
  local = with_server and os.path.isdir(args.server)
  server = load_model(args.server) if local else None
  cal.check_models(args.calibration, edge, server, args.allow_other_weights)
  if args.tau is not None and cal.certificate is not None:
    warnings.warn("--tau overrides the certified (lambda, tau) of the calibration: "
                  "its whole-system certificate does not apply")
  if args.tau is None and cal.certificate is None:
    raise errors.RcstError(f"{args.calibration} has no certified (lambda, tau); pass --tau")
  if args.tau is None and not cal.certificate["certified"]:
    warnings.warn(f"{args.calibration}: nothing was certified, so the run is server-only "
                  "(every image offloaded with all its patches)")
  codec = getattr(args, "codec", None)
  point = cal.operating_point(args.tau, None if codec is None else str(codec))
  if args.tau is None and codec is not None and cal.certificate["certified"] \
      and not point.certified:
    warnings.warn(f"--codec {codec} differs from the certified codec "
                  f"{cal.certificate.get('codec', 'raw')}: the whole-system certificate does "
                  "not apply")
  return edge, server, cal, point


def _read_images(paths, transform):
  """The run's transform (recorded in the calibration); bad files reported, not fatal."""
  good, images, failed = [], [], 0
  for path in paths:
    try:
      images.append(transform(path))
      good.append(path)
    except (BadItemError, OSError, ValueError) as e:
      failed += 1
      print(json.dumps({"image": path, "error": str(e)}), flush=True)
  return good, images, failed


def _cmd_run(args, extra):
  edge, server, cal, point = _load_run(args, with_server=True)
  remote = None if server is not None else networked.connect(args, cal)
  transform = transform_from_record(cal.transform, edge.metadata)
  names = class_names_for(edge)
  failed = 0
  try:
    for start in range(0, len(args.images), args.batch_size):
      good, images, bad = _read_images(args.images[start:start + args.batch_size], transform)
      failed += bad
      if images:
        out = collaborative_inference(np.stack(images), edge, server, point,
                                      layer=cal.gradcam_layer or "features",
                                      batch_size=args.batch_size, server_batch=args.batch_size,
                                      remote=remote, on_server_error=args.on_server_error,
                                      send=args.send)
        _print_run_batch(good, out, point, names)
  finally:
    if remote is not None:
      remote.close()
  return 1 if failed else 0


_MS = ("edge_s", "encode_s", "rtt_s", "server_s", "queue_s", "decode_s")


def _print_run_batch(good, out, point, names) -> None:
  for i, path in enumerate(good):
    pred = int(out["pred"][i])
    link = {k.replace("_s", "_ms"): round(float(out[k][i]) * 1e3, 3) for k in _MS if k in out}
    if "wire_up" in out:
      link.update(wire_bytes_up=int(out["wire_up"][i]), wire_bytes_down=int(out["wire_down"][i]))
    print(json.dumps({
        "image": path, "accepted_on_edge": bool(out["accepted"][i]),
        "prediction": pred, "edge_prediction": int(out["edge_pred"][i]),
        "label": names[pred] if names else None,
        "p_max": float(out["p_max"][i]),
        "aps_set": [int(c) for c in np.flatnonzero(out["aps_mask"][i])],
        "patches_sent": int(out["kept"][i]), "codec": point.codec,
        "bytes_sent": int(out["bytes"][i]), "status": str(out["status"][i]), **link,
        "sent_indices": [int(j) for j in np.flatnonzero(out["keep"][i])]}), flush=True)


def _cmd_explain(args, extra):
  edge, _, cal, point = _load_run(args, with_server=False)
  if os.path.isdir(args.out) or not args.out.lower().endswith(".png"):
    raise errors.RcstError(f"--out must name a .png file, got {args.out!r}")
  good, images, _ = _read_images([args.image], transform_from_record(cal.transform,
                                                                      edge.metadata))
  if not images:
    return 1
  geometry = cal.patch_geometry()
  x = explain.explain_image(edge, images[0], point, cal.gradcam_layer or "features", geometry,
                            args.batch_size)
  name = explain.namer(class_names_for(edge))
  decision = explain.decision_text(x, point, geometry)
  path = plots.explain_figure(images[0], x.cam, x.keep, [(name(c), p) for c, p in x.aps],
                              args.out, grid=geometry.grid, accepted=x.accepted,
                              decision=decision)
  sent = [] if x.accepted else [int(j) for j in np.flatnonzero(x.keep)]
  print(json.dumps({"image": args.image, "out": str(path), "decision": decision,
                    "accepted_on_edge": x.accepted, "p_max": x.p_max, "sent_indices": sent,
                    "codec": point.codec, "bytes_sent": x.nbytes}))
  return 0


def _add_model_commands(sub) -> None:
  p = sub.add_parser("convert", help="convert a timm checkpoint to Flax/orbax")
  p.add_argument("--timm", required=True, help="timm model name, optionally .tag")
  p.add_argument("--weights", help=".safetensors or torch state dict (weights_only)")
  p.add_argument("--out", required=True, help="output model directory")
  p.add_argument("--num-classes", type=int, default=None)
  p.add_argument("--overwrite", action="store_true")
  p.set_defaults(func=_cmd_convert)

  p = sub.add_parser("predict", help="top-5 predictions for image files, JSON lines")
  p.add_argument("--model", required=True, help="model directory")
  p.add_argument("--batch-size", type=argtypes.positive_int, default=16)
  p.add_argument("images", nargs="+")
  p.set_defaults(func=_cmd_predict)


def _add_config_commands(sub) -> None:
  for name, func, text, default, what in (
      ("evaluate", _cmd_evaluate, "calibrate + sweep every method, write tables/figures", None,
       "ml_collections config file; then --config.x=y overrides"),
      ("train", _cmd_train, "train the demo models on the synthetic data (CPU)", None,
       "e.g. configs/demo_train.py; then --config.x=y"),
      ("demo", _cmd_demo, "the full evaluation on the embedded synthetic demo", "demo",
       "demo, demo:smoke, demo:quick=N or a file"),
      ("calibrate", _cmd_calibrate, "Algorithm 1: write the calibration JSON", None,
       "a config name or file; then --config.x=y")):
    p = sub.add_parser(name, help=text)
    p.add_argument("--config", required=default is None, default=default, help=what)
    if name == "calibrate":
      p.add_argument("--out", help="calibration JSON path (default: <output_dir>/calibration.json)")
      p.add_argument("--verify", metavar="FILE",
                     help="recompute the calibration FILE records (its certificate's request) "
                          "from the config's data and models; exit 2 if anything differs")
    if name != "train":
      p.add_argument("--overwrite", action="store_true",
                     help="replace outputs rcst wrote even if they changed since (rcst never "
                          "replaces files it did not write)")
    p.set_defaults(func=func, takes_overrides=True)
  p = sub.add_parser("configs", help="list the shipped configs and their variants")
  p.set_defaults(func=_cmd_configs)


def _add_run_commands(sub) -> None:
  tau_help = ("patch threshold; default: the calibration's certified (lambda, tau), the "
              "same for run and explain")
  p = sub.add_parser("run", help="Algorithm 2 on image files: per-image decisions, JSON lines")
  p.add_argument("--server", required=True,
                 help="the server model directory (in this process), or HOST:PORT of a "
                      "`rcst serve`")
  p.add_argument("--deadline", type=argtypes.positive_float, default=10.0,
                 help="seconds per request to a remote server before it is retried")
  p.add_argument("--retries", type=int, default=3,
                 help="retries (exponential backoff from 0.25 s) of an unreachable server")
  p.add_argument("--on-server-error", choices=("edge", "fail"), default="edge",
                 help="an unreachable server: keep the edge's prediction, marked "
                      "server_unreachable (default), or stop with an error")
  p.add_argument("--send", choices=("each", "batch"), default="each",
                 help="a remote server: one call per offloaded image (default; each image's "
                      "own wire bytes and round trip), or one call per --batch-size images "
                      "(the call's bytes shared among them by size; less framing and server "
                      "CPU per image)")
  p.add_argument("--codec", type=argtypes.codec, default=None,
                 help="how the kept patches are coded: raw, zstd, webp-lossless, jpeg:Q, jpeg420:Q; "
                      "default: the certified codec (raw with --tau)")
  p.add_argument("images", nargs="+")
  p.set_defaults(func=_cmd_run)
  q = sub.add_parser("explain", help="PNG: image, APS set, Grad-CAM, patches that would be sent")
  q.add_argument("--out", required=True, help="output PNG")
  q.add_argument("image")
  q.set_defaults(func=_cmd_explain)
  for p in (p, q):
    p.add_argument("--batch-size", type=argtypes.positive_int, default=16,
                   help="images per edge/server call (explain pads to it, as run does)")
    p.add_argument("--edge", required=True)
    p.add_argument("--calibration", required=True)
    p.add_argument("--tau", type=argtypes.unit_float, default=None, help=tau_help)
    p.add_argument("--allow-other-weights", action="store_true",
                   help="use a calibration made for other weights (no guarantee)")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="rcst", description=__doc__)
  parser.add_argument("--version", action="version", version=f"rcst_jax {__version__}")
  sub = parser.add_subparsers(dest="command", required=True)
  _add_model_commands(sub)
  _add_config_commands(sub)
  _add_run_commands(sub)
  networked.add_serve_command(sub)
  return parser


def main(argv=None) -> int:
  """Exit codes: 0 ok, 1 some items failed (each reported), 2 refused or failed
  with a reason (one line on stderr, no traceback), 130 interrupted. Any other
  exception is a bug and keeps its traceback."""
  xla_cpu.tune()  # before any computation starts a backend
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


if __name__ == "__main__":
  sys.exit(main())
