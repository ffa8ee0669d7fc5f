"""Variants are data: a family's VARIANTS table and the module built from one entry."""

from __future__ import annotations

import dataclasses


def build(cls, variants: dict, family: str, name: str, defaults: dict, overrides: dict):
  """``cls(**variant arch, **defaults, **overrides)`` for a known variant name;
  an unknown name or override key is a ValueError that lists the valid ones."""
  if name not in variants:
    raise ValueError(f"unknown {family} variant {name!r}; supported: {', '.join(variants)}")
  fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"unknown {family} option(s) {unknown}; fields are {sorted(fields)}")
  return cls(**{**variants[name]["arch"], **defaults, **overrides})
