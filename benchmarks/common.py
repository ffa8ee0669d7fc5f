"""Interleaved timing of rcst_jax against timm (default and best-tuned).

The machine is shared and noisy, so every case is timed as ``repeats``
rounds; each round runs every contender in a rotating order: untimed calls
for at least ``SETTLE_S`` seconds (the other contenders have just evicted its
weights and buffers from the caches, which costs 30% at batch 1, and right
after a torch contender JAX's batch-16 B0 forward runs at ~130 instead of
~200 img/s for its first ~5 calls), then ``inner`` timed calls. The
table reports the median round and the best round. torch runs in
worker processes (``torch_worker.py``): the tuned one needs LD_PRELOAD at
process start, and the JAX process then holds no OpenMP threads.
"""

import json
import os
import statistics
import subprocess
import sys
import time

from rcst_jax.core import xla_cpu

# Importing rcst_jax no longer tunes XLA:CPU; the numbers in RESULTS.md were
# measured with the `rcst` command's settings, so apply them before any
# computation starts a backend (every benchmark imports this module first).
xla_cpu.tune()

import jax  # noqa: E402

SETTLE_S = 0.3  # untimed work per contender and round, the same for all


def settle(fn, seconds: float = SETTLE_S):
  """Untimed calls until ``seconds`` have passed (at least one)."""
  t0 = time.perf_counter()
  fn()
  while time.perf_counter() - t0 < seconds:
    fn()

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import torch_worker  # noqa: E402

JAX, TIMM, TUNED = "rcst_jax", "timm", "timm tuned"


class TorchWorker:
  """One timm configuration ('default' or 'tuned') in a subprocess."""

  def __init__(self, mode: str, env=None):
    self.mode = mode
    self.proc = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "torch_worker.py"), mode],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    self.info = self._read()

  def _read(self):
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"torch worker '{self.mode}' died")
    return json.loads(line)

  def _ask(self, **req):
    self.proc.stdin.write(json.dumps(req) + "\n")
    self.proc.stdin.flush()
    return self._read()

  def prepare(self, case, batch):
    self._ask(op="prepare", case=case, batch=batch)

  def drop(self, case, batch):
    self._ask(op="drop", case=case, batch=batch)

  def timer(self, case, batch):
    return lambda inner: self._ask(op="time", case=case, batch=batch, inner=inner,
                                   settle=SETTLE_S)["s"]

  def close(self):
    self.proc.stdin.close()
    self.proc.wait()


def start_workers(tuned: bool = True):
  """{'timm': worker, 'timm tuned': worker or absent}, and a note on the tuned one."""
  workers = {TIMM: TorchWorker("default")}
  if not tuned:
    return workers, "tuned torch skipped (--no-tuned)"
  env, why = torch_worker.tuned_env()
  if env is None:
    return workers, f"tuned torch skipped: {why}"
  workers[TUNED] = TorchWorker("tuned", env)
  info = workers[TUNED].info
  note = (f"tuned torch: tcmalloc loaded={info['tcmalloc']}, MKL AMD shim loaded="
          f"{info['mkl_shim']}, channels_last, inference_mode, flush denormals")
  return workers, note


def jax_timer(fn, *args, warmup: int = 2):
  """Compiles and warms ``fn(*args)``; returns inner -> seconds per call."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))

  def run(inner):
    settle(lambda: jax.block_until_ready(fn(*args)))  # refill caches after the others ran
    t0 = time.perf_counter()
    for _ in range(inner):
      jax.block_until_ready(fn(*args))
    return (time.perf_counter() - t0) / inner
  return run


def interleaved(timers: dict, repeats: int, inner: int) -> dict:
  """Seconds per call of each timer, one sample per rotating round."""
  names = list(timers)
  samples = {n: [] for n in names}
  for r in range(repeats):
    for n in names[r % len(names):] + names[:r % len(names)]:
      time.sleep(0.05)  # let the previous contender's spinning threads go idle
      samples[n].append(timers[n](inner))
  return samples


def inner_for(batch: int, inner: int = 0) -> int:
  """Timed calls per round: ``inner`` if given, else about 0.1 s of work."""
  return inner or (12 if batch == 1 else 2)


def run_case(name, batch, jax_fn, jax_args, workers, case, repeats, inner=0, rounds=False):
  """Times one case for JAX and every worker; prints the median round and the
  best round (the least disturbed by other load), and with ``rounds`` every
  round's img/s (a dip shared by all contenders is the machine, not the
  code); returns the medians."""
  for w in workers.values():
    w.prepare(case, batch)
  timers = {JAX: jax_timer(jax_fn, *jax_args)}
  timers.update({k: w.timer(case, batch) for k, w in workers.items()})
  samples = interleaved(timers, repeats, inner_for(batch, inner))
  for w in workers.values():
    w.drop(case, batch)
  med = {k: statistics.median(s) for k, s in samples.items()}
  best = {k: min(s) for k, s in samples.items()}
  print(row(name, batch, med), flush=True)
  print(row("  (best round)", batch, best), flush=True)
  if rounds:
    for k, s in samples.items():
      print(f"    rounds, {k}: " + " ".join(f"{batch / t:.1f}" for t in s), flush=True)
  return med


def row(name: str, batch: int, med: dict, extra: str = "") -> str:
  ips = {k: batch / v for k, v in med.items()}
  cell = lambda k: f"{ips[k]:>9.1f}" if k in ips else f"{'-':>9}"
  ratio = lambda k: f"{ips[JAX] / ips[k]:>7.2f}x" if k in ips else f"{'-':>8}"
  return (f"{name:<34} {batch:>5} {cell(JAX)} {cell(TIMM)} {cell(TUNED)} "
          f"{ratio(TIMM)} {ratio(TUNED)}{extra}")


HEADER = (f"{'case (median img/s)':<34} {'batch':>5} {JAX:>9} {TIMM:>9} {TUNED:>9} "
          f"{'vs timm':>8} {'vs tuned':>8}")


def random_variables(module, *args, seed: int = 0, **kwargs):
  """Random fp32 variables from numpy (Flax's init compiles one RNG kernel
  per parameter, which is slow on CPU). Speed does not depend on the values;
  BN statistics are randomised so no layer is the identity."""
  import jax.numpy as jnp
  import numpy as np
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args, **kwargs))
  shapes = {k: v for k, v in shapes.items() if k != "perturbations"}

  def fill(path, s):
    name = jax.tree_util.keystr(path)
    if len(s.shape) > 1:  # kernels and embeddings, fan-in scaled
      return rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1]))
    if name.endswith("['scale']") or name.endswith("['var']"):
      return rng.uniform(0.5, 1.5, s.shape)
    return rng.normal(0.0, 0.2, s.shape)
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32),
                      jax.tree_util.tree_map_with_path(fill, shapes))


def print_run_header(workers, args, note: str) -> None:
  """The machine, versions and protocol line every benchmark starts with."""
  import os

  import jax
  info = workers[TIMM].info
  print(f"backend={jax.default_backend()} cpus={os.cpu_count()} jax={jax.__version__} "
        f"torch={info['torch']} threads={info['threads']} repeats={args.repeats} "
        f"inner={args.inner or 'auto'} settle={SETTLE_S}s")
  print(note)
