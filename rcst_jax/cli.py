"""The `rcst` command line: a thin layer over the library."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _cmd_convert(args, extra):
  from rcst_jax.convert import convert
  from rcst_jax.fileio import dumps
  out = convert(args.timm, args.out, weights=args.weights,
                num_classes=args.num_classes, overwrite=args.overwrite)
  print(dumps({"converted": args.timm, "out": out}))


def _cmd_predict(args, extra):
  from rcst_jax.checkpoints import load_model
  from rcst_jax.fileio import dumps
  from rcst_jax.predict import predict_files
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


def _positive_int(text: str) -> int:
  """argparse type: an integer >= 1."""
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
  return value


def _finite_float(text: str) -> float:
  """argparse type: a finite number (no nan/inf)."""
  import math
  try:
    value = float(text)
  except ValueError:
    value = math.nan
  if not math.isfinite(value):
    raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
  return value


def parse_config(spec: str, overrides: list[str], validate: bool = True):
  """A config by name or path (`demo:smoke`, `configs/imagenet.py`) + `--config.x=y`,
  checked against the evaluation schema (config_schema) before anything runs."""
  from rcst_jax import config_files
  config = config_files.parse(spec, overrides)
  if validate:
    from rcst_jax.config_schema import validate as check
    check(config)
  return config


def _cmd_configs(args, extra):
  from rcst_jax import config_files
  for name in config_files.names():
    for arg, what in config_files.variants(name).items():
      print(f"{name + (':' + arg if arg else ''):<24} {what}")


def _cmd_train(args, extra):
  from rcst_jax.train import train_demo
  config = parse_config(args.config, extra, validate=False)  # the trainer's own keys
  train_demo(config)


def _cmd_evaluate(args, extra):
  from rcst_jax.evaluate import evaluate_config
  config = parse_config(args.config, extra)
  out = evaluate_config(config)
  _print_run(out)


def _cmd_demo(args, extra):
  from rcst_jax.evaluate import evaluate_config
  t0 = time.time()
  config = parse_config(args.config, extra)
  out = evaluate_config(config)
  _print_run(out)
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
  for name in ("table1.md", "table2.md"):
    with open(paths[name]) as f:
      print(f.read())
  for name, path in sorted(paths.items()):
    print(f"{name:>16}: {path}")


def _cmd_calibrate(args, extra):
  import os.path as osp
  from rcst_jax import offline
  from rcst_jax.checkpoints import load_model, module_from_metadata, read_metadata
  from rcst_jax.data.sources import load_sources, run_transform
  from rcst_jax.geometry import Geometry
  config = parse_config(args.config, extra)
  if config.certify.enabled:  # Learn-then-Test needs the server's answers too
    from rcst_jax.engine import Evaluation
    from rcst_jax.models.loading import load_models
    models = load_models(config)
    transform = run_transform(models.edge.metadata, {"server": models.server.metadata})
    cal = Evaluation(config, models, load_sources(config, transform), config.output_dir,
                     transform, progress=config.progress).calibrate()
    return _write_calibration(args, config, cal)
  # Algorithm 1 needs the edge; of the server only its patch geometry and digest.
  edge = load_model(osp.join(config.models_dir, config.edge))
  server_meta = read_metadata(osp.join(config.models_dir, config.server))
  module = module_from_metadata(server_meta)
  transform = run_transform(edge.metadata, {"server": server_meta})
  cal = offline.algorithm1(config, edge, load_sources(config, transform), transform,
                           server_metadata=server_meta,
                           geometry=Geometry(int(module.img_size), int(module.patch_size)),
                           server_digest=server_meta.get("variables_digest"),
                           progress=config.progress)
  return _write_calibration(args, config, cal)


def _write_calibration(args, config, cal):
  from rcst_jax.fileio import dumps
  out = args.out or os.path.join(config.output_dir, "calibration.json")
  cal.to_json(out)
  print(dumps({"calibration": out, **cal.to_dict()}))


def _load_run_models(args, with_server: bool):
  import warnings
  from rcst_jax.checkpoints import load_model, variables_digest
  from rcst_jax.conformal import Calibration
  from rcst_jax.errors import RcstError
  from rcst_jax.geometry import Geometry
  cal = Calibration.from_json(args.calibration)
  edge = load_model(args.edge)
  server = load_model(args.server) if with_server else None
  geometry = Geometry.from_dict(cal.geometry) if cal.geometry else Geometry()
  if server is not None and Geometry.of_server(server) != geometry:
    raise RcstError(f"the server's patch geometry {Geometry.of_server(server)} differs from "
                    f"the calibration's {geometry} ({args.calibration})")
  for name, model, want in (("edge", edge, cal.edge_digest), ("server", server, cal.server_digest)):
    if model is None or want is None or variables_digest(model.variables) == want:
      continue
    msg = (f"{args.calibration} was calibrated for other {name} weights than "
           f"{getattr(args, name)}")
    if not args.allow_other_weights:
      raise RcstError(msg + "; rerun `rcst calibrate` with these models, or pass "
                      "--allow-other-weights (the CRC guarantee then no longer applies)")
    warnings.warn(msg + ": the CRC guarantee does not apply to these weights")
  return edge, server, cal, geometry


def _read_images(paths, transform):
  """The run's transform (recorded in the calibration); bad files reported, not fatal."""
  from rcst_jax.data import preprocess
  good, images, failed = [], [], 0
  for path in paths:
    try:
      images.append(transform(path))
      good.append(path)
    except (preprocess.BadItemError, OSError, ValueError) as e:
      failed += 1
      print(json.dumps({"image": path, "error": str(e)}), flush=True)
  return good, images, failed


def _chunks(seq, size):
  return [seq[i:i + size] for i in range(0, len(seq), size)]


def _operating_point(args, cal):
  """(calibration to run with, tau): the certified pair unless --tau is given."""
  import warnings
  from rcst_jax.errors import RcstError
  cert = cal.certificate
  if args.tau is not None:
    if cert is not None:
      warnings.warn("--tau overrides the certified (lambda, tau) of the calibration: "
                    "its whole-system certificate does not apply")
    return cal, args.tau
  if cert is None:
    raise RcstError(f"{args.calibration} has no certified (lambda, tau); pass --tau")
  from rcst_jax.certification import certified_calibration
  return certified_calibration(cal), float(cert["tau"])


def _cmd_run(args, extra):
  import numpy as np
  from rcst_jax.data.sources import transform_from_record
  from rcst_jax.pipeline import collaborative_inference
  from rcst_jax.predict import class_names_for
  edge, server, cal, _ = _load_run_models(args, with_server=True)
  cal, tau = _operating_point(args, cal)
  transform = transform_from_record(cal.transform, edge.metadata)
  names = class_names_for(edge)
  label = (lambda c: names[c]) if names else (lambda c: None)
  failed = 0
  for paths in _chunks(list(args.images), args.batch_size):
    good, images, bad = _read_images(paths, transform)
    failed += bad
    if not images:
      continue
    out = collaborative_inference(np.stack(images), edge, server, cal, tau,
                                  batch_size=args.batch_size, server_batch=args.batch_size)
    for i, path in enumerate(good):
      pred = int(out["pred"][i])
      print(json.dumps({
          "image": path, "accepted_on_edge": bool(out["accepted"][i]),
          "prediction": pred, "label": label(pred), "p_max": float(out["p_max"][i]),
          "aps_set": [int(c) for c in np.flatnonzero(out["aps_mask"][i])],
          "patches_sent": int(out["kept"][i]), "bytes_sent": int(out["bytes"][i])}), flush=True)
  return 1 if failed else 0


def _cmd_explain(args, extra):
  from rcst_jax import explain, plots
  from rcst_jax.data.sources import transform_from_record
  from rcst_jax.predict import class_names_for
  edge, _, cal, geometry = _load_run_models(args, with_server=False)
  out = args.out
  if os.path.isdir(out) or not out.lower().endswith(".png"):
    from rcst_jax.errors import RcstError
    raise RcstError(f"--out must name a .png file, got {out!r}")
  good, images, _ = _read_images([args.image], transform_from_record(cal.transform,
                                                                      edge.metadata))
  if not images:
    return 1
  image = images[0]
  x = explain.explain_image(edge, image, cal, args.tau, geometry)
  name = explain.namer(class_names_for(edge))
  decision = explain.decision_text(x, cal.lambda_hat, args.tau, geometry)
  path = plots.explain_figure(image, x.cam, x.keep, [(name(c), p) for c, p in x.aps], out,
                              grid=geometry.grid, accepted=x.accepted, decision=decision)
  print(json.dumps({"image": args.image, "out": str(path), "decision": decision}))
  return 0


def build_parser() -> argparse.ArgumentParser:
  from rcst_jax import __version__
  parser = argparse.ArgumentParser(prog="rcst", description=__doc__)
  parser.add_argument("--version", action="version", version=f"rcst_jax {__version__}")
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser("convert", help="convert a timm checkpoint to Flax/orbax")
  p.add_argument("--timm", required=True, help="timm model name, optionally .tag")
  p.add_argument("--weights", help=".safetensors or torch state dict (weights_only)")
  p.add_argument("--out", required=True, help="output model directory")
  p.add_argument("--num-classes", type=int, default=None)
  p.add_argument("--overwrite", action="store_true")
  p.set_defaults(func=_cmd_convert)

  p = sub.add_parser("predict", help="top-5 predictions for image files, JSON lines")
  p.add_argument("--model", required=True, help="model directory")
  p.add_argument("--batch-size", type=_positive_int, default=16)
  p.add_argument("images", nargs="+")
  p.set_defaults(func=_cmd_predict)

  p = sub.add_parser("evaluate", help="calibrate + sweep every method, write tables/figures")
  p.add_argument("--config", required=True, help="ml_collections config file; "
                 "then --config.x=y overrides")
  p.set_defaults(func=_cmd_evaluate, takes_overrides=True)

  p = sub.add_parser("train", help="train the demo models on the synthetic data (CPU)")
  p.add_argument("--config", required=True, help="e.g. configs/demo_train.py; then --config.x=y")
  p.set_defaults(func=_cmd_train, takes_overrides=True)

  p = sub.add_parser("demo", help="the full evaluation on the embedded synthetic demo")
  p.add_argument("--config", default="demo", help="demo, demo:smoke, demo:quick=N or a file")
  p.set_defaults(func=_cmd_demo, takes_overrides=True)

  p = sub.add_parser("configs", help="list the shipped configs and their variants")
  p.set_defaults(func=_cmd_configs)

  p = sub.add_parser("calibrate", help="Algorithm 1: write the calibration JSON")
  p.add_argument("--config", required=True)
  p.add_argument("--out", help="calibration JSON path (default: <output_dir>/calibration.json)")
  p.set_defaults(func=_cmd_calibrate, takes_overrides=True)

  p = sub.add_parser("run", help="Algorithm 2 on image files: per-image decisions, JSON lines")
  p.add_argument("--edge", required=True)
  p.add_argument("--server", required=True)
  p.add_argument("--calibration", required=True)
  p.add_argument("--tau", type=_finite_float, default=None,
                 help="patch threshold; default: the calibration's certified (lambda, tau)")
  p.add_argument("--batch-size", type=_positive_int, default=16,
                 help="images per edge/server call")
  p.add_argument("--allow-other-weights", action="store_true",
                 help="use a calibration made for other weights (no guarantee)")
  p.add_argument("images", nargs="+")
  p.set_defaults(func=_cmd_run)

  p = sub.add_parser("explain", help="PNG: image, APS set, Grad-CAM, patches that would be sent")
  p.add_argument("--edge", required=True)
  p.add_argument("--calibration", required=True)
  p.add_argument("--tau", type=_finite_float, default=0.5)
  p.add_argument("--allow-other-weights", action="store_true",
                 help="use a calibration made for other weights (no guarantee)")
  p.add_argument("--out", required=True, help="output PNG")
  p.add_argument("image")
  p.set_defaults(func=_cmd_explain)
  return parser


def main(argv=None) -> int:
  """Exit codes: 0 ok, 1 some items failed (each reported), 2 refused or failed
  with a reason (one line on stderr, no traceback), 130 interrupted. Any other
  exception is a bug and keeps its traceback."""
  from rcst_jax import errors
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
