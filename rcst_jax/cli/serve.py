"""The command line's networked parts: `rcst serve`, and the client `rcst run
--server HOST:PORT` connects with (through the byte meter with --meter). gRPC
is the [serve] extra, imported only here and only when one of these runs."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
import warnings

from rcst_edge import errors
from rcst_jax.cli import argtypes
from rcst_jax.core import xla_cpu
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
  (the server's geometry and weights) before any image is read. If the server
  does not answer now, the same check runs before its first answer is used,
  and every answer's weights digest is checked."""
  _grpc()
  from rcst_edge.link.client import Expect, RemoteServer, ServerUnreachable
  from rcst_edge.link.retry import Retry
  retry = Retry(args.retries, budget_s=args.call_budget, down_for_s=args.down_for)
  remote = RemoteServer(args.server, deadline_s=args.deadline, retry=retry,
                        geometry=cal.patch_geometry(), metered=args.meter,
                        expect=Expect(cal.server_digest, args.allow_other_weights))
  try:
    remote.verify()
  except ServerUnreachable as e:
    if args.on_server_error == "fail":
      remote.close()
      raise
    warnings.warn(f"{e}; offloaded images keep the edge's prediction, marked "
                  "server_unreachable, until it answers (its weights are checked first)")
  except errors.RcstError:
    remote.close()
    raise
  return remote


@contextlib.contextmanager
def _log_refusals():
  """While serving: one line per refused request on stderr ("rcst serve:
  refused ..."), logged by `serving.service`, never a traceback."""
  log = logging.getLogger("rcst_jax.serving")
  handler, level, propagate = logging.StreamHandler(sys.stderr), log.level, log.propagate
  handler.setFormatter(logging.Formatter("rcst serve: %(message)s"))
  log.addHandler(handler)
  log.setLevel(logging.INFO)
  log.propagate = False  # once: not again by a handler on the root logger (absl's)
  try:
    yield
  finally:
    log.removeHandler(handler)
    log.setLevel(level)
    log.propagate = propagate


def _cmd_serve(args, extra):
  import signal

  _grpc()
  xla_cpu.tune_for_serving()  # before load_model starts a backend
  from rcst_jax.serving.service import RcstServer, ServeOptions, check_address
  check_address(args.address)  # a port in use: refused before the model loads
  model = load_model(args.server)
  given = dict(batch=args.batch, max_wait_ms=args.max_wait_ms, workers=args.workers,
               max_message_bytes=args.max_message_bytes, calls_in_flight=args.calls_in_flight,
               buckets=args.buckets)
  options = ServeOptions(**{k: v for k, v in given.items() if v is not None})
  t0 = time.perf_counter()
  with _log_refusals():
    srv = RcstServer(model, args.address, options)  # options checked before compiling
    signal.signal(signal.SIGTERM, lambda *_: srv.grpc.stop(1.0))  # before it says it serves
    print(dumps({"serving": srv.address, "model": args.server, "batch": options.batch,
                 "max_wait_ms": options.max_wait_ms, "shapes_compiled": srv.service.shapes,
                 "calls_in_flight": srv.service.server.concurrency,
                 "startup_s": round(time.perf_counter() - t0, 2),
                 "max_message_bytes": srv.service.max_message_bytes}), flush=True)
    try:
      srv.wait()
    finally:
      srv.stop()
  return 0


# protocol.MAX_REQUEST_BYTES and service.MAX_WAIT_MS (gRPC is imported only
# when serving; tests/serving/test_serving.py checks they agree).
MAX_MESSAGE_BYTES, MAX_WAIT_MS = 1 << 26, 1000.0


def add_serve_command(sub) -> None:
  p = sub.add_parser("serve", help="the server model behind gRPC for `rcst run --server "
                                   "HOST:PORT` (dynamic batching)")
  p.add_argument("--server", required=True, help="server model directory")
  p.add_argument("--address", type=argtypes.listen_address, default="127.0.0.1:50051",
                 help="HOST:PORT to listen on (default loopback only; port 0: any free port); "
                      "a port in use is refused before the model loads")
  # Defaults: serving.service.ServeOptions (gRPC is imported only when serving).
  p.add_argument("--batch", type=argtypes.positive_int, default=None,
                 help="rows per server call at most (default 8; one program compiled per "
                      "token bucket, and a call runs its real rows only)")
  p.add_argument("--max-wait-ms", type=argtypes.float_in(0, MAX_WAIT_MS), default=None,
                 help="how long a batch waits for more concurrent requests, in "
                      f"[0, {MAX_WAIT_MS:g}] (default 2)")
  p.add_argument("--workers", type=argtypes.positive_int, default=None,
                 help="concurrent requests handled (default 16)")
  p.add_argument("--calls-in-flight", type=argtypes.positive_int, default=None,
                 help="server calls run at once, a batch's buckets side by side (default: "
                      "2 on a CPU host with 2+ cores, else 1)")
  p.add_argument("--max-message-bytes", type=argtypes.int_in(1, MAX_MESSAGE_BYTES),
                 default=None, help="largest request accepted, at most 64 MiB (default: the "
                                    "largest valid payload + 1 KiB)")
  p.add_argument("--buckets", type=argtypes.buckets, default=None,
                 help="comma-separated kept-token buckets to compile (default: the sweep's); "
                      "the largest must hold a whole image (196 patches for 224/16)")
  p.set_defaults(func=_cmd_serve)
