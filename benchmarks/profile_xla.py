"""Where a compiled forward spends its time on CPU, by kind of XLA thunk.

Traces a few calls of the compiled program with ``jax.profiler``, reads the
per-thunk events back (``jax.profiler.ProfileData``) and names each fusion
from the optimised HLO of the same executable: matmuls (with their shape and
achieved GFLOP/s), matmuls fused with an exp (DeiT's attention softmax,
B0's conv_head + SiLU + head), reductions, and XLA's own loop fusions
(elementwise work, copies, B0's depthwise taps). Random fp32 weights.

  .venv/bin/python benchmarks/profile_xla.py deit [--tokens 196] [--batch 16]
  .venv/bin/python benchmarks/profile_xla.py effnet [--batch 16]

Thunk times are summed over XLA's threads; a YNNPACK fusion spreads its work
over both threads but is logged on the one that issued it, so the column
reads as time on the critical path, not CPU time.
"""

import argparse
import collections
import os
import re
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from rcst_jax.models import (
  create_model,  # noqa: E402
  efficientnet,  # noqa: E402
)

_DEF = re.compile(r"%([\w.\-]+) = \w+\[([\d,]*)\]")
_FUSION = re.compile(r"%([\w.\-]+) = (\w+\[[\d,]*\])\S* fusion\(.*?calls=%([\w.\-]+)")
_DOT = re.compile(r"= \w+\[([\d,]*)\]\S* dot\(%([\w.\-]+), %[\w.\-]+\), .*?"
                  r"lhs_contracting_dims=\{([\d,]*)\}")


def _dims(s: str) -> list:
  return [int(d) for d in s.split(",") if d]


def classify(hlo: str) -> dict:
  """fusion name -> (kind, output shape, GFLOP per execution)."""
  comps = {m.group(1): m.group(0) for m in
           re.finditer(r"^%([\w.\-]+) .*?\{\n.*?^\}$", hlo, re.S | re.M)}
  out = {}
  for name, shape, comp in _FUSION.findall(hlo):
    body = comps.get(comp, "")
    shapes = {n: _dims(d) for n, d in _DEF.findall(body)}
    flop = 0
    for out_dims, lhs, contract in _DOT.findall(body):
      k = np.prod([shapes.get(lhs, [1])[i] for i in _dims(contract)] or [1])
      flop += 2 * np.prod(_dims(out_dims)) * k
    if " dot(" in body:
      kind = "matmul + exp" if "exponential(" in body else "matmul"
    elif " convolution(" in body:
      kind = "convolution"
    elif " reduce(" in body:
      kind = "reduction"
    else:
      kind = "elementwise / copy (loop fusion)"
    out[name] = (kind, shape, flop / 1e9)
  return out


def profile(fn, args, calls: int):
  """(median wall seconds per call, {event name: [seconds per call, count per call]})."""
  compiled = jax.jit(fn).lower(*args).compile()
  for _ in range(3):
    jax.block_until_ready(compiled(*args))
  walls = []
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
      for _ in range(calls):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        walls.append(time.perf_counter() - t0)
    path = next(os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs
                if f.endswith(".xplane.pb"))
    data = jax.profiler.ProfileData.from_file(path)
  events = collections.defaultdict(lambda: [0.0, 0.0])
  for plane in data.planes:
    for line in plane.lines:
      if not line.name.startswith(("tf_XLAEigen", "tf_XLAPjRtCpuClient")):
        continue
      for ev in line.events:
        events[ev.name][0] += ev.duration_ns / 1e9 / calls
        events[ev.name][1] += 1 / calls
  return statistics.median(walls), events, compiled.as_text()


def report(title, batch, fn, args, calls):
  wall, events, hlo = profile(fn, args, calls)
  kinds = classify(hlo)
  rows = collections.defaultdict(lambda: [0.0, 0.0, 0.0])  # seconds, executions, GFLOP
  for name, (sec, n) in events.items():
    if name not in kinds:
      continue  # executor bookkeeping, while loops, waits
    kind, shape, gflop = kinds[name]
    key = (kind, shape if kind != "elementwise / copy (loop fusion)" else "")
    rows[key][0] += sec
    rows[key][1] += n
    rows[key][2] += gflop * n
  print(f"\n{title}, batch {batch}: {wall * 1e3:.0f} ms per call ({batch / wall:.1f} img/s), "
        f"median of {calls} traced calls")
  print(f"{'kind':<34} {'output shape':<22} {'ms/call':>8} {'share':>6} {'runs':>6} {'GFLOP/s':>8}")
  for (kind, shape), (sec, n, gflop) in sorted(rows.items(), key=lambda kv: -kv[1][0]):
    if sec * 1e3 < 0.5:
      continue
    rate = f"{gflop / sec:8.0f}" if gflop else f"{'':>8}"
    print(f"{kind:<34} {shape:<22} {sec * 1e3:8.1f} {sec / wall:6.1%} {n:6.0f} {rate}")
  total = sum(r[0] for r in rows.values())
  mm = sum(r[0] for (k, _), r in rows.items() if k == "matmul")
  flop = sum(r[2] for (k, _), r in rows.items() if k == "matmul")
  print(f"thunks {total * 1e3:.0f} ms; matmuls {mm * 1e3:.0f} ms at {flop / mm:.0f} GFLOP/s")


def main():
  p = argparse.ArgumentParser()
  p.add_argument("model", choices=["deit", "effnet"])
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--tokens", type=int, default=196, help="deit: kept patch tokens")
  p.add_argument("--calls", type=int, default=3)
  args = p.parse_args()
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(args.batch, 224, 224, 3)), jnp.float32)
  if args.model == "effnet":
    module = create_model("efficientnet_b0")
    fast, folded = efficientnet.fold_batchnorm(module, common.random_variables(module, x[:1]))
    report("EfficientNet-B0 forward (folded, CPU forms)", args.batch,
           lambda v, x: fast.apply(v, x)[0], (folded, x), args.calls)
    return
  module = create_model("deit_base_patch16_224")
  variables = common.random_variables(module, x[:1])
  if args.tokens == 196:
    report("DeiT-Base full image", args.batch, lambda v, x: module.apply(v, x)[0],
           (variables, x), args.calls)
    return
  k = args.tokens
  idx = np.sort(np.stack([rng.choice(196, k, replace=False) for _ in range(args.batch)]), 1)
  patches = rng.integers(0, 256, (args.batch, k, 16, 16, 3), dtype=np.uint8)
  report(f"DeiT-Base on {k} tokens", args.batch,
         lambda v, p, i, m: module.apply(v, p, i, m, method="tokens")[0],
         (variables, patches, idx, np.ones((args.batch, k), bool)), args.calls)


if __name__ == "__main__":
  main()
