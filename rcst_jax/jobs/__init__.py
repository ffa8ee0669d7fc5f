"""Whole runs from a config: `evaluate` (the sweep and its outputs), `calibrate`
(the calibration file and its verification), `train` (the demo models)."""
