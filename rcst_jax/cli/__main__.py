"""`python -m rcst_jax.cli`: the `rcst` command."""

import sys

from rcst_jax.cli import main

sys.exit(main())
