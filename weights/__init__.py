"""The shipped demo models (orbax + metadata), read through importlib.resources
as ``rcst_jax.weights`` once installed; see README.md here."""
