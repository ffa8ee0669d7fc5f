"""What an offloaded image sends: the payload codec and its exact bytes.

Payload of one offloaded image (all integers big-endian):
  byte 0      magic/version: 0xA1 (magic nibble 0xA, version 1)
  byte 1      flags: bit 0 = index encoding (0: byte list, 1: bitmask),
              bit 1 = list entries are 2 bytes (set iff N > 256); others 0
  byte 2      grid size P (1..255), N = P*P
  byte 3      patch size p (1..255)
  byte 4      channels c (1..255)
  bytes 5-6   K, the number of patches (uint16, 0..N)
  bytes 7-10  CRC-32 (zlib) of every other byte of the payload, so a
              corrupted message is rejected rather than decoded to wrong
              pixels or positions (4 bytes: 0.003% of a raw image)
  indices     bitmask: ceil(N/8) bytes, bit i = patch i, MSB first, padding
              bits 0; list: K strictly increasing indices, 1 byte each when
              N <= 256 else 2. The encoder uses the list iff it is not longer
              than the bitmask (N=196: list for K <= 25), and the decoder
              rejects the other choice, so every payload has one encoding.
  patches     K * p * p * c uint8, patch-major in index order, each row-major
              (p, p, c).
The header is 11 bytes, so payload_bytes(K) = 11 + min(ceil(N/8), K * width)
+ K p^2 c. `encode_image_payload` / `decode_payload` are what `rcst run` sends
and receives; the sweep uses payload_bytes, which a test checks against
encoded lengths for every K. K = 0 is legal: a header-only request for CLS-only server
inference (11 bytes).
"""

from __future__ import annotations

import zlib

import numpy as np

from rcst_jax.geometry import Geometry
from rcst_jax.inference.patches import patchify

HEADER_BYTES = 11  # 7 fixed fields + CRC-32
_MAGIC_VERSION = 0xA1
_FLAG_BITMASK, _FLAG_WIDE = 0x01, 0x02


# ---------------------------------------------------------------------------
# Byte accounting.


def index_bytes(k, num_patches: int):
  """Bytes for K patch indices: the smaller of a ceil(N/8) bitmask and a byte list."""
  width = 1 if num_patches <= 256 else 2
  return np.minimum((num_patches + 7) // 8, np.asarray(k, np.int64) * width)


def payload_bytes(k, geometry: Geometry = Geometry()):
  """Exact payload length: header + min(bitmask, list) + k * patch^2 * channels."""
  k = np.asarray(k, np.int64)
  return HEADER_BYTES + index_bytes(k, geometry.num_patches) + k * (
      geometry.patch * geometry.patch * geometry.channels)


def patch_ratio(offloaded, kept, num_patches: int) -> float:
  """Im et al.'s (and the paper's Table 1) cost: sum of kept patches over
  offloaded images / (all images * N); accepted images cost 0."""
  offloaded = np.asarray(offloaded, bool)
  return float(np.where(offloaded, np.asarray(kept, np.int64), 0).sum()
               / (offloaded.shape[0] * num_patches))


def byte_ratio(offloaded, nbytes, geometry: Geometry = Geometry()) -> float:
  """Exact cost: payload bytes of offloaded images / (all images * raw image bytes).

  An offloaded image with 0 patches still costs its 11-byte header.
  """
  offloaded = np.asarray(offloaded, bool)
  return float(np.where(offloaded, np.asarray(nbytes, np.int64), 0).sum()
               / (offloaded.shape[0] * geometry.raw_bytes))


# ---------------------------------------------------------------------------
# Payload encode / decode (host side, numpy).


class PayloadError(ValueError):
  """A payload that cannot be encoded or does not decode to a well-formed message."""


def _u8(v: int, name: str) -> int:
  if not 1 <= v <= 255:
    raise PayloadError(f"{name} must be in 1..255, got {v}")
  return v


def encode_payload(patches, idx, grid: int = 14) -> bytes:
  """Serialises K kept patches [K, p, p, c] uint8 with their sorted indices [K]."""
  patches = np.asarray(patches)
  idx = np.asarray(idx)
  if patches.dtype != np.uint8:
    raise PayloadError(f"patches must be uint8, got {patches.dtype}")
  if patches.ndim != 4 or patches.shape[1] != patches.shape[2]:
    raise PayloadError(f"patches must have shape [K, p, p, c], got {patches.shape}")
  k, p, _, c = patches.shape
  n = _u8(int(grid), "grid") ** 2
  _u8(p, "patch size")
  _u8(c, "channels")
  if idx.ndim != 1 or idx.shape[0] != k:
    raise PayloadError(f"idx must have shape [{k}], got {idx.shape}")
  if k and not np.issubdtype(idx.dtype, np.integer):
    raise PayloadError(f"idx must be integers, got {idx.dtype}")
  idx = idx.astype(np.int64)
  if k and (idx.min() < 0 or idx.max() >= n):
    raise PayloadError(f"patch indices must lie in [0, {n}), got {idx.min()}..{idx.max()}")
  if np.any(np.diff(idx) <= 0):
    raise PayloadError("patch indices must be strictly increasing (sorted, no duplicates)")
  wide = n > 256
  use_list = k * (2 if wide else 1) <= (n + 7) // 8
  flags = (0 if use_list else _FLAG_BITMASK) | (_FLAG_WIDE if wide else 0)
  fields = bytes([_MAGIC_VERSION, flags, grid, p, c]) + k.to_bytes(2, "big")
  if use_list:
    index = idx.astype(">u2" if wide else np.uint8).tobytes()
  else:
    bits = np.zeros(n, np.uint8)
    bits[idx] = 1
    index = np.packbits(bits).tobytes()
  rest = index + np.ascontiguousarray(patches).tobytes()
  return fields + _crc(fields, rest).to_bytes(4, "big") + rest


def _crc(fields: bytes, rest: bytes) -> int:
  return zlib.crc32(rest, zlib.crc32(fields))


def decode_payload(data: bytes):
  """Parses a payload into (patches [K, p, p, c] uint8, idx [K] int64, grid).

  Every malformed input raises PayloadError with the reason: wrong length,
  bad magic/version/flags, non-canonical index encoding, checksum mismatch,
  out-of-range, duplicate or unsorted indices, K disagreeing with the bitmask.
  """
  if not isinstance(data, (bytes, bytearray, memoryview)):
    raise PayloadError(f"payload must be bytes, got {type(data).__name__}")
  data = bytes(data)
  if len(data) < HEADER_BYTES:
    raise PayloadError(f"truncated header: {len(data)} of {HEADER_BYTES} bytes")
  magic, flags, grid, p, c = data[:5]  # bytes 7-10 (CRC) are checked once the length is known
  k = int.from_bytes(data[5:7], "big")
  if magic != _MAGIC_VERSION:
    raise PayloadError(f"bad magic/version byte 0x{magic:02x}, expected 0x{_MAGIC_VERSION:02x}")
  if flags & ~(_FLAG_BITMASK | _FLAG_WIDE):
    raise PayloadError(f"unknown flag bits in 0x{flags:02x}")
  for v, name in ((grid, "grid"), (p, "patch size"), (c, "channels")):
    if v == 0:
      raise PayloadError(f"{name} must be >= 1, got 0")
  n = grid * grid
  if k > n:
    raise PayloadError(f"K={k} exceeds the {n} patches of a {grid}x{grid} grid")
  wide = n > 256
  if bool(flags & _FLAG_WIDE) != wide:
    raise PayloadError(f"index width flag {bool(flags & _FLAG_WIDE)} inconsistent with N={n}")
  mask_len = (n + 7) // 8
  list_len = k * (2 if wide else 1)
  use_list = list_len <= mask_len
  if bool(flags & _FLAG_BITMASK) == use_list:
    raise PayloadError(f"non-canonical index encoding for K={k}, N={n}")
  idx_len = list_len if use_list else mask_len
  body = k * p * p * c
  want = HEADER_BYTES + idx_len + body
  if len(data) != want:
    kind = "truncated" if len(data) < want else "over-long"
    raise PayloadError(f"{kind} payload: {len(data)} bytes, expected {want}")
  if int.from_bytes(data[7:11], "big") != _crc(data[:7], data[HEADER_BYTES:]):
    raise PayloadError("CRC-32 mismatch: the payload was corrupted")
  raw = data[HEADER_BYTES:HEADER_BYTES + idx_len]
  if use_list:
    idx = np.frombuffer(raw, ">u2" if wide else np.uint8).astype(np.int64)
    if k and idx.max() >= n:
      raise PayloadError(f"patch index {int(idx.max())} out of range for N={n}")
    if np.any(np.diff(idx) <= 0):
      raise PayloadError("patch indices are not strictly increasing (unsorted or duplicate)")
  else:
    bits = np.unpackbits(np.frombuffer(raw, np.uint8))
    if bits[n:].any():
      raise PayloadError("bitmask has bits set past the last patch")
    idx = np.flatnonzero(bits[:n]).astype(np.int64)
    if idx.size != k:
      raise PayloadError(f"bitmask selects {idx.size} patches but the header says K={k}")
  patches = np.frombuffer(data, np.uint8, count=body, offset=HEADER_BYTES + idx_len)
  return patches.reshape(k, p, p, c).copy(), idx, grid


def encode_image_payload(image, keep, geometry: Geometry = Geometry()) -> bytes:
  """The edge side: the kept patches of one uint8 image [H, W, c] as a payload."""
  image = np.asarray(image)
  if image.shape != (geometry.image_size, geometry.image_size, geometry.channels):
    raise PayloadError(f"image shape {image.shape} does not match the geometry "
                       f"{geometry.image_size}x{geometry.image_size}x{geometry.channels}")
  idx = np.flatnonzero(np.asarray(keep, bool))
  return encode_payload(patchify(image[None], geometry.patch)[0][idx], idx, geometry.grid)
