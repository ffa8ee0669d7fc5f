"""The payload format (v2): exact bytes, one encoding per selection, and every
malformed message refused by name, however it was corrupted."""


import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rcst_edge.payload import codecs
from rcst_edge.payload import message as payload
from rcst_edge.payload.geometry import Geometry
from rcst_jax.inference import selection

N = 196


# ---------------------------------------------------------------------------
# Payload format.


def _random_payload(rng, k, grid=14, patch=16, c=3):
  idx = np.sort(rng.choice(grid * grid, k, replace=False))
  patches = rng.integers(0, 256, (k, patch, patch, c), dtype=np.uint8)
  return patches, idx


def test_payload_round_trip_and_length(rng):
  for k in list(range(0, 30)) + [50, 100, 195, 196]:
    patches, idx = _random_payload(rng, k)
    data = payload.encode_payload(patches, idx)
    assert len(data) == int(payload.payload_bytes(k)) == 13 + min(25, k) + 768 * k
    assert data[0] == 0xA2 and data[7:9] == b"\0\0"  # v2, codec raw, no quality
    p2, i2, g, codec = payload.decode_payload(data)
    assert codec == codecs.RAW and g == 14 and p2.dtype == np.uint8 and p2.shape == (k, 16, 16, 3)
    np.testing.assert_array_equal(p2, patches)
    np.testing.assert_array_equal(i2, idx)


@pytest.mark.parametrize("grid, patch, c, crossover", [(14, 16, 3, 25), (17, 8, 3, 18),
                                                       (2, 4, 1, 1), (16, 4, 1, 32)])
def test_index_encoding_crossover(rng, grid, patch, c, crossover):
  """List while K * width <= ceil(N/8), bitmask above; N > 256 uses 2-byte entries."""
  n = grid * grid
  for k in [crossover, crossover + 1]:
    if k > n:
      continue
    patches, idx = _random_payload(rng, k, grid, patch, c)
    data = payload.encode_payload(patches, idx, grid=grid)
    assert (data[1] & 1) == (k > crossover)
    assert (data[1] & 2) == (2 if n > 256 else 0)
    assert len(data) == int(payload.payload_bytes(k, Geometry(grid * patch, patch, c)))
    p2, i2, g2, _ = payload.decode_payload(data)
    assert g2 == grid and np.array_equal(p2, patches) and np.array_equal(i2, idx)


def test_payload_bytes_full_image_and_ratios():
  assert Geometry().raw_bytes == 150528
  assert int(payload.payload_bytes(196)) == 13 + 25 + 150528
  assert int(payload.payload_bytes(0)) == 13
  off = np.asarray([True, False, True, True])
  kept = np.asarray([10, 196, 0, 196])
  assert payload.patch_ratio(off, kept, 196) == pytest.approx((10 + 0 + 196) / (4 * 196))
  # Same as Im et al.: offload rate * mean kept over offloaded / N.
  assert payload.patch_ratio(off, kept, 196) == pytest.approx(3 / 4 * (206 / 3) / 196)
  nbytes = np.asarray([13 + 10 + 7680, 999, 13, 13 + 25 + 150528])  # index 1 is not offloaded
  want = (13 + 10 + 7680 + 13 + 13 + 25 + 150528) / (4 * 150528)
  assert payload.byte_ratio(off, nbytes) == want


@pytest.mark.parametrize("geometry", [Geometry(), Geometry(17 * 8, 8, 3)],
                         ids=["14x14 byte list", "17x17 two-byte list"])
def test_formula_bytes_equal_encoded_lengths_for_every_k(rng, geometry):
  """The sweep's byte formula vs what `rcst run` actually encodes, K = 0..N
  (list and bitmask index modes)."""
  n = geometry.num_patches
  image = rng.integers(0, 256, (geometry.image_size,) * 2 + (3,), dtype=np.uint8)
  modes = set()
  for k in range(n + 1):
    keep = np.zeros(n, bool)
    keep[rng.choice(n, k, replace=False)] = True
    data = payload.encode_image_payload(image, keep, geometry)
    modes.add(data[1] & 1)
    assert len(data) == int(payload.payload_bytes(k, geometry)), k
    patches, idx, _, _ = payload.decode_payload(data)
    np.testing.assert_array_equal(idx, np.flatnonzero(keep))
    if k:
      p = geometry.patch
      r, c = divmod(int(idx[-1]), geometry.grid)
      np.testing.assert_array_equal(patches[-1], image[r * p:(r + 1) * p, c * p:(c + 1) * p])
  assert modes == {0, 1}


H = payload.HEADER_BYTES  # 13: 9 fixed fields, then the CRC-32 at bytes 9-12


def _reseal(d):
  """Recomputes the CRC, to reach the checks behind it (a buggy or hostile encoder)."""
  d = bytes(d)
  return d[:9] + zlib.crc32(d[13:], zlib.crc32(d[:9])).to_bytes(4, "big") + d[13:]


def _set(d, pos, *values):
  return d[:pos] + bytes(values) + d[pos + len(values):]


@pytest.mark.parametrize("bad, msg", [
    (lambda d: d[:12], "truncated header"),
    (lambda d: d[:-1], "truncated payload"),
    (lambda d: d + b"\0", "over-long"),
    (lambda d: _set(d, 0, 0xA3), "magic/version"),
    (lambda d: _set(d, 0, 0xB2), "magic/version"),
    (lambda d: _reseal(_set(d, 0, 0xA1)), "version 1"),
    (lambda d: _set(d, 1, d[1] | 4), "unknown flag"),
    (lambda d: _set(d, 1, d[1] ^ 1), "non-canonical"),
    (lambda d: _set(d, 1, d[1] ^ 2), "width flag"),
    (lambda d: _set(d, 2, 0), "grid must be"),
    (lambda d: _set(d, 5, 1, 44), "exceeds"),  # K = 300
    (lambda d: _reseal(_set(d, 7, 5)), "bad codec field: unknown codec id 5"),
    (lambda d: _reseal(_set(d, 8, 5)), "bad codec field.*raw"),  # raw with a quality
    (lambda d: _reseal(_set(d, 7, 2, 0)), "bad codec field.*jpeg"),  # jpeg, no quality
    (lambda d: _reseal(_set(d, 7, 2, 101)), "bad codec field.*101"),
    (lambda d: _set(d, 7, 2, 90), "CRC-32"),  # the codec bytes are under the CRC
    (lambda d: _reseal(_set(d, 7, 2, 90)), "not a JPEG"),
    (lambda d: _reseal(_set(d, 7, 1, 0)), "not a simple lossless WebP"),
    (lambda d: _reseal(_set(d, 7, 4, 0)), "names no layout|not a zstd frame"),
    (lambda d: _reseal(_set(d, 7, 4, 9)), "bad codec field.*zstd"),
    (lambda d: _set(d, 8, 1), "bad codec field"),  # checked before the CRC
    (lambda d: d[:-1] + bytes([d[-1] ^ 1]), "CRC-32"),
    (lambda d: _set(d, 9, d[9] ^ 0x80), "CRC-32"),  # the CRC bytes themselves
    (lambda d: _set(d, H, d[H + 1], d[H]), "CRC-32"),
    (lambda d: _reseal(_set(d, H, d[H + 1], d[H])), "strictly increasing"),
    (lambda d: _reseal(_set(d, H, d[H], d[H])), "strictly increasing"),
    (lambda d: _reseal(_set(d, H + 1, 250)), "out of range"),
])
def test_decode_rejects(rng, bad, msg):
  patches, idx = _random_payload(rng, 5)
  data = payload.encode_payload(patches, idx)
  assert data[9:13] == zlib.crc32(data[13:], zlib.crc32(data[:9])).to_bytes(4, "big")
  assert _reseal(data) == data
  with pytest.raises(payload.PayloadError, match=msg):
    payload.decode_payload(bad(data))


def test_v1_payload_is_refused_by_name(rng):
  """A version-1 payload (magic 0xA1, 11-byte header, CRC at bytes 7-10) as v1 encoders wrote it."""
  patches, idx = _random_payload(rng, 5)
  fields = bytes([0xA1, 0, 14, 16, 3]) + (5).to_bytes(2, "big")
  rest = idx.astype(np.uint8).tobytes() + patches.tobytes()
  v1 = fields + zlib.crc32(rest, zlib.crc32(fields)).to_bytes(4, "big") + rest
  assert len(v1) == 11 + 5 + 5 * 768
  with pytest.raises(payload.PayloadError, match="version 1"):
    payload.decode_payload(v1)
  with pytest.raises(payload.PayloadError, match="version 1"):
    payload.decode_payload(v1[:13])


def test_decode_rejects_bitmask_inconsistencies(rng):
  patches, idx = _random_payload(rng, 40)
  data = bytearray(payload.encode_payload(patches, idx))
  zero_bit = next(i for i in range(N) if i not in set(idx))
  flipped = bytearray(data)
  flipped[H + zero_bit // 8] |= 0x80 >> (zero_bit % 8)
  with pytest.raises(payload.PayloadError, match="CRC-32"):
    payload.decode_payload(bytes(flipped))
  with pytest.raises(payload.PayloadError, match="header says K=40"):
    payload.decode_payload(_reseal(flipped))
  pad = bytearray(data)
  pad[H + 24] |= 0x01  # bit 199 of a 196-patch mask
  with pytest.raises(payload.PayloadError, match="past the last patch"):
    payload.decode_payload(_reseal(pad))


def test_encode_rejects_bad_input(rng):
  patches, idx = _random_payload(rng, 4)
  with pytest.raises(payload.PayloadError, match="uint8"):
    payload.encode_payload(patches.astype(np.float32), idx)
  with pytest.raises(payload.PayloadError, match="increasing"):
    payload.encode_payload(patches, idx[::-1])
  with pytest.raises(payload.PayloadError, match=r"\[0, 196\)"):
    payload.encode_payload(patches, np.array([0, 1, 2, 196]))
  with pytest.raises(payload.PayloadError, match="shape"):
    payload.encode_payload(patches, idx[:3])
  with pytest.raises(payload.PayloadError, match="grid"):
    payload.encode_payload(patches, idx, grid=256)


def test_payload_of_real_image_patches(rng):
  from rcst_jax.inference.patches import patchify
  img = rng.integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
  p = np.asarray(patchify(img))
  keep = np.asarray(selection.select_topk(rng.random((1, 196)), 30))[0]
  idx = np.flatnonzero(keep)
  p2, i2, _, _ = payload.decode_payload(payload.encode_payload(p[0, idx], idx))
  np.testing.assert_array_equal(p2, p[0, idx])


# ---------------------------------------------------------------------------
# Property tests: never another exception, never a silently different tensor.


def _check_decode(data):
  """Decode raises PayloadError, or returns a well-formed parse of what the
  header declares; a raw parse re-encodes to the same bytes."""
  try:
    got = payload.decode_payload(data)
  except payload.PayloadError:
    return None
  patches, idx, grid, codec = got
  data = bytes(data)
  assert isinstance(got, payload.Decoded) and isinstance(codec, codecs.Codec)
  assert (data[0], grid, codec.id, codec.quality) == (0xA2, data[2], data[7], data[8])
  k = int.from_bytes(data[5:7], "big")
  assert patches.dtype == np.uint8 and patches.shape == (k, data[3], data[3], data[4])
  assert idx.dtype == np.int64 and idx.shape == (k,)
  assert (np.diff(idx) > 0).all() and (k == 0 or 0 <= idx[0] <= idx[-1] < grid * grid)
  if codec.name == "raw" or k == 0:
    assert payload.encode_payload(patches, idx, grid=grid, codec=codec) == data
  return got


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=64), st.booleans())
def test_random_bytes_never_crash(data, v2_magic):
  _check_decode(bytes([0xA2]) + data[1:] if v2_magic and data else data)


@st.composite
def _header_fields(draw):
  """The 9 fixed fields of a v2 header, each field mostly plausible, sometimes anything."""
  def byte(*plausible):
    return draw(st.sampled_from(plausible) if draw(st.integers(0, 3)) else st.integers(0, 255))
  grid = byte(1, 2, 3, 14, 17)
  k = draw(st.integers(0, 30) if draw(st.integers(0, 3)) else st.integers(0, 2 ** 16 - 1))
  n = grid * grid
  canonical = (k * (2 if n > 256 else 1) > (n + 7) // 8) | (2 if n > 256 else 0)
  return bytes([0xA2, byte(canonical), grid, byte(1, 2, 16), byte(1, 3)]) + (
      k.to_bytes(2, "big") + bytes([byte(0, 1, 2, 3), byte(0, 1, 75, 100)]))


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(min_size=9, max_size=9), _header_fields()), st.binary(max_size=60))
def test_random_headers_never_crash(fields, rest):
  """Hand-made v2 headers with a valid CRC over random indices and bodies
  (and without one), so the checks behind the CRC see hostile input."""
  _check_decode(fields + rest)
  _check_decode(_reseal(fields + b"\0" * 4 + rest))


_CODECS = ["raw", "webp-lossless", "zstd", "jpeg:90", "jpeg:20", "jpeg420:75"]
_MAGIC = {"webp-lossless": b"RIFF", "zstd": b"\x28\xb5\x2f\xfd"}  # zstd: after its layout byte


@st.composite
def _payload_and_edit(draw, codec_specs=("raw",), min_k=0):
  codec = codecs.parse(draw(st.sampled_from(codec_specs)))
  grid = draw(st.sampled_from([1, 2, 3, 14, 17]))
  patch = draw(st.sampled_from([1, 2, 4] if codec.name == "raw" else [1, 4, 16]))
  c = draw(st.sampled_from([1, 3])) if codec.name == "raw" else 3
  k = draw(st.integers(min_k, grid * grid))
  idx = sorted(draw(st.sets(st.integers(0, grid * grid - 1), min_size=k, max_size=k)))
  rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
  patches = rng.integers(0, 256, (k, patch, patch, c), dtype=np.uint8)
  if draw(st.booleans()):  # smooth patches, which code to short bodies
    patches = np.cumsum(patches // 64, axis=1, dtype=np.uint8)
  data = payload.encode_payload(patches, np.asarray(idx, np.int64), grid=grid, codec=codec)
  kind = draw(st.sampled_from(["none", "flip", "truncate", "append", "insert", "garble"]))
  out = bytearray(data)
  if kind == "flip":
    pos = draw(st.integers(0, len(out) - 1))
    out[pos] ^= draw(st.integers(1, 255))
  elif kind == "truncate":
    out = out[:draw(st.integers(0, len(out) - 1))]
  elif kind == "append":
    out += draw(st.binary(min_size=1, max_size=4))
  elif kind == "insert":
    pos = draw(st.integers(0, len(out)))
    out[pos:pos] = draw(st.binary(min_size=1, max_size=2))
  elif kind == "garble":
    pos = draw(st.integers(0, len(out) - 1))
    junk = draw(st.binary(min_size=1, max_size=16))
    out[pos:pos + len(junk)] = junk
  return patches, np.asarray(idx, np.int64), grid, codec, kind, bytes(data), bytes(out)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_payload_and_edit(_CODECS))
def test_corrupted_payloads(case):
  patches, idx, grid, codec, kind, data, edited = case
  if codec.name == "raw":
    assert len(data) == int(payload.payload_bytes(len(idx), Geometry(
        grid * patches.shape[1], patches.shape[1], patches.shape[3])))
  got = _check_decode(edited)
  if edited == data:
    assert got is not None
    if not codec.lossy:
      np.testing.assert_array_equal(got[0], patches)
    np.testing.assert_array_equal(got[1], idx)
    assert got[2] == grid and got[3] == codec
  else:
    assert got is None  # any edit breaks the CRC (or the length the header fixes)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_payload_and_edit(_CODECS[1:], min_k=1), st.data())
def test_resealed_corrupt_bodies_decode_well_formed_or_raise(case, data):
  """A hostile or buggy encoder: coded bodies flipped, truncated, garbled or
  extended, the CRC recomputed (and for WebP sometimes the RIFF size, to reach
  the pixel decoder; zstd frames carry no checksum, so their edits reach the
  entropy decoder). Decoding gives patches of the declared shape or
  PayloadError, nothing else."""
  patches, idx, grid, codec, _, original, _ = case
  start = H + int(payload.index_bytes(idx.size, grid * grid))
  body = bytearray(original[start:])  # the header and indices stay as they were
  magic = body[1:5] if codec.name == "zstd" else body[:4]
  assert magic == _MAGIC.get(codec.name, b"\xff\xd8\xff\xe0")
  # Half the edits go past the stream's headers, into the coded pixels.
  data_start = {"webp-lossless": 21, "zstd": 10}.get(codec.name, body.find(b"\xff\xda") + 2)
  for _ in range(data.draw(st.integers(1, 3))):
    kind = data.draw(st.sampled_from(["flip", "garble", "truncate", "insert"]))
    lo = min(data_start, len(body) - 1) if data.draw(st.booleans()) else 0
    pos = data.draw(st.integers(lo, len(body) - 1))
    if kind == "flip":
      body[pos] ^= 1 << data.draw(st.integers(0, 7))
    elif kind == "garble":  # same length: overwrite up to 16 bytes
      junk = data.draw(st.binary(min_size=1, max_size=16))[:len(body) - pos]
      body[pos:pos + len(junk)] = junk
    elif kind == "truncate":
      body = body[:max(pos, 1)]
    else:
      body[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
  if codec.name == "webp-lossless" and len(body) >= 8 and data.draw(st.booleans()):
    body[4:8] = (len(body) - 8).to_bytes(4, "little")
  got = _check_decode(_reseal(original[:start] + bytes(body)))
  if got is not None:
    np.testing.assert_array_equal(got.idx, idx)
    assert got.patches.shape == patches.shape and got.codec == codec
