"""rcst_jax: risk-calibrated semantic transmission in JAX/Flax.

Data flows one way: data -> models (edge CNN, server ViT) -> conformal
(calibration) -> saliency -> transmit (selection, payload) -> pipeline
(Algorithm 2) -> evaluate -> plots. `convert` and `checkpoints` sit at the side.
"""

__version__ = "0.1.0"
