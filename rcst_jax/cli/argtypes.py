"""argparse types of the command line: each refuses a bad value with a line
naming it."""

from __future__ import annotations

import argparse
import math

from rcst_edge import address, errors
from rcst_edge.payload import codecs


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


def int_in(low: int, high: int):
  """argparse type: an integer in [low, high]."""
  def parse(text: str) -> int:
    return _number(text, int, lambda v: low <= v <= high, f"an integer in {low}..{high}")
  parse.__name__ = "integer"
  return parse


def float_in(low: float, high: float, low_open: bool = False):
  """argparse type: a finite number in [low, high] (``low_open``: (low, high])."""
  def parse(text: str) -> float:
    ok = (lambda v: low < v <= high) if low_open else (lambda v: low <= v <= high)
    return _number(text, float, lambda v: math.isfinite(v) and ok(v),
                   f"a number in {'(' if low_open else '['}{low:g}, {high:g}]")
  parse.__name__ = "number"
  return parse


def buckets(text: str) -> tuple[int, ...]:
  """argparse type: comma-separated integers >= 1, e.g. 16,64,196 (sorted, once each)."""
  try:
    out = tuple(sorted({int(b) for b in text.split(",")}))
  except ValueError:
    out = ()
  if not out or out[0] < 1:
    raise argparse.ArgumentTypeError(f"must be comma-separated integers >= 1, got {text!r}")
  return out


def listen_address(text: str) -> str:
  """argparse type: HOST:PORT to listen on (port 0: any free one)."""
  try:
    address.parse_address(text, any_port=True)
  except errors.RcstError as e:
    raise argparse.ArgumentTypeError(str(e).replace("address must", "must")) from None
  return text


def codec(text: str):
  try:
    return codecs.parse(text)
  except codecs.CodecError as e:
    raise argparse.ArgumentTypeError(str(e)) from None
