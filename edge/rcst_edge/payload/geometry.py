"""Patch geometry, derived once from the server ViT (or a calibration artifact).

Everything that depends on the patch grid (N, bytes of a raw image, the
payload's header fields) reads it from here instead of a typed default.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Geometry:
  image_size: int = 224
  patch: int = 16
  channels: int = 3

  def __post_init__(self):
    for name in ("image_size", "patch", "channels"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"geometry {name} must be a positive integer, got {v!r}")
    if self.image_size % self.patch:
      raise ValueError(f"image size {self.image_size} is not a multiple of patch {self.patch}")

  @property
  def grid(self) -> int:
    """P: patches per side (14 for 224 / 16)."""
    return self.image_size // self.patch

  @property
  def num_patches(self) -> int:
    """N = P * P."""
    return self.grid * self.grid

  @property
  def raw_bytes(self) -> int:
    """A full uint8 image: 224 * 224 * 3 = 150,528 B (Im et al.'s "147 KB")."""
    return self.image_size * self.image_size * self.channels

  @classmethod
  def of_server(cls, model) -> "Geometry":
    """From a loaded server `Model` (a ViT with img_size and patch_size)."""
    m = model.module
    return cls(int(m.img_size), int(m.patch_size))

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "Geometry":
    return cls(**{k: d[k] for k in ("image_size", "patch", "channels") if k in d})
