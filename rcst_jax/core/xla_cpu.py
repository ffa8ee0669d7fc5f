"""XLA:CPU settings that make this package's models faster, for the process.

XLA reads XLA_FLAGS when JAX first starts a backend, so these act only
before any computation. The `rcst` command applies them at start-up; a
program using the API calls :func:`tune` first (importing rcst_jax changes
nothing). Nothing here changes results, only how loops are vectorised.
"""

from __future__ import annotations

import os


def tune() -> None:
  """Lets XLA:CPU emit 512-bit loops on AVX-512 machines (its default is 256).

  The elementwise fusions of the EfficientNet edge (BN/SiLU, the shifted
  depthwise sums) run 10-20% faster with it (benchmarks/RESULTS.md). An
  explicit --xla_cpu_prefer_vector_width in XLA_FLAGS, or
  RCST_XLA_CPU_TUNING=0, wins.
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if os.environ.get("RCST_XLA_CPU_TUNING", "1") == "0" or "xla_cpu_prefer_vector_width" in flags:
    return
  try:
    with open("/proc/cpuinfo") as f:
      avx512 = " avx512f " in f.read(1 << 16).replace("\n", " ")
  except OSError:
    return
  if avx512:
    os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_prefer_vector_width=512").strip()


SERVING_FLAGS = ("--xla_cpu_multi_thread_eigen=false", "intra_op_parallelism_threads=1")


def tune_for_serving() -> None:
  """One intra-op thread for `rcst serve`: its work is many small calls while
  gRPC's threads (and, on a shared host, the clients) want the other cores,
  and a small matmul split over busy cores waits for them. With 8 client
  processes on 2 cores: 335 against 278 requests/s, while the same server
  with every payload in hand loses 5 % (benchmarks/bench_link.py). A flag
  already in XLA_FLAGS, or RCST_XLA_CPU_TUNING=0, wins; nothing changes once
  a backend has started."""
  flags = os.environ.get("XLA_FLAGS", "")
  if os.environ.get("RCST_XLA_CPU_TUNING", "1") == "0":
    return
  extra = [f for f in SERVING_FLAGS if f.split("=")[0] not in flags]
  os.environ["XLA_FLAGS"] = " ".join([flags, *extra]).strip()
