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
