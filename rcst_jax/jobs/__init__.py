"""Whole runs from a config: evaluation (the sweep and its outputs),
calibration and its verification, and training the demo models."""
