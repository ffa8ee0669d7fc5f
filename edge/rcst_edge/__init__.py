"""The JAX-free half of rcst_jax: what an edge device runs.

`payload`: the wire format and its exact bytes; `link`: the gRPC client of
`rcst serve` and the protocol both sides agree on; `errors`, `address`,
`host`, `seal`: foundations shared with rcst_jax. Nothing here imports JAX,
Flax or rcst_jax (tests/test_layout.py checks it).
"""

__version__ = "0.1.0"
