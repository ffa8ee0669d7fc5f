"""`rcst-edge`: Algorithm 2 on a device without JAX.

The exported edge (`rcst export`) on ONNX Runtime decides each image at the
calibration's operating point; offloaded images go to `rcst serve` as the
project's payloads; one JSON line per image, as `rcst run` prints it.

  rcst-edge --edge edge.onnx --calibration calibration.json \\
      --server 127.0.0.1:50051 images/*.png
"""

from __future__ import annotations

import argparse
import sys
import warnings

import numpy as np

from rcst_edge import __version__, deployment, errors, records, transmit
from rcst_edge.images import Preprocess
from rcst_edge.onnx_edge import OnnxEdge
from rcst_edge.payload.geometry import Geometry


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="rcst-edge", description=__doc__.split("\n\n")[0])
  p.add_argument("--version", action="version", version=__version__)
  p.add_argument("--edge", required=True, help="the ONNX edge written by `rcst export`")
  p.add_argument("--calibration", required=True, help="calibration.json for that edge")
  p.add_argument("--server", required=True, help="HOST:PORT of `rcst serve`")
  p.add_argument("--tau", type=float, default=None,
                 help="patch threshold (default: the certified pair; the certificate "
                      "then no longer applies)")
  p.add_argument("--codec", default=None, help="payload codec (default: the certified one)")
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: its choice)")
  p.add_argument("--deadline", type=float, default=10.0, help="seconds per server call")
  p.add_argument("--retries", type=int, choices=range(11), default=3, metavar="0..10")
  p.add_argument("--on-server-error", choices=("edge", "fail"), default="edge")
  p.add_argument("--send", choices=("each", "batch"), default="each")
  p.add_argument("images", nargs="+")
  return p


def load(args):
  """(edge, calibration fields, operating point, geometry, transform)."""
  fields = deployment.load_sealed(args.calibration)
  edge = OnnxEdge(args.edge, threads=args.threads or None)
  if not edge.check_calibrated(fields, args.calibration):
    warnings.warn(f"{args.calibration} was calibrated with the JAX edge of these weights, "
                  "not with this file: ONNX Runtime rounds differently, so a decision within "
                  "about 1e-6 of lambda or tau may differ (calibrate with the file to avoid it)")
  lam = deployment.decode_float(fields["lambda_hat"], "lambda_hat")
  q_hat = deployment.decode_float(fields["q_hat"], "q_hat")
  if args.tau is not None and fields.get("certificate") is not None:
    warnings.warn("--tau overrides the certified (lambda, tau): the certificate does not apply")
  point = deployment.operating_point(lam, q_hat, fields.get("certificate"), args.tau, args.codec)
  geometry = Geometry.from_dict(fields["geometry"]) if fields.get("geometry") else Geometry()
  if geometry != edge.geometry:
    raise errors.ConfigError(f"{args.edge} was exported for {edge.geometry}, the calibration "
                             f"is for {geometry}")
  transform = Preprocess(**fields["transform"]) if fields.get("transform") else edge.transform
  return edge, fields, point, geometry, transform


def connect(args, fields: dict, geometry: Geometry):
  from rcst_edge.link.client import Expect, RemoteServer
  from rcst_edge.link.retry import Retry
  remote = RemoteServer(args.server, deadline_s=args.deadline, retry=Retry(args.retries),
                        geometry=geometry, expect=Expect(fields.get("server_digest")))
  try:
    remote.verify()
  except errors.ServerUnreachable as e:
    if args.on_server_error == "fail":
      remote.close()
      raise
    warnings.warn(f"{e}; offloaded images keep the edge's prediction until it answers")
  return remote


def classify(args) -> int:
  edge, fields, point, geometry, transform = load(args)
  remote = connect(args, fields, geometry)
  failed = 0
  try:
    for start in range(0, len(args.images), args.batch_size):
      good, images, bad = records.read_images(args.images[start:start + args.batch_size],
                                              transform)
      failed += bad
      if images:
        records.print_batch(good, decide_and_send(edge, np.stack(images), point, geometry,
                                                  remote, args), point.codec)
  finally:
    remote.close()
  return 1 if failed else 0


def decide_and_send(edge: OnnxEdge, images, point, geometry, remote, args) -> dict:
  import time
  t0 = time.perf_counter()
  e = edge.batched(images, point, args.batch_size)
  edge_s = (time.perf_counter() - t0) / len(images)
  out = transmit.transmit_remote(images, ~e["accept"], e["keep"], e["pred"], geometry,
                                 point.codec, remote, on_server_error=args.on_server_error,
                                 send=args.send)
  return {**out, "edge_s": np.full(len(images), edge_s), "p_max": e["p_max"],
          "aps_mask": e["aps_mask"]}


def main(argv=None) -> int:
  args = parser().parse_args(argv)
  try:
    return classify(args)
  except errors.RcstError as e:
    print(f"rcst-edge: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
