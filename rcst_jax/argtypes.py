"""argparse types of the command line: each refuses a bad value with a line
naming it."""

from __future__ import annotations

import argparse
import math

from rcst_jax.inference import codecs


def positive_int(text: str) -> int:
  """argparse type: an integer >= 1."""
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
  return value


def positive_float(text: str) -> float:
  """argparse type: a finite number > 0."""
  try:
    value = float(text)
  except ValueError:
    value = math.nan
  if not (math.isfinite(value) and value > 0):
    raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
  return value


def unit_float(text: str) -> float:
  """argparse type: a number in [0, 1] (a patch threshold on min-max normalised saliency)."""
  try:
    value = float(text)
  except ValueError:
    value = math.nan
  if not 0.0 <= value <= 1.0:
    raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}")
  return value


def codec(text: str):
  try:
    return codecs.parse(text)
  except codecs.CodecError as e:
    raise argparse.ArgumentTypeError(str(e)) from None
