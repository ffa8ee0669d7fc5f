"""Where `rcst demo` spends its time: by stage, by XLA program, by host task.

Runs the demo (or any `rcst demo --config ...` variant) in this process with
hooks installed by monkeypatching module attributes from here (nothing in
rcst_jax is edited), and reports:

* stages: inclusive wall seconds of each phase (Algorithm 1, the
  certification's fit/test parts, each test chunk's edge pass and server
  sweep, the report), nested as the calls nest;
* programs: for each jitted program (server on kept tokens, edge step with
  Grad-CAM, softmax forwards, the vmapped decisions): calls, distinct input
  signatures, compile seconds (jax.monitoring's backend-compile, trace and
  lowering events, attributed to the program whose call compiled), run
  seconds, rows, FLOPs (HLO cost analysis of the program at batch 1 times
  the padded rows: exact for these row-independent models and immune to
  while-loop bodies being counted once) and the achieved GFLOP/s against a
  float32 2048x2048 ``jnp.dot`` measured in the same process;
* the server in detail: per pass (certification fit/test, test chunks; raw
  or lossy-decoded pixels) and per bucket, real and padded rows and tokens,
  per-call and per-row cost, host time around each call, dedup counts
  (decisions vs distinct (image, kept set) rows) and rows recomputed across
  passes;
* host work: the synthetic renderer per image, payload coding per codec and
  payload, the exact test's table, Learn-then-Test;
* optionally (--microbench): the server program's per-call cost against rows
  (fixed overhead vs per-row cost) and whether logits / edge outputs are bit
  for bit the same when a row runs in a batch of another size or position.

Examples (2-core hosts are noisy: compare ratios within one run)::

  .venv/bin/python benchmarks/profile_demo.py --config demo:smoke
  .venv/bin/python benchmarks/profile_demo.py --config demo:quick=1500 --microbench
  .venv/bin/python benchmarks/profile_demo.py                  # the full demo (~7 min)
  .venv/bin/python benchmarks/profile_demo.py --config demo:smoke \\
      --compilation-cache /tmp/jaxcc     # twice, in fresh processes: compile saved
  .venv/bin/python benchmarks/profile_demo.py --config demo:smoke --config.data.n_cal=400

Extra ``--config.x=y`` arguments go to the demo unchanged. ``--json FILE``
writes every number. The run's outputs go to a fresh directory (--out), so
the demo's own result cache never skips work.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import hashlib
import importlib
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import threading
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402,F401  (applies the `rcst` command's XLA:CPU settings first)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

# ---------------------------------------------------------------- recording

_STACK: list[str] = []          # stage names, pushed and popped by the main thread
_LOCAL = threading.local()      # per thread: the program whose call is running
_LOCK = threading.Lock()


def stage_path() -> str:
  return "/".join(_STACK) or "(top)"


class Recorder:
  def __init__(self):
    self.stages = collections.OrderedDict()   # path -> [seconds, count]
    self.programs = collections.OrderedDict()  # name -> dict
    self.compiles = []                       # (program, fun_name, event, seconds, stage)
    self.cache_events = collections.Counter()
    self.cache_saved_s = 0.0
    self.host = collections.defaultdict(lambda: collections.defaultdict(float))
    self.server_calls = []                   # per call dicts
    self.sweeps = []                         # per Passes.sweep: decisions, rows, images
    self.row_keys = collections.Counter()    # (pixels digest, keep bits) -> times computed
    self.samples = {}                        # models and images for --microbench
    self.missing = []                        # hooks that found nothing to patch
    self.on = True                           # False: hooks pass through (microbench)
    self.gaps = []                           # per server row: top-1 minus top-2 logit

  def program(self, name):
    with _LOCK:
      return self.programs.setdefault(name, dict(
          calls=0, call_s=0.0, compile_s=0.0, compiles=0, rows=0, signatures={},
          by_stage=collections.defaultdict(lambda: [0, 0.0, 0.0])))


REC = Recorder()


@contextlib.contextmanager
def stage(name: str):
  if threading.current_thread() is not threading.main_thread() or not REC.on:
    yield
    return
  _STACK.append(name)
  path = stage_path()
  s = REC.stages.setdefault(path, [0.0, 0, 0.0])  # entry order: parents before children
  t0, c0 = time.perf_counter(), time.process_time()
  try:
    yield
  finally:
    dt = time.perf_counter() - t0
    s[0] += dt
    s[1] += 1
    s[2] += time.process_time() - c0  # CPU seconds of every thread of this process
    _STACK.pop()


def _compile_listener(event: str, seconds: float, **kw):
  if not REC.on:
    return
  if event.startswith("/jax/compilation_cache/"):
    if event.endswith("compile_time_saved_sec"):
      REC.cache_saved_s += seconds
    return
  if not event.startswith("/jax/core/compile/"):
    return
  prog = getattr(_LOCAL, "program", None)
  kind = event.rsplit("/", 1)[-1]
  REC.compiles.append((prog, kw.get("fun_name", "?"), kind, seconds, stage_path()))
  if prog is not None:
    _LOCAL.compile_s = getattr(_LOCAL, "compile_s", 0.0) + seconds
    if kind == "backend_compile_duration":
      _LOCAL.compiles = getattr(_LOCAL, "compiles", 0) + 1


def _event_listener(event: str, **kw):
  if not REC.on:
    return
  if event.startswith("/jax/compilation_cache/"):
    REC.cache_events[event.rsplit("/", 1)[-1]] += 1


def _abstract(tree):
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype)
                      if not hasattr(a, "dtype") else jax.ShapeDtypeStruct(a.shape, a.dtype),
                      tree)


def _sig(args, static: dict):
  shapes = tuple((tuple(np.shape(a)), str(getattr(a, "dtype", type(a).__name__)))
                 for a in jax.tree.leaves(args[1:]))
  return (shapes, tuple(sorted((k, _short(v)) for k, v in static.items())))


def _short(v) -> str:
  """A static argument as a short, stable key (modules by class and hash)."""
  text = repr(v)
  if len(text) <= 120:
    return text
  try:
    return f"{type(v).__name__}#{hash(v) & 0xffffffff:08x}"
  except TypeError:
    return f"{type(v).__name__}@{id(v):x}"



def timed_program(name: str, fn, batch_args=(), rows_of=None):
  """``fn`` (a jitted callable) timed per call, blocking on its result (the
  callers all read the result back at once anyway). ``batch_args``: positions
  of the arguments whose axis 0 is the row axis (for FLOPs at batch 1)."""

  @functools.wraps(fn)
  def wrapper(*args, **static):
    if not REC.on:
      return fn(*args, **static)
    prev = getattr(_LOCAL, "program", None)
    _LOCAL.program, c0, n0 = name, getattr(_LOCAL, "compile_s", 0.0), \
        getattr(_LOCAL, "compiles", 0)
    t0 = time.perf_counter()
    try:
      out = fn(*args, **static)
      jax.block_until_ready(out)
    finally:
      _LOCAL.program = prev
    dt = time.perf_counter() - t0
    comp = getattr(_LOCAL, "compile_s", 0.0) - c0
    ncomp = getattr(_LOCAL, "compiles", 0) - n0
    rows = rows_of(args) if rows_of else (np.shape(args[batch_args[0]])[0] if batch_args else 0)
    sig = _sig(args, static)
    p = REC.program(name)
    with _LOCK:
      p["calls"] += 1
      p["call_s"] += dt
      p["compile_s"] += comp
      p["compiles"] += ncomp
      p["rows"] += rows
      s = p["signatures"].get(sig)
      if s is None:
        s = p["signatures"][sig] = dict(calls=0, rows=0, seconds=0.0, compile_s=0.0,
                                        args=_abstract(args), static=static, fn=fn,
                                        batch_args=batch_args)
      s["calls"] += 1
      s["rows"] += rows
      s["seconds"] += dt - comp
      s["compile_s"] += comp
      st = p["by_stage"][stage_path()]
      st[0] += 1
      st[1] += dt
      st[2] += comp
    _LOCAL.last_call = (dt, comp)
    return out
  wrapper.__wrapped__ = fn
  return wrapper


def host_timer(kind: str, count=lambda a, k, r: 1):
  """Wraps a host function: calls, seconds, items (``count``), by stage."""
  def deco(fn):
    @functools.wraps(fn)
    def wrapper(*a, **k):
      if not REC.on:
        return fn(*a, **k)
      t0 = time.perf_counter()
      r = fn(*a, **k)
      dt = time.perf_counter() - t0
      with _LOCK:
        h = REC.host[kind]
        h["calls"] += 1
        h["seconds"] += dt
        h["items"] += count(a, k, r)
        h["thread_main"] += threading.current_thread() is threading.main_thread()
      return r
    wrapper.__wrapped__ = fn
    return wrapper
  return deco


def staged(name):
  def deco(fn):
    @functools.wraps(fn)
    def wrapper(*a, **k):
      label = name(a, k) if callable(name) else name
      with stage(label):
        return fn(*a, **k)
    wrapper.__wrapped__ = fn
    return wrapper
  return deco


def patch(module: str, attr: str, make):
  """Replaces module.attr (dotted attr for class members) by make(old)."""
  try:
    obj = importlib.import_module(module)
    *owners, last = attr.split(".")
    for o in owners:
      obj = getattr(obj, o)
    old = getattr(obj, last)
  except (ImportError, AttributeError) as e:
    REC.missing.append(f"{module}.{attr} ({type(e).__name__})")
    return
  if getattr(old, "_profiled", False):  # imported by name from a module patched already
    return
  new = make(old)
  new._profiled = True
  setattr(obj, last, new)


# ---------------------------------------------------------------- hooks


def _server_rows_of(args):
  return int(np.shape(args[2])[0])


def _digest(a) -> bytes:
  return hashlib.blake2b(np.ascontiguousarray(a).tobytes(), digest_size=12).digest()


HOOKED_MODULES = (
    "rcst_jax.inference.server", "rcst_jax.inference.edge", "rcst_jax.inference.methods",
    "rcst_jax.calibration.algorithm1", "rcst_jax.calibration.certificate",
    "rcst_jax.jobs.evaluate", "rcst_jax.sweep.engine", "rcst_jax.sweep.certification",
    "rcst_jax.sweep.passes", "rcst_jax.sweep.metrics", "rcst_jax.report.outputs",
    "rcst_jax.data.synthetic", "rcst_edge.payload.codecs", "rcst_edge.payload.message",
    "rcst_jax.stats.exact", "rcst_jax.cli.parser")


def install_hooks(track_rows: bool = True):
  # Import everything first: a module that imports a name from another
  # (`from ..edge import softmax_fn`) must get the original, then be patched.
  for m in HOOKED_MODULES:
    try:
      importlib.import_module(m)
    except ImportError as e:
      REC.missing.append(f"{m} ({e})")
  jax.monitoring.register_event_duration_secs_listener(_compile_listener)
  jax.monitoring.register_event_listener(_event_listener)

  # Programs.
  for attr, name in (("_server_from_images", "server(tokens from images)"),
                     ("_server_from_patches", "server(tokens from patches)"),
                     ("_server_row_by_row", "server(row by row)")):
    patch("rcst_jax.inference.server", attr,
          lambda f, name=name: timed_program(name, f, (1, 2, 3), _server_rows_of))
  patch("rcst_jax.inference.edge", "_edge_step",
        lambda f: timed_program("edge step (B0 fwd+Grad-CAM bwd)", f, (1,)))

  def wrap_edge_step(orig):
    def edge_step(edge, images, lambda_hat, q_hat, **kw):
      if REC.on and "edge_step_call" not in REC.samples:
        REC.samples["edge_step_call"] = lambda x: jax.device_get(
            orig(edge, x, lambda_hat, q_hat, **kw))
      return orig(edge, images, lambda_hat, q_hat, **kw)
    return edge_step
  patch("rcst_jax.inference.edge", "edge_step", wrap_edge_step)
  patch("rcst_jax.inference.methods", "_decide",
        lambda f: timed_program("decide (vmapped selection)", f, (),
                                lambda a: int(np.shape(a[0]["pred"])[0])))

  def wrap_softmax_fn(orig):
    @functools.wraps(orig)
    def softmax_fn(model, sharding=None, with_attn=False):
      g = orig(model, sharding, with_attn)
      fam = type(model.module).__name__
      name = f"softmax {fam}{' + CLS attn' if with_attn else ''}"
      m = model.inference()
      from rcst_jax.data import normalize
      mean, std = tuple(m.metadata["mean"]), tuple(m.metadata["std"])

      @jax.jit
      def twin(v, x):  # the same forward, for FLOPs only (never run)
        return m.module.apply(v, normalize(x, mean, std))
      timed = timed_program(name, lambda v, x: g(x), (1,))
      out = lambda images: timed(m.variables, images)
      REC.samples.setdefault("softmax_twins", {})[name] = (twin, m)
      REC.samples.setdefault("softmax_fns", {})[name] = g
      return out
    return softmax_fn
  patch("rcst_jax.inference.edge", "softmax_fn", wrap_softmax_fn)
  patch("rcst_jax.calibration.algorithm1", "softmax_fn", wrap_softmax_fn)

  # Server bookkeeping: each call's real rows and tokens (ServerStats.add runs
  # in the calling thread right after the jitted call).
  def wrap_add(orig):
    def add(self, bucket, rows, padded_rows, useful, seconds):
      if not REC.on:
        return orig(self, bucket, rows, padded_rows, useful, seconds)
      dt, comp = getattr(_LOCAL, "last_call", (0.0, 0.0))
      with _LOCK:
        REC.server_calls.append(dict(stage=stage_path(), bucket=int(bucket), rows=int(rows),
                                     padded=int(padded_rows), useful=int(useful),
                                     seconds=float(seconds), program_s=dt, compile_s=comp))
      return orig(self, bucket, rows, padded_rows, useful, seconds)
    return add
  patch("rcst_jax.inference.server", "ServerStats.add", wrap_add)

  def wrap_logits_from_images(orig):
    def logits_from_images(self, images, keep, rows=None):
      if not REC.on:
        return orig(self, images, keep, rows)
      REC.samples.setdefault("server_model", self.model)
      if "server_images" not in REC.samples and len(images) >= 16:
        REC.samples["server_images"] = np.array(images[:64])
        REC.samples["server_keep"] = np.array(keep[:256])
        REC.samples["server_rows"] = np.array(rows[:256]) if rows is not None else None
      if track_rows:
        t0 = time.perf_counter()
        img = np.asarray(images)
        digests = {}
        r = np.arange(len(keep)) if rows is None else np.asarray(rows)
        bits = np.packbits(np.asarray(keep, bool), axis=-1)
        with _LOCK:
          for i, b in zip(r, bits):
            d = digests.get(int(i))
            if d is None:
              d = digests[int(i)] = _digest(img[int(i)])
            REC.row_keys[(d, b.tobytes())] += 1
        REC.host["profiler: row digests"]["seconds"] += time.perf_counter() - t0
      logits = orig(self, images, keep, rows)
      if len(logits) and logits.shape[-1] > 1:
        top2 = np.sort(np.asarray(logits, np.float64), -1)[:, -2:]
        gap = top2[:, 1] - top2[:, 0]
        with _LOCK:
          REC.gaps.append(gap)
      return logits
    return logits_from_images
  patch("rcst_jax.inference.server", "Server.logits_from_images", wrap_logits_from_images)

  # Stages.
  patch("rcst_jax.jobs.evaluate", "load_models", staged("load models"))
  patch("rcst_jax.jobs.evaluate", "load_sources", staged("load sources"))
  patch("rcst_jax.sweep.engine", "Sweep.__post_init__", staged("sweep setup (digests, passes)"))
  patch("rcst_jax.sweep.engine", "Sweep.calibrate", staged("calibrate"))
  patch("rcst_jax.calibration.algorithm1", "algorithm1",
        staged(lambda a, k: f"algorithm1 softmax ({len(a[2].cal_indices)} images)"))
  patch("rcst_jax.sweep.certification", "Certification.run", staged("certification"))
  patch("rcst_jax.sweep.certification", "Certification._part",
        staged(lambda a, k: f"part {a[2]} ({len(a[3])} images)"))
  patch("rcst_jax.sweep.engine", "Sweep._run_chunks", staged("test chunks"))
  patch("rcst_jax.sweep.engine", "Sweep.run_chunk", staged(lambda a, k: f"chunk {a[1]}"))
  patch("rcst_jax.sweep.engine", "Sweep.run_certified_chunk", staged("certified row"))
  patch("rcst_jax.sweep.passes", "Passes.edge_pass", staged("edge pass"))
  patch("rcst_jax.sweep.passes", "Passes.certified_view", staged("certified view (edge)"))
  patch("rcst_jax.sweep.engine", "Sweep.arrays", staged("read chunks"))
  patch("rcst_jax.sweep.metrics", "aggregate", staged("aggregate metrics"))
  patch("rcst_jax.report.outputs", "write_outputs", staged("report (tables, figures)"))

  def wrap_sweep(orig):
    def sweep(self, views, images, plan, codecs=None):
      with stage("server sweep"):
        _LOCAL.raw_images = images
        args = (views, images, plan) + (() if codecs is None else (codecs,))
        out = orig(self, *args)
        off = out[0]
        REC.sweeps.append(dict(stage=stage_path(), images=len(images),
                               points=int(off.shape[0]), decisions=int(off.sum()),
                               codecs=[str(c) for c in (codecs or ())]))
        return out
    return sweep
  patch("rcst_jax.sweep.passes", "Passes.sweep", wrap_sweep)

  def wrap_dedup(orig):
    def dedup_rows(offloaded, keep):
      out = orig(offloaded, keep)
      REC.samples.setdefault("dedup", []).append(
          (int(np.asarray(offloaded).sum()), len(out[0])))
      return out
    return dedup_rows
  patch("rcst_jax.sweep.passes", "dedup_rows", wrap_dedup)

  def wrap_server_rows(orig):
    def _server_rows(self, images, rows_keep, rows_image):
      kind = "raw pixels" if images is getattr(_LOCAL, "raw_images", None) else "lossy pixels"
      with stage(f"server rows ({kind})"):
        return orig(self, images, rows_keep, rows_image)
    return _server_rows
  patch("rcst_jax.sweep.passes", "Passes._server_rows", wrap_server_rows)

  # Host work.
  patch("rcst_jax.data.synthetic", "render_scene", host_timer("render synthetic scene"))
  patch("rcst_edge.payload.codecs", "roundtrip_images",
        lambda f: host_timer("codec roundtrip images", lambda a, k, r: len(a[0]))(
            staged(lambda a, k: f"coding: roundtrip {a[1]}")(f)))

  def coded_bytes_wrap(f):
    def coded_bytes(images, rows, keep, geometry=None, codec="raw"):
      c = str(codec)
      t0 = time.perf_counter()
      with stage(f"coding: bytes {c}"):
        out = f(images, rows, keep, geometry, codec) if geometry is not None else \
            f(images, rows, keep, codec=codec)
      h = REC.host[f"payload bytes {c}"]
      h["calls"] += 1
      h["seconds"] += time.perf_counter() - t0
      h["items"] += len(rows)
      return out
    return coded_bytes
  patch("rcst_edge.payload.message", "coded_bytes", coded_bytes_wrap)
  patch("rcst_jax.stats.exact", "_Table.__init__", host_timer("exact test: table init"))
  patch("rcst_jax.stats.exact", "_Table.get", host_timer("exact test: table rows"))
  patch("rcst_jax.stats.exact", "exact_pvalue",
        host_timer("exact test: p-values", lambda a, k, r: int(np.size(r))))
  patch("rcst_jax.calibration.certificate", "pick_certified_pair",
        lambda f: host_timer("Learn-then-Test (pick_certified_pair)")(
            staged("Learn-then-Test")(f)))
  patch("rcst_jax.calibration.certificate", "sizing",
        lambda f: host_timer("certification pilot (sizing)")(staged("pilot sizing")(f)))


# ---------------------------------------------------------------- measurements


def cpu_name() -> str:
  name = platform.processor() or "?"
  try:
    with open("/proc/cpuinfo") as f:
      text = f.read(1 << 16)
    for line in text.splitlines():
      if line.startswith("model name"):
        name = line.split(":", 1)[1].strip()
        break
    flags = " " + text.replace("\n", " ") + " "
    isa = "AVX-512" if " avx512f " in flags else "AVX2" if " avx2 " in flags else "no AVX2"
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines()
                  if ln.startswith("model\t") or ln.startswith("model  ")), "?")
    return f"{name} (family 6 model {model}, {isa}, {os.cpu_count()} CPUs)"
  except OSError:
    return name


def dot_peak(n: int = 2048, reps: int = 7) -> dict:
  """float32 n x n x n jnp.dot, GFLOP/s: median and best of ``reps``."""
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
  f = jax.jit(jnp.dot)
  jax.block_until_ready(f(a, a))
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(f(a, a))
    ts.append(time.perf_counter() - t0)
  flop = 2.0 * n ** 3
  return {"n": n, "median_gflops": flop / statistics.median(ts) / 1e9,
          "best_gflops": flop / min(ts) / 1e9}


def shaped_dot_peak(m: int, k: int, n: int, reps: int = 50) -> float:
  """GFLOP/s of one [m, k] x [k, n] float32 matmul (best of reps)."""
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
  b = jnp.asarray(rng.standard_normal((k, n)), jnp.float32)
  f = jax.jit(jnp.dot)
  jax.block_until_ready(f(a, b))
  best = min(_time(lambda: jax.block_until_ready(f(a, b))) for _ in range(reps))
  return 2.0 * m * k * n / best / 1e9


def _time(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def flops_per_row(sig: dict) -> float | None:
  """HLO cost-analysis FLOPs of one signature per row (batch 1), or of the call."""
  args, static, fn, batch = sig["args"], sig["static"], sig["fn"], sig["batch_args"]
  if batch:
    args = list(args)
    for i in batch:
      a = args[i]
      args[i] = jax.ShapeDtypeStruct((1,) + tuple(a.shape[1:]), a.dtype)
  try:
    cost = fn.lower(*args, **static).cost_analysis()
    if isinstance(cost, (list, tuple)):
      cost = cost[0]
    return float(cost.get("flops", 0.0))
  except Exception as e:  # a closure (softmax) or an API change: no count
    sig["flops_error"] = f"{type(e).__name__}: {e}"[:160]
    return None


def count_flops():
  twins = REC.samples.get("softmax_twins", {})
  for name, p in REC.programs.items():
    total, known = 0.0, True
    for sig in p["signatures"].values():
      if name in twins:
        twin, m = twins[name]
        x = sig["args"][1]
        try:
          cost = twin.lower(_abstract(m.variables),
                            jax.ShapeDtypeStruct((1,) + tuple(x.shape[1:]), x.dtype)
                            ).cost_analysis()
          f = float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])
        except Exception as e:
          sig["flops_error"] = str(e)[:160]
          f = None
      else:
        f = flops_per_row(sig)
      if f is None:
        known = False
        continue
      per_call = f * (sig["args"][sig["batch_args"][0]].shape[0] if sig["batch_args"] else 1)
      sig["flops_per_row"], sig["flops_per_call"] = f, per_call
      total += per_call * sig["calls"]
    p["flops"] = total if known else (total or None)


def deit_flops(model, bucket: int) -> float:
  """Hand count for one DeiT row of ``bucket`` patch slots (+ CLS): matmuls only."""
  mod = model.module
  d, depth, t = mod.embed_dim, mod.depth, bucket + mod.num_prefix
  hidden = int(d * mod.mlp_ratio)
  per_block = 2 * t * d * (3 * d) + 2 * t * d * d + 2 * 2 * t * d * hidden + 2 * 2 * t * t * d
  return 2 * bucket * (mod.patch_size ** 2 * 3) * d + depth * per_block + 2 * d * mod.num_classes


# ---------------------------------------------------------------- microbench


def microbench(peak: float) -> dict:
  """Server per-call cost against rows, and batch-composition bit checks."""
  from rcst_jax.inference import patches as patches_lib
  from rcst_jax.inference import server as server_lib
  out = {}
  model = REC.samples.get("server_model")
  images = REC.samples.get("server_images")
  if model is None or images is None:
    return {"skipped": "no server call was seen"}
  fn = server_lib._server_from_images
  fn = getattr(fn, "__wrapped__", fn)
  patch_size = model.module.patch_size
  num = model.module.grid ** 2
  imgs = np.concatenate([images] * 4)[:64]

  def args_for(rows, bucket, seed=0):
    r = np.random.default_rng(seed)
    idx = np.sort(np.stack([r.choice(num, bucket, replace=False) for _ in range(rows)]), 1)
    return (imgs[np.arange(rows) % len(imgs)], idx.astype(np.int32), np.ones((rows, bucket), bool))

  def call(a):
    return np.asarray(fn(model.variables, *a, module=model.module, patch=patch_size))

  timing = []
  for bucket, row_list in ((1, (1, 8, 64)), (16, (1, 8, 64)), (64, (1, 8, 31)),
                           (196, (1, 2, 4, 10))):
    for rows in row_list:
      a = args_for(rows, bucket)
      call(a)  # compile
      ts = sorted(_time(lambda: call(a)) for _ in range(15))
      t = ts[len(ts) // 4]  # lower quartile: the least disturbed calls
      fl = deit_flops(model, bucket) * rows
      timing.append(dict(bucket=bucket, rows=rows, ms=t * 1e3, us_per_row=t / rows * 1e6,
                         gflops=fl / t / 1e9, pct_peak=fl / t / 1e9 / peak * 100))
  out["server_calls"] = timing
  # A fixed cost + per-row cost fit per bucket (least squares on the timings).
  fits = {}
  for bucket in sorted({t["bucket"] for t in timing}):
    pts = [(t["rows"], t["ms"]) for t in timing if t["bucket"] == bucket]
    x, y = np.array([p[0] for p in pts], float), np.array([p[1] for p in pts])
    b, a = np.polyfit(x, y, 1)
    fits[bucket] = dict(fixed_ms=float(a), per_row_ms=float(b))
  out["fit"] = fits

  # Bit checks: the same rows in batches of other sizes and positions.
  checks = []
  for bucket in (5, 48, 196):
    a = args_for(8, bucket, seed=1)
    full = call(a)
    single = np.concatenate([call(tuple(x[i:i + 1] for x in a)) for i in range(8)])
    rev = call(tuple(x[::-1] for x in a))[::-1]
    padded = call(tuple(np.concatenate([x, x[:8]]) for x in a))[:8]
    checks.append(dict(
        bucket=bucket, batch8_vs_batch1_equal=bool(np.array_equal(full, single)),
        batch8_vs_batch1_maxdiff=float(np.abs(full - single).max()),
        reversed_order_equal=bool(np.array_equal(full, rev)),
        batch16_vs_batch8_equal=bool(np.array_equal(full, padded)),
        argmax_changes=int((full.argmax(-1) != single.argmax(-1)).sum())))
  # Companions: the same row with other rows beside it, same shape.
  for bucket in (5, 196):
    a = args_for(8, bucket, seed=2)
    b = args_for(8, bucket, seed=3)
    mixed = tuple(np.concatenate([x[:1], y[1:]]) for x, y in zip(a, b))
    ra, rm = call(a)[0], call(mixed)[0]
    checks.append(dict(bucket=bucket, companions_equal=bool(np.array_equal(ra, rm)),
                       companions_maxdiff=float(np.abs(ra - rm).max())))
  out["server_bitcheck"] = checks
  # Host->device: the same call with its inputs already on the device.
  a = args_for(10, 196)
  dev = tuple(jax.device_put(x) for x in a)
  f_dev = lambda: jax.block_until_ready(fn(model.variables, *dev, module=model.module,
                                            patch=patch_size))
  f_host = lambda: call(a)
  f_dev()
  t_dev = sorted(_time(f_dev) for _ in range(15))[3]
  t_host = sorted(_time(f_host) for _ in range(15))[3]
  out["transfer"] = dict(rows=10, bucket=196, ms_numpy_inputs=t_host * 1e3,
                         ms_device_inputs=t_dev * 1e3)
  # Inside one call: XLA thunks by kind (benchmarks/profile_xla.py).
  try:
    import io

    import profile_xla
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
      for bucket, rows in ((196, 10), (32, 62)):
        a = args_for(rows, bucket)
        profile_xla.report(f"demo server, {bucket} tokens + CLS", rows,
                           lambda v, i, x, m: fn(v, i, x, m, module=model.module,
                                                 patch=patch_size),
                           (model.variables,) + a, 5)
    out["thunks"] = buf.getvalue()
  except Exception as e:
    out["thunks"] = f"skipped: {type(e).__name__}: {e}"
  try:
    out["candidates"] = candidate_programs(model, imgs)
  except Exception as e:
    out["candidates"] = {"skipped": f"{type(e).__name__}: {e}"}
  # The edge step: the same images in a batch shifted by one row.
  edge_fn = REC.samples.get("edge_step_call")
  if edge_fn is not None:
    x = imgs[:64]
    perm = np.roll(np.arange(64), 1)
    e1, e2 = edge_fn(x), edge_fn(x[perm])
    out["edge_step_bitcheck"] = {
        k: dict(equal=bool(np.array_equal(np.asarray(e1[k]), np.asarray(e2[k])[np.argsort(perm)])))
        for k in ("probs", "patch_scores", "aps_mask") if k in e1}
  # The demo's own Server at two batch sizes on real sweep rows.
  keep, rows = REC.samples.get("server_keep"), REC.samples.get("server_rows")
  if keep is not None:
    src = REC.samples["server_images"]
    rows = np.arange(len(keep)) % len(src) if rows is None else rows
    got = {}
    for bs, budget in ((64, 2048), (64, None), (16, None), (4, None)):
      s = server_lib.Server(model, bs, patches_lib.BUCKETS, token_budget=budget)
      got[(bs, budget)] = s.logits_from_images(src, keep, rows=rows)
    base = got[(64, 2048)]
    out["server_batching_equal"] = {
        f"batch {bs} budget {b}": dict(equal=bool(np.array_equal(v, base)),
                                       maxdiff=float(np.abs(v - base).max()),
                                       argmax_changes=int((v.argmax(-1) != base.argmax(-1)).sum()))
        for (bs, b), v in got.items()}
  # Edge softmax: the same images in another batch composition.
  fns = REC.samples.get("softmax_fns", {})
  for name, g in fns.items():
    x = imgs[:64]
    first = lambda y: np.asarray(y[0] if isinstance(y, (tuple, list)) else y)
    a = first(g(x))
    perm = np.roll(np.arange(64), 1)
    b = first(g(x[perm]))[np.argsort(perm)]
    out.setdefault("softmax_bitcheck", {})[name] = dict(
        shifted_batch_equal=bool(np.array_equal(a, b)), maxdiff=float(np.abs(a - b).max()))
  return out


def candidate_programs(model, imgs) -> dict:
  """Server program variants against the current one (`_server_from_images`):
  logits bit for bit and median ms per call over interleaved rounds.

  * host patches: the kept patches gathered on the host (`_server_from_patches`);
  * per-image embed: each image's 196 patch embeddings computed once (the
    same conv, over all its patches), then gathered per row;
  * embed as dot: the patch embedding as a [K*rows, 768] x [768, D] matmul.
  """
  from rcst_edge.payload.patches import patchify
  from rcst_jax.inference import server as server_lib
  from rcst_jax.inference.patches import gather_patches
  mod, var = model.module, model.variables
  p = mod.patch_size
  mean, std = jnp.asarray(mod.mean, jnp.float32), jnp.asarray(mod.std, jnp.float32)
  imgs = np.asarray(imgs[:16])

  def encode(v, x, idx, valid):
    pos = jnp.take(v["params"]["pos_embed"][0], mod.num_prefix + idx, axis=0)
    return mod.apply(v, x, pos, valid, False, None, method=lambda mm, *a: mm._encode(*a))[0]

  @jax.jit
  def embed_images(v, images):
    pt = patchify(images, p)
    b, n = pt.shape[:2]
    x = (jnp.asarray(pt, jnp.float32) / 255.0 - mean) / std
    e = mod.apply(v, x.reshape(b * n, p, p, 3), method=lambda mm, x: mm.patch_embed(x))
    return e.reshape(b, n, mod.embed_dim)

  current = jax.jit(lambda v, im, idx, valid: server_lib._server_tokens(
      v, gather_patches(im, idx, p), idx, valid, mod))
  host = jax.jit(lambda v, pt, idx, valid: server_lib._server_tokens(v, pt, idx, valid, mod))
  embedded = jax.jit(lambda v, emb, ri, idx, valid: encode(v, emb[ri[:, None], idx], idx, valid))

  def as_dot(v, im, idx, valid):
    b, k = idx.shape
    x = (gather_patches(im, idx, p).astype(jnp.float32) / 255.0 - mean) / std
    pe = v["params"]["patch_embed"]
    x = x.reshape(b * k, -1) @ pe["kernel"].reshape(-1, mod.embed_dim) + pe["bias"]
    return encode(v, x.reshape(b, k, mod.embed_dim), idx, valid)
  as_dot = jax.jit(as_dot)

  emb = embed_images(var, imgs)
  t0 = time.perf_counter()
  for _ in range(3):
    jax.block_until_ready(embed_images(var, imgs))
  out = {"embed_ms_per_image": (time.perf_counter() - t0) / 3 / len(imgs) * 1e3, "shapes": []}
  rng = np.random.default_rng(4)
  num = mod.grid ** 2
  for bucket, rows in ((196, 10), (112, 18), (64, 31), (32, 62), (5, 64)):
    idx = np.sort(np.stack([rng.choice(num, bucket, replace=False) for _ in range(rows)]),
                  1).astype(np.int32)
    valid = np.ones((rows, bucket), bool)
    valid[::4, -1] = False
    ri = (np.arange(rows) % len(imgs)).astype(np.int32)
    im = imgs[ri]
    pt = np.take_along_axis(patchify(im, p), idx[:, :, None, None, None], axis=1)
    calls = {"current": lambda: current(var, im, idx, valid),
             "host patches": lambda: host(var, pt, idx, valid),
             "per-image embed": lambda: embedded(var, emb, ri, idx, valid),
             "embed as dot": lambda: as_dot(var, im, idx, valid)}
    res = {k: np.asarray(f()) for k, f in calls.items()}
    samples = {k: [] for k in calls}
    for _ in range(9):
      for k, f in calls.items():
        samples[k].append(_time(lambda: jax.block_until_ready(f())))
    med = {k: statistics.median(v) * 1e3 for k, v in samples.items()}
    out["shapes"].append(dict(
        bucket=bucket, rows=rows, ms=med,
        bit_equal={k: bool(np.array_equal(r, res["current"])) for k, r in res.items()},
        maxdiff={k: float(np.abs(r - res["current"]).max()) for k, r in res.items()}))
  return out


# ---------------------------------------------------------------- report


def fmt_table(header, rows, align=None) -> str:
  cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
  w = [max(len(r[i]) for r in cells) for i in range(len(header))]
  align = align or ["<"] + [">"] * (len(header) - 1)
  line = lambda r: "  ".join(f"{c:{a}{n}}" for c, a, n in zip(r, align, w))
  return "\n".join([line(cells[0]), "  ".join("-" * n for n in w)] + [line(r) for r in cells[1:]])


def report(info: dict, summary: dict | None, peak: dict, micro: dict | None) -> dict:
  p_ref = peak["median_gflops"]
  print(f"\n# profile_demo: {info['config']}  ({info['cpu']})")
  print(f"jax {jax.__version__}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; "
        f"load average {info['load_before']} -> {info['load_after']}")
  print(f"demo wall {info['demo_wall_s']:.1f} s, CPU {info['demo_cpu_s']:.1f} s "
        f"({info['demo_cpu_s'] / info['demo_wall_s']:.2f} cores busy); jnp.dot f32 "
        f"{peak['n']}^3 peak: median {peak['median_gflops']:.0f}, best {peak['best_gflops']:.0f} GFLOP/s "
        f"(after the run: {info['peak_after']['median_gflops']:.0f}); server-shaped "
        f"[2048,96]x[96,384] best {info['shaped_peak']:.0f} GFLOP/s")
  if REC.missing:
    print("hooks that found nothing to patch (renamed?): " + ", ".join(REC.missing))

  if summary:
    print("\n## The demo's own timings (summary.json)")
    print(fmt_table(["timing", "s"], [[k, f"{v:.1f}"] for k, v in summary["timings"].items()]))

  print("\n## Stages (inclusive wall seconds, nested)")
  merged = collections.OrderedDict()
  for path, (sec, n, cpu) in REC.stages.items():
    key = re.sub(r"chunk \d+", "chunk *", path)
    m = merged.setdefault(key, [0.0, 0, 0.0])
    m[0] += sec
    m[1] += n
    m[2] += cpu
  rows = [["  " * k.count("/") + k.rsplit("/", 1)[-1], n, f"{sec:.2f}", f"{cpu:.1f}",
           f"{cpu / sec:.2f}" if sec > 0.05 else "-"]
          for k, (sec, n, cpu) in merged.items()]
  print(fmt_table(["stage (chunk * = all test chunks)", "calls", "wall s", "CPU s",
                   "cores busy"], rows))

  print("\n## Programs (compile = trace + lower + XLA compile inside its calls; run = the rest)")
  count_flops()
  rows = []
  for name, p in REC.programs.items():
    run = p["call_s"] - p["compile_s"]
    fl = p.get("flops")
    rows.append([name, p["calls"], len(p["signatures"]), p["compiles"], f"{p['compile_s']:.1f}",
                 f"{run:.1f}", f"{run / max(p['calls'], 1) * 1e3:.2f}", p["rows"],
                 f"{run / max(p['rows'], 1) * 1e3:.3f}" if p["rows"] else "-",
                 f"{fl / 1e9:.0f}" if fl else "-",
                 f"{fl / run / 1e9:.1f}" if fl and run > 0 else "-",
                 f"{fl / run / 1e9 / p_ref * 100:.1f}" if fl and run > 0 else "-"])
  print(fmt_table(["program", "calls", "shapes", "compiles", "compile s", "run s", "ms/call",
                   "rows", "ms/row", "GFLOP", "GFLOP/s", "% peak"], rows))
  other = collections.defaultdict(lambda: [0, 0.0])
  for prog, fun, kind, sec, _ in REC.compiles:
    key = ("(in a timed program)" if prog else fun, kind)
    other[key][0] += 1
    other[key][1] += sec
  comp_total = sum(sec for *_, sec, _ in REC.compiles)
  backend = [c for c in REC.compiles if c[2] == "backend_compile_duration"]
  print(f"\nall compile events: {len(backend)} XLA compiles, {comp_total:.1f} s "
        f"(trace + lower + compile); persistent cache: {dict(REC.cache_events)}, "
        f"compile time saved {REC.cache_saved_s:.1f} s")
  kinds = collections.defaultdict(lambda: [0, 0.0])
  for prog, fun, kind, sec, _ in REC.compiles:
    kinds[kind][0] += 1
    kinds[kind][1] += sec
  print("by kind: " + "; ".join(f"{k.replace('_duration', '')}: {n} events, {s:.1f} s"
                                for k, (n, s) in sorted(kinds.items())))
  rows = sorted(((f, k, n, f"{s:.2f}") for (f, k), (n, s) in other.items()
                 if k == "backend_compile_duration"), key=lambda r: -float(r[3]))[:12]
  print(fmt_table(["compiled function (outside timed programs by name)", "event", "n", "s"],
                  rows))

  out = {"info": info, "peak": peak, "stages": {k: v for k, v in REC.stages.items()},
         "compile_by_kind": {k: v for k, v in kinds.items()},
         "compile_cache": {"events": dict(REC.cache_events), "saved_s": REC.cache_saved_s},
         "programs": {}, "summary_timings": summary and summary.get("timings")}
  for name, p in REC.programs.items():
    out["programs"][name] = {k: v for k, v in p.items() if k not in ("signatures", "by_stage")}
    out["programs"][name]["by_stage"] = {k: list(v) for k, v in p["by_stage"].items()}
    out["programs"][name]["signatures"] = [
        {"shapes": str(sig[0])[:300], "static": str(sig[1])[:600], **{k: v for k, v in s.items()
                                          if k in ("calls", "rows", "seconds", "compile_s",
                                                   "flops_per_row", "flops_per_call",
                                                   "flops_error")}}
        for sig, s in p["signatures"].items()]

  out["server"] = server_report(p_ref)
  out["host"] = host_report()
  if micro:
    out["microbench"] = micro
    print_micro(micro)
  return out


def _pass_name(stage: str) -> str:
  """A server call's pass: certification fit/test or test, raw or lossy pixels."""
  parts = stage.split("/")
  where = next((p.split(" (")[0] for p in parts if p.startswith("part ")), None)
  where = f"certification {where[5:]}" if where else \
      "test sweep" if any(p.startswith("chunk ") for p in parts) else \
      "certified row" if "certified row" in parts else "other"
  pix = "lossy" if any("lossy" in p for p in parts) else "raw"
  return f"{where}, {pix} pixels"


def server_report(p_ref: float) -> dict:
  calls = REC.server_calls
  if not calls:
    return {}
  model = REC.samples.get("server_model")
  print("\n## Server passes (real rows; tokens include CLS; padded = what the program ran)")
  by = collections.OrderedDict()
  for c in calls:
    by.setdefault(_pass_name(c["stage"]), []).append(c)
  # Stage walls of the server-rows stages, by pass.
  walls = collections.defaultdict(float)
  for path, (sec, *_) in REC.stages.items():
    if path.endswith("pixels)"):
      walls[_pass_name(path)] += sec
  rows, table = [], {}
  for name, cs in list(by.items()) + [("all passes", calls)]:
    n = len(cs)
    real = sum(c["rows"] for c in cs)
    padded = sum(c["padded"] for c in cs)
    useful = sum(c["useful"] for c in cs)
    processed = sum(c["padded"] * (c["bucket"] + 1) for c in cs)
    call_s = sum(c["seconds"] for c in cs)
    prog_s = sum(c["program_s"] for c in cs)
    comp_s = sum(c["compile_s"] for c in cs)
    fl = sum(deit_flops(model, c["bucket"]) * c["padded"] for c in cs) if model else 0
    wall = walls[name] if name != "all passes" else sum(walls.values())
    run = prog_s - comp_s
    table[name] = dict(calls=n, rows=real, padded_rows=padded, useful_tokens=useful,
                       processed_tokens=processed, call_s=call_s, program_s=prog_s,
                       compile_s=comp_s, wall_s=wall, gflop=fl / 1e9)
    rows.append([name, n, real, f"{real / n:.1f}", f"{padded / n:.1f}",
                 f"{useful / real:.1f}", f"{processed / padded:.1f}",
                 f"{processed / useful:.2f}", f"{wall:.1f}", f"{comp_s:.1f}",
                 f"{run:.1f}", f"{(call_s - prog_s):.1f}",
                 f"{run / n * 1e3:.1f}", f"{run / real * 1e3:.2f}",
                 f"{fl / 1e9:.0f}", f"{fl / run / 1e9:.1f}" if run > 0 else "-",
                 f"{fl / wall / 1e9:.1f}" if wall else "-"])
  print(fmt_table(["pass", "calls", "rows", "rows/call", "padded/call", "tok/row",
                   "padded tok/row", "padding x", "wall s", "compile s", "run s (sum)",
                   "host prep s", "ms/call", "ms/row", "GFLOP", "GFLOP/s per call",
                   "GFLOP/s wall"], rows))
  print(f"(jnp.dot peak {p_ref:.0f} GFLOP/s. 'run s (sum)' adds up the calls in flight at "
        "once, compile excluded; 'GFLOP/s per call' divides by it; 'GFLOP/s wall' by the "
        "pass's wall, compile included. FLOPs: hand count of the padded rows' matmuls)")

  print("\n## Server by bucket (all passes)")
  bb = collections.OrderedDict()
  for c in sorted(calls, key=lambda c: c["bucket"]):
    bb.setdefault(c["bucket"], []).append(c)
  rows, buckets = [], {}
  for b, cs in bb.items():
    run = sum(c["program_s"] - c["compile_s"] for c in cs)
    real = sum(c["rows"] for c in cs)
    padded = sum(c["padded"] for c in cs)
    shapes = sorted({c["padded"] for c in cs})
    fl = deit_flops(model, b) * padded if model else 0
    med = statistics.median([c["program_s"] - c["compile_s"] for c in cs]) * 1e3
    buckets[b] = dict(calls=len(cs), rows=real, padded=padded, shapes=shapes, run_s=run,
                      gflop=fl / 1e9, compile_s=sum(c["compile_s"] for c in cs))
    rows.append([b, len(cs), real, padded, ",".join(map(str, shapes)),
                 f"{buckets[b]['compile_s']:.1f}", f"{run:.2f}", f"{med:.2f}",
                 f"{run / real * 1e3:.3f}", f"{fl / max(run, 1e-9) / 1e9:.1f}"])
  print(fmt_table(["bucket", "calls", "rows", "padded rows", "row shapes", "compile s", "run s",
                   "median ms/call", "ms/row", "GFLOP/s"], rows))

  print("\n## Dedup and recomputation")
  dd = REC.samples.get("dedup", [])
  for s in REC.sweeps:
    print(f"  {s['stage']}: {s['images']} images x {s['points']} points, "
          f"{s['decisions']} offloaded decisions; codecs {s['codecs']}")
  if dd:
    dec, rows_ = sum(d[0] for d in dd), sum(d[1] for d in dd)
    print(f"  dedup_rows: {dec} offloaded decisions -> {rows_} distinct (image, kept set) rows "
          f"({dec / max(rows_, 1):.1f}x) over {len(dd)} sweeps")
  computed = sum(REC.row_keys.values())
  distinct = len(REC.row_keys)
  print(f"  server rows computed: {computed}; distinct (pixels, kept set) over the whole run: "
        f"{distinct} (recomputed: {computed - distinct})")
  margin = {}
  if REC.gaps:
    g = np.concatenate(REC.gaps)
    margin = {"rows": int(g.size), "min_gap": float(g.min()),
              **{f"below_{t:g}": int((g < t).sum()) for t in (1e-6, 1e-5, 1e-4, 1e-3)}}
    print(f"  top-1 minus top-2 server logit over {g.size} rows: min {g.min():.3g}; rows below "
          + ", ".join(f"{t:g}: {int((g < t).sum())}" for t in (1e-6, 1e-5, 1e-4, 1e-3))
          + " (a change of rounding smaller than the gap cannot move that row's argmax)")
  return {"passes": table, "buckets": buckets, "rows_computed": computed,
          "rows_distinct": distinct, "logit_margin": margin}


def host_report() -> dict:
  print("\n## Host work")
  rows, out = [], {}
  for k, h in sorted(REC.host.items()):
    items = h.get("items", 0)
    out[k] = dict(h)
    per = f"{h['seconds'] / items * 1e3:.3f}" if items else "-"
    rows.append([k, int(h.get("calls", 0)), int(items), f"{h['seconds']:.2f}", per])
  print(fmt_table(["task", "calls", "items", "s (sum over threads)", "ms/item"], rows))
  return out


def print_micro(m: dict):
  if "skipped" in m:
    print(f"\n## Microbench skipped: {m['skipped']}")
    return
  print("\n## Microbench: the server program alone (lower-quartile of 15 calls)")
  print(fmt_table(["bucket", "rows", "ms/call", "us/row", "GFLOP/s", "% peak"],
                  [[t["bucket"], t["rows"], f"{t['ms']:.2f}", f"{t['us_per_row']:.0f}",
                    f"{t['gflops']:.1f}", f"{t['pct_peak']:.1f}"] for t in m["server_calls"]]))
  print("fit ms = fixed + rows x per_row: " + "; ".join(
      f"bucket {b}: {f['fixed_ms']:.2f} + {f['per_row_ms']:.3f} r" for b, f in m["fit"].items()))
  print("\n## Bit checks (same rows, other batch composition)")
  for c in m["server_bitcheck"]:
    if "batch8_vs_batch1_equal" not in c:
      continue
    print(f"  server bucket {c['bucket']}: batch 8 == 8 x batch 1: {c['batch8_vs_batch1_equal']}"
          f" (max |diff| {c['batch8_vs_batch1_maxdiff']:.2e}, argmax changes "
          f"{c['argmax_changes']}); reversed order equal: {c['reversed_order_equal']}; "
          f"in a batch of 16 equal: {c['batch16_vs_batch8_equal']}")
  for k, v in m.get("server_batching_equal", {}).items():
    print(f"  Server on sweep rows, {k} vs the demo's (64, 2048): equal {v['equal']} "
          f"(max |diff| {v['maxdiff']:.2e}, argmax changes {v['argmax_changes']})")
  for c in m["server_bitcheck"]:
    if "companions_equal" in c:
      print(f"  server bucket {c['bucket']}: row 0 with other companions, same shape, equal: "
            f"{c['companions_equal']} (max |diff| {c['companions_maxdiff']:.2e})")
  for k, v in m.get("edge_step_bitcheck", {}).items():
    print(f"  edge step {k}: batch shifted by one row equal: {v['equal']}")
  t = m.get("transfer")
  if t:
    print(f"\n## Host->device: server call, {t['rows']} rows x {t['bucket']} tokens: "
          f"{t['ms_numpy_inputs']:.2f} ms from numpy inputs, {t['ms_device_inputs']:.2f} ms "
          "with inputs already on the device")
  if m.get("thunks"):
    print("\n## Inside the server program (benchmarks/profile_xla.py)" + m["thunks"])
  c = m.get("candidates") or {}
  if "shapes" in c:
    print(f"\n## Candidate server programs vs the current one (median ms/call, interleaved; "
          f"'=' bit-equal logits). Per-image embedding pre-pass: "
          f"{c['embed_ms_per_image']:.2f} ms/image")
    names = list(c["shapes"][0]["ms"])

    def cell(r, n):
      same = "=" if r["bit_equal"][n] else f"~{r['maxdiff'][n]:.0e}"
      return f"{r['ms'][n]:.1f} {same}"
    print(fmt_table(["bucket x rows"] + names,
                    [[f"{r['bucket']} x {r['rows']}"] + [cell(r, n) for n in names]
                     for r in c["shapes"]]))
  elif c:
    print(f"\n## Candidate server programs skipped: {c.get('skipped')}")
  for k, v in m.get("softmax_bitcheck", {}).items():
    print(f"  {k}: batch shifted by one row equal: {v['shifted_batch_equal']} "
          f"(max |diff| {v['maxdiff']:.2e})")


# ---------------------------------------------------------------- main


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="demo", help="demo, demo:smoke, demo:quick=N, a file")
  p.add_argument("--out", help="the demo's output_dir (default: a fresh /tmp directory)")
  p.add_argument("--json", help="write every number here")
  p.add_argument("--compilation-cache", metavar="DIR",
                 help="JAX persistent compilation cache directory (every entry cached)")
  p.add_argument("--cache-min-compile-s", type=float, default=0.0,
                 help="jax_persistent_cache_min_compile_time_secs (JAX's default is 1.0)")
  p.add_argument("--microbench", action="store_true",
                 help="after the run: server per-call cost vs rows, batch bit checks")
  p.add_argument("--no-row-digests", action="store_true",
                 help="skip hashing server rows (the recomputation count)")
  args, extra = p.parse_known_args()

  if args.compilation_cache:
    jax.config.update("jax_compilation_cache_dir", args.compilation_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", args.cache_min_compile_s)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  out_dir = args.out or tempfile.mkdtemp(prefix="profile_demo_")
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    sys.exit(f"{out_dir} is not empty: its result cache would skip work; pass a fresh --out")

  info = {"config": args.config, "extra": extra, "cpu": cpu_name(), "out": out_dir,
          "load_before": " ".join(f"{x:.1f}" for x in os.getloadavg()),
          "compilation_cache": args.compilation_cache}
  peak = dot_peak()
  info["shaped_peak"] = shaped_dot_peak(2048, 96, 384)
  install_hooks(track_rows=not args.no_row_digests)

  from rcst_jax.cli.parser import main as rcst_main
  argv = ["demo", "--config", args.config, f"--config.output_dir={out_dir}", *extra]
  t0, c0 = time.perf_counter(), time.process_time()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    rc = rcst_main(argv)
  info["demo_wall_s"] = time.perf_counter() - t0
  info["demo_cpu_s"] = time.process_time() - c0
  info["rc"] = rc
  info["load_after"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
  info["peak_after"] = dot_peak()
  summary = None
  path = os.path.join(out_dir, "summary.json")
  if os.path.exists(path):
    with open(path) as f:
      summary = json.load(f)
  REC.on = False  # the microbench's own calls are not the demo's
  micro = None
  if args.microbench:
    try:
      micro = microbench(peak["median_gflops"])
    except Exception as e:  # the run's report matters more
      micro = {"skipped": f"{type(e).__name__}: {e}"}
  result = report(info, summary, peak, micro)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1, default=str)
    print(f"\nwrote {args.json}")
  return rc


if __name__ == "__main__":
  sys.exit(main())
