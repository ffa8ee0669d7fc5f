"""What each `rcst` command does: one function per subcommand, named after it,
taking the parsed arguments and the `--config.x=y` overrides (`parser` wires
them up). Each prints its results (JSON lines or tables) and returns the
exit code, or raises an `errors.RcstError` that `parser.main` reports.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings

import numpy as np

from rcst_edge import errors, records
from rcst_jax.calibration.artifact import Calibration
from rcst_jax.cli import serve
from rcst_jax.core.fileio import dumps
from rcst_jax.data.sources import transform_from_record
from rcst_jax.inference.collaborative import collaborative_inference
from rcst_jax.jobs.calibrate import calibrate_config, reseal_calibration, verify_calibration
from rcst_jax.jobs.evaluate import evaluate_config
from rcst_jax.jobs.train import train_demo
from rcst_jax.models.checkpoints import load_model
from rcst_jax.models.predict import class_names_for, predict_files
from rcst_jax.report import explain as explain_lib
from rcst_jax.report import plots
from rcst_jax.settings import files
from rcst_jax.settings.schema import validate


def convert(args, extra):
  # torch and timm are the optional [convert] extra: imported only when asked for.
  from rcst_jax.models import convert as convert_lib
  out = convert_lib.convert(args.timm, args.out, weights=args.weights,
                            num_classes=args.num_classes, overwrite=args.overwrite)
  print(dumps({"converted": args.timm, "out": out}))


def export(args, extra):
  # jax2onnx lives in the export venv (make export-env): imported only when asked for,
  # and onnx_edge names the missing package and the make target.
  from rcst_jax.export import onnx_edge, parity
  if args.int8:
    out = _export_int8(args, onnx_edge)
  else:
    out = onnx_edge.export_edge(args.edge, args.out, layer=args.layer, patch=args.patch,
                                overwrite=args.overwrite)
  if args.check:
    from rcst_jax.data.synthetic import SyntheticShapes
    src = SyntheticShapes("test", args.check, seed=0)
    images = np.stack([src[i].image for i in range(args.check)])
    out["check"] = parity.check(out["out"], args.edge, images, lambda_hat=0.5, q_hat=0.9)
  print(dumps(out))


def _export_int8(args, onnx_edge):
  """The float export to a temporary file, then its int8 form at --out."""
  import tempfile

  from rcst_edge.onnx_edge import OnnxEdge
  from rcst_jax.export import quantize
  if os.path.exists(args.out) and not args.overwrite:
    raise errors.OutputRefusedError(f"{args.out} exists; pass --overwrite to replace it")
  with tempfile.TemporaryDirectory() as tmp:
    float_path = os.path.join(tmp, "edge.onnx")
    out = onnx_edge.export_edge(args.edge, float_path, layer=args.layer, patch=args.patch)
    images = quantize.calibration_images(args.int8, OnnxEdge(float_path).transform)
    quantize.quantize_int8(float_path, args.out, images)
  from rcst_edge.deployment import file_digest
  return {**out, "out": args.out, "bytes": os.path.getsize(args.out),
          "sha256": file_digest(args.out), "int8_calibration_images": len(images)}


def predict(args, extra):
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
  checked against the evaluation schema (settings.schema) before anything runs."""
  config = files.parse(spec, overrides)
  if check:
    validate(config)
  return config


def configs(args, extra):
  for name in files.names():
    for arg, what in files.variants(name).items():
      print(f"{name + (':' + arg if arg else ''):<24} {what}")


def train(args, extra):
  train_demo(parse_config(args.config, extra, check=False))  # the trainer's own keys


def evaluate(args, extra):
  _print_run(evaluate_config(parse_config(args.config, extra), overwrite=args.overwrite))


def demo(args, extra):
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


def calibrate(args, extra):
  if args.reseal:
    if args.config or args.verify or args.out or extra:
      raise errors.RcstError("--reseal FILE takes no --config, --verify, --out or overrides")
    print(dumps(reseal_calibration(args.reseal)))
    return 0
  if not args.config:
    raise errors.RcstError("--config is required (except with --reseal FILE)")
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


def run(args, extra):
  edge, server, cal, point = _load_run(args, with_server=True)
  remote = None if server is not None else serve.connect(args, cal)
  transform = transform_from_record(cal.transform, edge.metadata)
  names = class_names_for(edge)
  failed = 0
  try:
    for start in range(0, len(args.images), args.batch_size):
      good, images, bad = records.read_images(args.images[start:start + args.batch_size],
                                              transform)
      failed += bad
      if images:
        out = collaborative_inference(np.stack(images), edge, server, point,
                                      layer=cal.gradcam_layer or "features",
                                      batch_size=args.batch_size, server_batch=args.batch_size,
                                      remote=remote, on_server_error=args.on_server_error,
                                      send=args.send)
        records.print_batch(good, out, point.codec, names)
  finally:
    if remote is not None:
      remote.close()
  return 1 if failed else 0


def explain(args, extra):
  edge, _, cal, point = _load_run(args, with_server=False)
  if os.path.isdir(args.out) or not args.out.lower().endswith(".png"):
    raise errors.RcstError(f"--out must name a .png file, got {args.out!r}")
  good, images, _ = records.read_images(
      [args.image], transform_from_record(cal.transform, edge.metadata))
  if not images:
    return 1
  geometry = cal.patch_geometry()
  x = explain_lib.explain_image(edge, images[0], point, cal.gradcam_layer or "features", geometry,
                            args.batch_size)
  name = explain_lib.namer(class_names_for(edge))
  decision = explain_lib.decision_text(x, point, geometry)
  path = plots.explain_figure(images[0], x.cam, x.keep, [(name(c), p) for c, p in x.aps],
                              args.out, grid=geometry.grid, accepted=x.accepted,
                              decision=decision)
  sent = [] if x.accepted else [int(j) for j in np.flatnonzero(x.keep)]
  print(json.dumps({"image": args.image, "out": str(path), "decision": decision,
                    "accepted_on_edge": x.accepted, "p_max": x.p_max, "sent_indices": sent,
                    "codec": point.codec, "bytes_sent": x.nbytes}))
  return 0
