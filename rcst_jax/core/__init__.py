"""Foundations every layer may use: expected errors, atomic file writes, the
host's cores, the device mesh and XLA:CPU settings. Imports nothing above."""
