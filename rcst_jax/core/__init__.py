"""Foundations every layer may use: atomic file writes, the device mesh, the
compilation cache and XLA:CPU settings (errors, addresses and the host's
cores are in rcst_edge, below everything). Imports nothing above."""
