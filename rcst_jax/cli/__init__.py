"""The `rcst` command line, a thin layer over the library: `parser` (the
arguments and `main`), `commands` (what each does), `serve` (`rcst serve`
and the client of `rcst run --server HOST:PORT`), `argtypes`.

`main` is the console script; `parse_config` reads a config as the commands do.
"""

from rcst_jax.cli.commands import parse_config
from rcst_jax.cli.parser import build_parser, main

__all__ = ["build_parser", "main", "parse_config"]
