"""The `zstd` codec's body: the kept patches, or their gradient residuals,
whichever level-1 zstd makes shorter.

  byte 0   layout of what follows: 0 the patches' bytes [K, p, p, 3];
           1 their residual planes [3, K, p, p] (`delta_planes`)
  then     one zstd frame with its content size declared (3 K p^2 bytes),
           no dictionary, no checksum (the payload's CRC covers it), and
           nothing after it

Photos need the prediction (1.87x below raw against 1.12x for their bytes);
the demo's periodic textures compress best as they are. The decoder checks
the layout byte and the frame's declared size before decompressing anything.
"""

from __future__ import annotations

import threading

import numpy as np
import zstandard

PATCHES, RESIDUALS = 0, 1  # the layout byte
# Each ZstdCompressor / ZstdDecompressor is used by one thread at a time.
_zstd = threading.local()


class BodyError(ValueError):
  """A body that is not what its header declares (`codecs` names it CodecError)."""


def delta_planes(patches: np.ndarray) -> np.ndarray:
  """[K, p, p, 3] uint8 -> residual planes [3, K, p, p] uint8: G, R-G and B-G,
  each value less its left and upper neighbours plus the upper-left one (0
  outside the patch), all mod 256 (uint8 arithmetic wraps)."""
  g = patches[..., 1]
  planes = np.stack([g, patches[..., 0] - g, patches[..., 2] - g])
  planes[..., 1:] -= planes[..., :-1].copy()
  planes[..., 1:, :] -= planes[..., :-1, :].copy()
  return planes


def undo_delta_planes(planes: np.ndarray) -> np.ndarray:
  """The inverse of delta_planes: [3, K, p, p] -> [K, p, p, 3] (two cumulative sums)."""
  x = np.cumsum(np.cumsum(planes, axis=-2, dtype=np.uint8), axis=-1, dtype=np.uint8)
  g, r, b = x
  return np.stack([r + g, g, b + g], -1)


def encode(patches: np.ndarray, planes: np.ndarray) -> bytes:
  """The body of K patches [K, p, p, 3] given their ``delta_planes``."""
  if not hasattr(_zstd, "c"):
    # Level 1: level 3 was no smaller on residual planes and a third slower.
    _zstd.c = zstandard.ZstdCompressor(level=1, write_content_size=True, write_checksum=False)
  plain = _zstd.c.compress(np.ascontiguousarray(patches))
  delta = _zstd.c.compress(np.ascontiguousarray(planes))
  return bytes([RESIDUALS]) + delta if len(delta) < len(plain) else bytes([PATCHES]) + plain


def decode(body: bytes, k: int, p: int) -> np.ndarray:
  """The K patches [K, p, p, 3] uint8 of a body (non-empty), or BodyError."""
  want = 3 * k * p * p
  if body[0] not in (PATCHES, RESIDUALS):
    raise BodyError(f"zstd body's first byte {body[0]} names no layout (0 patches, 1 residuals)")
  frame_bytes = body[1:]
  try:
    frame = zstandard.get_frame_parameters(frame_bytes)
  except zstandard.ZstdError as e:
    raise BodyError(f"zstd body is not a zstd frame: {e}") from None
  if frame.content_size != want:  # checked before anything is decompressed
    declared = "no size" if frame.content_size == zstandard.CONTENTSIZE_UNKNOWN else (
        f"{frame.content_size} bytes")
    raise BodyError(f"zstd frame declares {declared}, the header's {k} patches of "
                    f"{p}x{p}x3 need {want}")
  if frame.dict_id:
    raise BodyError(f"zstd frame needs dictionary {frame.dict_id}; payloads use none")
  if not hasattr(_zstd, "d"):
    _zstd.d = zstandard.ZstdDecompressor()
  try:
    # allow_extra_data=False: bytes after the frame would ride along unseen.
    raw = _zstd.d.decompress(frame_bytes, max_output_size=want, allow_extra_data=False)
  except zstandard.ZstdError as e:
    raise BodyError(f"zstd body does not decode: {e}") from None
  if len(raw) != want:
    raise BodyError(f"zstd body decoded to {len(raw)} bytes, expected {want}")
  x = np.frombuffer(raw, np.uint8)
  if body[0] == PATCHES:
    return x.reshape(k, p, p, 3).copy()
  return undo_delta_planes(x.reshape(3, k, p, p))
