"""argparse types of the command line: each refuses a bad value with a line
naming it."""

from __future__ import annotations

import argparse
import math

from rcst_jax.payload import codecs


def _number(text: str, cast, ok, what: str):
  """``cast(text)`` if it parses and ``ok`` holds, else the error naming ``what``."""
  try:
    value = cast(text)
  except ValueError:
    value = None
  if value is None or not ok(value):
    raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
  return value


def positive_int(text: str) -> int:
  """argparse type: an integer >= 1."""
  return _number(text, int, lambda v: v >= 1, "an integer >= 1")


def positive_float(text: str) -> float:
  """argparse type: a finite number > 0."""
  return _number(text, float, lambda v: math.isfinite(v) and v > 0, "a number > 0")


def unit_float(text: str) -> float:
  """argparse type: a number in [0, 1] (a patch threshold on min-max normalised saliency)."""
  return _number(text, float, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")


def codec(text: str):
  try:
    return codecs.parse(text)
  except codecs.CodecError as e:
    raise argparse.ArgumentTypeError(str(e)) from None
