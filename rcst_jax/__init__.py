"""rcst_jax: risk-calibrated semantic transmission in JAX/Flax.

Data flows one way: data -> models (edge CNN, server ViT) -> conformal
(calibration) -> saliency -> transmit (selection, payload) -> pipeline
(Algorithm 2) -> evaluate -> plots. `convert` and `checkpoints` sit at the side.
"""

__version__ = "0.1.0"


def _prefer_wide_cpu_vectors():
  """Lets XLA:CPU emit 512-bit loops on AVX-512 machines (its default is 256).

  The elementwise fusions of the EfficientNet edge (BN/SiLU, the shifted
  depthwise sums) run 10-20% faster with it (benchmarks/RESULTS.md). XLA
  reads XLA_FLAGS when JAX first starts a backend, so this acts only if
  rcst_jax is imported before any computation; an explicit
  --xla_cpu_prefer_vector_width in XLA_FLAGS, or RCST_XLA_CPU_TUNING=0,
  wins.
  """
  import os
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


_prefer_wide_cpu_vectors()
