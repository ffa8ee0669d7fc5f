"""Run configs (ml_collections), importable as ``rcst_jax.configs`` once installed.

Each module has ``get_config(arg=None)``; ``arg`` picks a variant (big_vision's
convention), listed in the module's ``VARIANTS``. On the command line:
``--config imagenet``, ``--config demo:smoke``, ``--config demo:quick=300``, or
a file path (``--config my_config.py:smoke``); an existing file wins over a name.
``rcst configs`` lists them.
"""
