"""`python -m rcst_edge`: the `rcst-edge` command."""

import sys

from rcst_edge.cli import main

sys.exit(main())
