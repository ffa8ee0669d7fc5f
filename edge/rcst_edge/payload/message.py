"""What an offloaded image sends: the payload codec and its exact bytes.

Payload of one offloaded image, version 2 (all integers big-endian):
  byte 0      magic/version: 0xA2 (magic nibble 0xA, version 2)
  byte 1      flags: bit 0 = index encoding (0: byte list, 1: bitmask),
              bit 1 = list entries are 2 bytes (set iff N > 256); others 0
  byte 2      grid size P (1..255), N = P*P
  byte 3      patch size p (1..255)
  byte 4      channels c (1..255)
  bytes 5-6   K, the number of patches (uint16, 0..N)
  byte 7      codec of the patches (`codecs`): 0 raw, 1 webp-lossless,
              2 jpeg (4:4:4), 3 jpeg420, 4 zstd
  byte 8      codec quality: 1..100 for JPEG, 0 otherwise
  bytes 9-12  CRC-32 (zlib) of every other byte of the payload, so a
              corrupted message is rejected rather than decoded to wrong
              pixels or positions (4 bytes: 0.003% of a raw image)
  indices     bitmask: ceil(N/8) bytes, bit i = patch i, MSB first, padding
              bits 0; list: K strictly increasing indices, 1 byte each when
              N <= 256 else 2. The encoder uses the list iff it is not longer
              than the bitmask (N=196: list for K <= 25), and the decoder
              rejects the other choice, so every payload has one encoding.
  patches     raw: K * p * p * c uint8, patch-major in index order, each
              row-major (p, p, c); otherwise the K patches coded by the
              codec (`codecs.encode_body`: a mosaic image, or for zstd a
              layout byte and one zstd frame, `zstd_body`), to the end of
              the payload, at most `codecs.max_body_bytes` long. K = 0 has
              no body.
The header is 13 bytes, so a raw payload has payload_bytes(K) = 13 +
min(ceil(N/8), K * width) + K p^2 c bytes; a coded one is as long as its
encoding (`coded_bytes`). `encode_image_payload` / `decode_payload` are what
`rcst run` sends and receives; the sweep counts the same bytes (a test checks
payload_bytes against encoded lengths for every K). K = 0 is legal: a
header-only request for CLS-only server inference (13 bytes), whatever the
codec. Version 1 (no codec bytes) is refused by name.
"""

from __future__ import annotations

import concurrent.futures
import typing
import zlib

import numpy as np

from rcst_edge.payload import codecs
from rcst_edge.payload.geometry import Geometry
from rcst_edge.payload.patches import patchify

HEADER_BYTES = 13  # 9 fixed fields + CRC-32
_MAGIC_VERSION = 0xA2
_FLAG_BITMASK, _FLAG_WIDE = 0x01, 0x02


# ---------------------------------------------------------------------------
# Byte accounting.


def index_bytes(k, num_patches: int):
  """Bytes for K patch indices: the smaller of a ceil(N/8) bitmask and a byte list."""
  width = 1 if num_patches <= 256 else 2
  return np.minimum((num_patches + 7) // 8, np.asarray(k, np.int64) * width)


def payload_bytes(k, geometry: Geometry = Geometry()):
  """Exact raw payload length: header + min(bitmask, list) + k * patch^2 * channels."""
  k = np.asarray(k, np.int64)
  return HEADER_BYTES + index_bytes(k, geometry.num_patches) + k * (
      geometry.patch * geometry.patch * geometry.channels)


def coded_bytes(images, rows, keep, geometry: Geometry = Geometry(), codec=codecs.RAW):
  """Exact payload length of each row r (image ``rows[r]`` of ``images``
  [B, H, W, c] uint8, its patches ``keep[r]`` [N] bool) under ``codec``: a
  compressed payload is as long as its encoding, so every row is encoded
  (raw rows are counted by payload_bytes). int64 [R]."""
  codec = codecs.parse(codec)
  keep = np.asarray(keep, bool)
  if codec.name == "raw":
    return np.asarray(payload_bytes(keep.sum(-1), geometry), np.int64)
  images, rows = np.asarray(images, np.uint8), np.asarray(rows, np.int64)
  out = np.empty(len(rows), np.int64)

  def encode(image):  # every row of one image; the codecs release the GIL
    body = codecs.body_encoder(patchify(images[image][None], geometry.patch)[0], codec)
    for r in np.flatnonzero(rows == image):
      idx = np.flatnonzero(keep[r])
      # What encode_payload writes: header, indices, then the body (none for K = 0).
      out[r] = HEADER_BYTES + index_bytes(idx.size, geometry.num_patches) + (
          len(body(idx)) if idx.size else 0)
  with concurrent.futures.ThreadPoolExecutor(codecs.threads()) as pool:
    list(pool.map(encode, np.unique(rows)))
  return out


def patch_ratio(offloaded, kept, num_patches: int) -> float:
  """Im et al.'s (and the paper's Table 1) cost: sum of kept patches over
  offloaded images / (all images * N); accepted images cost 0."""
  offloaded = np.asarray(offloaded, bool)
  return float(np.where(offloaded, np.asarray(kept, np.int64), 0).sum()
               / (offloaded.shape[0] * num_patches))


def byte_ratio(offloaded, nbytes, geometry: Geometry = Geometry()) -> float:
  """Exact cost: payload bytes of offloaded images / (all images * raw image bytes).

  An offloaded image with 0 patches still costs its 13-byte header.
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


class Decoded(typing.NamedTuple):
  patches: np.ndarray  # [K, p, p, c] uint8, in index order
  idx: np.ndarray      # [K] int64, strictly increasing
  grid: int
  codec: codecs.Codec


def encode_payload(patches, idx, grid: int = 14, codec=codecs.RAW) -> bytes:
  """Serialises K kept patches [K, p, p, c] uint8 with their sorted indices [K],
  the patches coded by ``codec`` (a `codecs.Codec` or its spec, e.g. "jpeg:90")."""
  try:
    codec = codecs.parse(codec)
  except codecs.CodecError as e:
    raise PayloadError(str(e)) from None
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
  fields = (bytes([_MAGIC_VERSION, flags, grid, p, c]) + k.to_bytes(2, "big")
            + bytes([codec.id, codec.quality]))
  if use_list:
    index = idx.astype(">u2" if wide else np.uint8).tobytes()
  else:
    bits = np.zeros(n, np.uint8)
    bits[idx] = 1
    index = np.packbits(bits).tobytes()
  try:
    body = codecs.encode_body(patches, codec) if k else b""
  except codecs.CodecError as e:
    raise PayloadError(str(e)) from None
  rest = index + body
  return fields + _crc(fields, rest).to_bytes(4, "big") + rest


def _crc(fields: bytes, rest: bytes) -> int:
  return zlib.crc32(rest, zlib.crc32(fields))


def decode_payload(data: bytes) -> Decoded:
  """Parses a payload into `Decoded` (patches [K, p, p, c] uint8, idx [K]
  int64, grid, codec).

  Every malformed input raises PayloadError with the reason: wrong length,
  bad magic/version/flags/codec, non-canonical index encoding, checksum
  mismatch, out-of-range, duplicate or unsorted indices, K disagreeing with
  the bitmask, a coded body that declares other dimensions than the header
  or does not decode. Sizes are checked before anything is decoded.
  """
  if not isinstance(data, (bytes, bytearray, memoryview)):
    raise PayloadError(f"payload must be bytes, got {type(data).__name__}")
  data = bytes(data)
  h = _header(data)
  if int.from_bytes(data[9:13], "big") != _crc(data[:9], data[HEADER_BYTES:]):
    raise PayloadError("CRC-32 mismatch: the payload was corrupted")
  idx = _indices(data[HEADER_BYTES:h.start], h)
  if h.k == 0:
    return Decoded(np.zeros((0, h.p, h.p, h.c), np.uint8), idx, h.grid, h.codec)
  try:
    patches = codecs.decode_body(data[h.start:], h.codec, h.k, h.p, h.c)
  except codecs.CodecError as e:
    raise PayloadError(str(e)) from None
  return Decoded(patches, idx, h.grid, h.codec)


class _Header(typing.NamedTuple):
  grid: int
  p: int
  c: int
  k: int
  codec: codecs.Codec
  use_list: bool
  wide: bool
  start: int  # where the patches begin


def _header(data: bytes) -> _Header:
  """The fixed fields, checked against each other and the payload's length."""
  if len(data) < HEADER_BYTES:
    raise PayloadError(f"truncated header: {len(data)} of {HEADER_BYTES} bytes")
  magic, flags, grid, p, c = data[:5]  # bytes 9-12 (CRC) are checked once the length is known
  k = int.from_bytes(data[5:7], "big")
  if magic == 0xA1:
    raise PayloadError("payload version 1 (no codec field); this decoder reads version 2")
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
  mask_len, list_len = (n + 7) // 8, k * (2 if wide else 1)
  use_list = list_len <= mask_len
  if bool(flags & _FLAG_BITMASK) == use_list:
    raise PayloadError(f"non-canonical index encoding for K={k}, N={n}")
  try:
    codec = codecs.from_header(data[7], data[8])
  except codecs.CodecError as e:
    raise PayloadError(f"bad codec field: {e}") from None
  start = HEADER_BYTES + (list_len if use_list else mask_len)
  if codec.name == "raw" or k == 0:
    want = start + k * p * p * c
    if len(data) != want:
      kind = "truncated" if len(data) < want else "over-long"
      raise PayloadError(f"{kind} payload: {len(data)} bytes, expected {want}")
  else:
    most = start + codecs.max_body_bytes(k, p, c)
    if not start < len(data) <= most:
      raise PayloadError(f"{codec} payload of {len(data)} bytes: K={k} patches of {p}x{p}x{c} "
                         f"take {start + 1}..{most}")
  return _Header(grid, p, c, k, codec, use_list, wide, start)


def _indices(raw: bytes, h: _Header) -> np.ndarray:
  """The K patch indices, strictly increasing and in range, from their one encoding."""
  n = h.grid * h.grid
  if h.use_list:
    idx = np.frombuffer(raw, ">u2" if h.wide else np.uint8).astype(np.int64)
    if h.k and idx.max() >= n:
      raise PayloadError(f"patch index {int(idx.max())} out of range for N={n}")
    if np.any(np.diff(idx) <= 0):
      raise PayloadError("patch indices are not strictly increasing (unsorted or duplicate)")
    return idx
  bits = np.unpackbits(np.frombuffer(raw, np.uint8))
  if bits[n:].any():
    raise PayloadError("bitmask has bits set past the last patch")
  idx = np.flatnonzero(bits[:n]).astype(np.int64)
  if idx.size != h.k:
    raise PayloadError(f"bitmask selects {idx.size} patches but the header says K={h.k}")
  return idx


def encode_image_payload(image, keep, geometry: Geometry = Geometry(),
                         codec=codecs.RAW) -> bytes:
  """The edge side: the kept patches of one uint8 image [H, W, c] as a payload."""
  image = np.asarray(image)
  if image.shape != (geometry.image_size, geometry.image_size, geometry.channels):
    raise PayloadError(f"image shape {image.shape} does not match the geometry "
                       f"{geometry.image_size}x{geometry.image_size}x{geometry.channels}")
  idx = np.flatnonzero(np.asarray(keep, bool))
  return encode_payload(patchify(image[None], geometry.patch)[0][idx], idx, geometry.grid, codec)
