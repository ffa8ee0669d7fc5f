"""rcst_jax: risk-calibrated semantic transmission in JAX/Flax.

Data flows one way: data -> models (edge CNN, server ViT) -> inference
(Algorithm 2: edge step, selection, payload, server) -> calibration
(Algorithm 1 and the whole-system certificate) -> sweep -> report. `stats`
holds the pure maths (CRC, APS, Learn-then-Test); `cli` is thin. For the
CPU speed settings the `rcst` command applies, call `rcst_jax.core.xla_cpu.tune()`
before any computation.
"""

__version__ = "0.1.0"
