"""The command line's networked parts: `rcst serve`, and the client `rcst run
--server HOST:PORT` connects with (through the byte meter with --meter). gRPC
is the [serve] extra, imported only here and only when one of these runs."""

from __future__ import annotations

import time
import warnings

from rcst_jax.cli import argtypes
from rcst_jax.core import errors, xla_cpu
from rcst_jax.core.fileio import dumps
from rcst_jax.models.checkpoints import load_model


def _grpc():
  """The [serve] extra, or an error that says how to install it."""
  import importlib.util
  if importlib.util.find_spec("grpc") is None:
    raise errors.RcstError("rcst serve and rcst run --server HOST:PORT need the [serve] extra: "
                           "pip install 'rcst_jax[serve]'")


def connect(args, cal):
  """`rcst run --server HOST:PORT`: the client, checked against the calibration
  (the server's geometry and weights) before any image is read."""
  _grpc()
  from rcst_jax.serving.client import RemoteServer, ServerUnreachable
  geometry = cal.patch_geometry()
  remote = RemoteServer(args.server, deadline_s=args.deadline, retries=args.retries,
                        geometry=geometry, metered=args.meter)
  try:
    d = remote.describe()
  except ServerUnreachable as e:
    if args.on_server_error == "fail":
      raise
    warnings.warn(f"{e}; offloaded images keep the edge's prediction, marked "
                  "server_unreachable, until it answers")
    return remote
  if (d.grid, d.patch) != (geometry.grid, geometry.patch):
    raise errors.RcstError(f"the server at {args.server} runs a {d.grid}x{d.grid} grid of "
                           f"{d.patch}-pixel patches; {args.calibration} is for "
                           f"{geometry.grid}x{geometry.grid} of {geometry.patch}")
  if cal.server_digest is not None and d.model_digest != cal.server_digest:
    msg = f"the server at {args.server} runs other weights than {args.calibration} was made for"
    if not args.allow_other_weights:
      raise errors.RcstError(msg + "; pass --allow-other-weights (no guarantee then)")
    warnings.warn(msg + ": the CRC guarantee does not apply")
  return remote


def _cmd_serve(args, extra):
  import signal

  _grpc()
  xla_cpu.tune_for_serving()  # before load_model starts a backend
  from rcst_jax.serving.service import RcstServer, ServeOptions
  model = load_model(args.server)
  given = dict(batch=args.batch, max_wait_ms=args.max_wait_ms, workers=args.workers,
               max_message_bytes=args.max_message_bytes, calls_in_flight=args.calls_in_flight)
  options = ServeOptions(**{k: v for k, v in given.items() if v is not None})
  if args.buckets:
    options.buckets = tuple(sorted({int(b) for b in args.buckets.split(",")}))
  t0 = time.perf_counter()
  srv = RcstServer(model, args.address, options)
  print(dumps({"serving": srv.address, "model": args.server, "batch": options.batch,
               "max_wait_ms": options.max_wait_ms, "shapes_compiled": srv.service.shapes,
               "calls_in_flight": srv.service.server.concurrency,
               "startup_s": round(time.perf_counter() - t0, 2),
               "max_message_bytes": srv.service.max_message_bytes}), flush=True)
  signal.signal(signal.SIGTERM, lambda *_: srv.grpc.stop(1.0))
  try:
    srv.wait()
  finally:
    srv.stop()
  return 0


def add_serve_command(sub) -> None:
  p = sub.add_parser("serve", help="the server model behind gRPC for `rcst run --server "
                                   "HOST:PORT` (dynamic batching)")
  p.add_argument("--server", required=True, help="server model directory")
  p.add_argument("--address", default="127.0.0.1:50051",
                 help="HOST:PORT to listen on (default loopback only; port 0: any free port)")
  # Defaults: serving.service.ServeOptions (gRPC is imported only when serving).
  p.add_argument("--batch", type=argtypes.positive_int, default=None,
                 help="rows per server call at most (default 8; one program compiled per "
                      "token bucket, and a call runs its real rows only)")
  p.add_argument("--max-wait-ms", type=float, default=None,
                 help="how long a batch waits for more concurrent requests (default 2)")
  p.add_argument("--workers", type=argtypes.positive_int, default=None,
                 help="concurrent requests handled (default 16)")
  p.add_argument("--calls-in-flight", type=argtypes.positive_int, default=None,
                 help="server calls run at once, a batch's buckets side by side (default: "
                      "2 on a CPU host with 2+ cores, else 1)")
  p.add_argument("--max-message-bytes", type=argtypes.positive_int, default=None,
                 help="largest request accepted (default: the largest valid payload + 1 KiB)")
  p.add_argument("--buckets", default=None,
                 help="comma-separated kept-token buckets to compile (default: the sweep's)")
  p.set_defaults(func=_cmd_serve)
