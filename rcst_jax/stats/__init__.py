"""Pure maths, no other rcst_jax import: CRC and APS (`conformal`), Learn-then-Test (`ltt`)."""
