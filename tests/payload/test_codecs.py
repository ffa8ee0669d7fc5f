"""Patch codecs: mosaic locality, lossless round trips, byte counts, decoder bounds, parsing."""

import io
import os
import subprocess
import sys
import zlib

import numpy as np
import pytest
import simplejpeg
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, WebPImagePlugin

from rcst_edge.payload import codecs, zstd_body
from rcst_edge.payload import message as payload
from rcst_jax.data import synthetic

P = 16
SUB = {"jpeg": "444", "jpeg420": "420"}


def _scene(i):
  return synthetic.render_scene(0, "test", i).image


def _noise(seed):
  return np.random.default_rng(seed).integers(0, 256, (224, 224, 3), dtype=np.uint8)


def _tiles(image):
  """The 196 patches of a 224x224 image, row-major, cut out one by one."""
  return np.stack([image[r * P:(r + 1) * P, c * P:(c + 1) * P]
                   for r in range(14) for c in range(14)])


def _mosaic(patches):
  """The mosaic the format describes, placed patch by patch: 64 a row, empty slots 0."""
  k = len(patches)
  cols = min(k, 64)
  out = np.zeros((-(-k // cols) * P, cols * P, 3), np.uint8)
  for j, patch in enumerate(patches):
    r, c = divmod(j, 64)
    out[r * P:(r + 1) * P, c * P:(c + 1) * P] = patch
  return out


def _jpeg(image, sub="444", q=90):
  return simplejpeg.encode_jpeg(np.ascontiguousarray(image), q, colorspace="RGB",
                                colorsubsampling=sub)


def _alone(patch, q, sub, fast=True):
  """One patch coded by itself with simplejpeg."""
  return simplejpeg.decode_jpeg(_jpeg(patch, sub, q), colorspace="RGB", fastupsample=fast)


def _hand_payload(body, k, codec_id, quality):
  """A v2 payload of 16x16x3 patches 0..k-1 of a 14x14 grid, built from the format
  description (byte list for K <= 25, else bitmask), CRC included."""
  fields = bytes([0xA2, int(k > 25), 14, P, 3, 0, k, codec_id, quality])
  rest = (np.packbits(np.arange(196) < k).tobytes() if k > 25 else bytes(range(k))) + body
  return fields + zlib.crc32(rest, zlib.crc32(fields)).to_bytes(4, "big") + rest


def _body(data, k):
  return data[13 + min(k, 25):]


@pytest.mark.parametrize("name", ["jpeg", "jpeg420"])
@pytest.mark.parametrize("q", [20, 75, 95])
def test_mosaic_patch_equals_patch_coded_alone_and_whole_image(name, q):
  codec = codecs.parse(f"{name}:{q}")
  rng = np.random.default_rng(q)
  for image in (_scene(0), _scene(1), _noise(q)):
    tiles = _tiles(image)
    alone = np.stack([_alone(t, q, SUB[name]) for t in tiles])
    assert not np.array_equal(alone, tiles)  # lossy: the identity is not trivial
    np.testing.assert_array_equal(_tiles(codecs.roundtrip_images(image[None], codec)[0]), alone)
    for k in (1, 7, 64, 65, 130, 196):  # 65 and 130: last mosaic row mostly empty
      idx = np.sort(rng.choice(196, k, replace=False))
      dec = payload.decode_payload(payload.encode_payload(tiles[idx], idx, 14, codec))
      np.testing.assert_array_equal(dec.idx, idx)
      np.testing.assert_array_equal(dec.patches, alone[idx], err_msg=f"{codec} K={k}")


def test_fancy_upsampling_breaks_locality():
  """Negative control: 4:2:0 decoded with fancy upsampling smears chroma across
  patch borders, so the exactness above is a property that can fail."""
  tiles = _tiles(_scene(0))
  idx = np.arange(0, 196, 2)
  body = codecs.encode_body(tiles[idx], codecs.parse("jpeg420:75"))
  fancy = simplejpeg.decode_jpeg(body, colorspace="RGB", fastupsample=False)
  fancy_tiles = np.stack([fancy[r * P:(r + 1) * P, c * P:(c + 1) * P]
                          for r in range(fancy.shape[0] // P) for c in range(64)])[:len(idx)]
  fancy_alone = np.stack([_alone(tiles[i], 75, "420", fast=False) for i in idx])
  differ = [(a != b).any() for a, b in zip(fancy_alone, fancy_tiles)]
  assert sum(differ) > len(idx) // 2
  dec = payload.decode_payload(payload.encode_payload(tiles[idx], idx, 14, "jpeg420:75")).patches
  assert any((a != b).any() for a, b in zip(fancy_alone, dec))


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["raw", "webp-lossless", "zstd"]), st.integers(0, 196),
       st.integers(0, 2 ** 31),
       st.booleans())
def test_lossless_round_trip(spec, k, seed, noise):
  rng = np.random.default_rng(seed)
  tiles = _tiles(_noise(seed) if noise else _scene(seed % 8))
  idx = np.sort(rng.choice(196, k, replace=False))
  data = payload.encode_payload(tiles[idx], idx, 14, spec)
  dec = payload.decode_payload(data)
  np.testing.assert_array_equal(dec.patches, tiles[idx])
  np.testing.assert_array_equal(dec.idx, idx)
  assert dec.codec == codecs.parse(spec)
  if spec == "webp-lossless" and k:
    body = _body(data, k)
    assert body[:4] == b"RIFF" and body[8:16] == b"WEBPVP8L"
    with Image.open(io.BytesIO(body)) as im:
      assert im.format == "WEBP" and im.size == (min(k, 64) * P, -(-k // 64) * P)
      np.testing.assert_array_equal(np.asarray(im.convert("RGB")), _mosaic(tiles[idx]))
    np.testing.assert_array_equal(codecs.to_mosaic(tiles[idx]), _mosaic(tiles[idx]))


@pytest.mark.parametrize("spec", ["raw", "webp-lossless", "zstd", "jpeg:75", "jpeg420:40"])
def test_coded_bytes_equal_encoded_lengths(spec):
  rng = np.random.default_rng(1)
  images = np.stack([_scene(0), _noise(1), _scene(2)])
  rows = np.array([0, 0, 1, 2, 2, 1])
  keep = np.zeros((6, 196), bool)
  for r, k in enumerate([0, 1, 25, 60, 196, 130]):
    keep[r, rng.choice(196, k, replace=False)] = True
  want = [len(payload.encode_payload(_tiles(images[i])[np.flatnonzero(m)], np.flatnonzero(m),
                                     14, spec)) for i, m in zip(rows, keep)]
  got = payload.coded_bytes(images, rows, keep, codec=spec)
  assert got.dtype == np.int64 and got.tolist() == want
  assert want[0] == 13  # K = 0 is the header alone, whatever the codec
  if spec == "raw":
    assert want == [13 + min(25, k) + 768 * k for k in keep.sum(-1)]


def test_jpeg_is_much_smaller_than_raw():
  tiles = _tiles(_scene(0))
  idx = np.sort(np.random.default_rng(2).choice(196, 60, replace=False))
  raw = len(payload.encode_payload(tiles[idx], idx))
  assert raw == 13 + 25 + 60 * 768
  assert len(payload.encode_payload(tiles[idx], idx, 14, "jpeg:75")) < raw / 5


@pytest.fixture
def decodes(monkeypatch):
  """Records every pixel decode (JPEG, WebP or zstd), to show a refusal came before it."""
  calls = []
  jpeg, webp = simplejpeg.decode_jpeg, WebPImagePlugin.WebPImageFile.load
  monkeypatch.setattr(simplejpeg, "decode_jpeg",
                      lambda *a, **k: calls.append("jpeg") or jpeg(*a, **k))
  monkeypatch.setattr(WebPImagePlugin.WebPImageFile, "load",
                      lambda self: calls.append("webp") or webp(self))

  class Zstd:  # the decompressor zstd uses in this thread
    def decompress(self, *a, **k):
      calls.append("zstd")
      return zstandard.ZstdDecompressor().decompress(*a, **k)
  monkeypatch.setattr(zstd_body._zstd, "d", Zstd(), raising=False)
  return calls


def _webp(image, **kw):
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, "WEBP", **({"lossless": True} | kw))
  return buf.getvalue()


def test_hand_built_payloads_match_the_encoder(decodes):
  tiles = _tiles(_scene(3))
  for k, spec, cid, q in [(4, "jpeg:90", 2, 90), (30, "webp-lossless", 1, 0),
                          (3, "jpeg420:50", 3, 50), (12, "zstd", 4, 0)]:
    data = payload.encode_payload(tiles[:k], np.arange(k), 14, spec)
    assert _hand_payload(_body(data, k), k, cid, q) == data
    payload.decode_payload(data)
  assert decodes == ["jpeg", "webp", "jpeg", "zstd"]  # the spy sees decodes


def _delta_by_hand(patches):
  """zstd's planes as its docstring states them, pixel by pixel with
  Python integers: plane 0 = G, 1 = R - G, 2 = B - G; each value minus its left
  and upper neighbours plus the upper-left one (0 outside the patch), mod 256."""
  k, p = len(patches), patches.shape[1]
  out = np.zeros((3, k, p, p), np.uint8)
  for j in range(k):
    x = patches[j].astype(int)
    planes = [x[..., 1], x[..., 0] - x[..., 1], x[..., 2] - x[..., 1]]
    for c, v in enumerate(planes):
      at = lambda i, m: int(v[i, m]) if i >= 0 and m >= 0 else 0  # noqa: E731
      for i in range(p):
        for m in range(p):
          out[c, j, i, m] = (at(i, m) - at(i, m - 1) - at(i - 1, m) + at(i - 1, m - 1)) % 256
  return out


def _ramp():
  """A noisy colour ramp: smooth content, like a photo's sky."""
  yy, xx = np.mgrid[:224, :224]
  noise = np.random.default_rng(0).integers(0, 3, (224, 224, 3))
  return (np.stack([xx, yy, (xx + yy) // 2], -1) + noise).astype(np.uint8)


def test_zstd_body_is_the_shorter_of_two_documented_frames():
  """Byte 0 names the layout, then one zstd frame (content size declared, no
  checksum) of the patches' own bytes or of the hand-computed residual
  planes, whichever a level-1 zstd makes shorter."""
  level1 = zstandard.ZstdCompressor(level=1)
  seen = set()
  for image in (_scene(2), _ramp()):
    tiles = _tiles(image)
    for idx in (np.array([0]), np.array([3, 50, 51, 195]), np.arange(0, 196, 7)):
      body = codecs.encode_body(tiles[idx], codecs.parse("zstd"))
      plain, delta = tiles[idx].tobytes(), _delta_by_hand(tiles[idx]).tobytes()
      sizes = [len(level1.compress(plain)), len(level1.compress(delta))]
      assert body[0] == int(sizes[1] < sizes[0]) and len(body) == 1 + min(sizes)
      frame = zstandard.get_frame_parameters(body[1:])
      assert frame.content_size == 3 * len(idx) * 256 and not frame.has_checksum
      assert zstandard.ZstdDecompressor().decompress(body[1:]) == (delta if body[0] else plain)
      # The sweep's per-image encoder writes the same bytes as coding the subset alone.
      assert codecs.body_encoder(tiles, codecs.parse("zstd"))(idx) == body
      seen.add(body[0])
  assert seen == {0, 1}
  # On smooth content the prediction earns its place: well below zstd on the bytes.
  some = _tiles(_ramp())[:60]
  assert len(codecs.encode_body(some, codecs.parse("zstd"))) < 0.5 * len(
      level1.compress(some.tobytes()))


def _zstd_dictionary():
  rng = np.random.default_rng(0)
  return zstandard.train_dictionary(
      2048, [rng.integers(0, 40, 300, dtype=np.uint8).tobytes() for _ in range(200)])


def _unsized_frame(data):
  co = zstandard.ZstdCompressor(write_content_size=False).compressobj()
  return co.compress(data) + co.flush()


def test_zstd_frames_declaring_other_sizes_are_refused_before_decoding(decodes):
  tiles = _tiles(_scene(4))[:4]
  planes = _delta_by_hand(tiles).tobytes()
  good = zstandard.ZstdCompressor(level=3).compress(planes)  # any conforming encoder's frame
  one = b"\1"  # residual planes follow
  cases = [
      (one + zstandard.ZstdCompressor().compress(planes[:-768]), "declares 2304 bytes"),
      (one + zstandard.ZstdCompressor().compress(planes + planes), "declares 6144 bytes"),
      (one + _unsized_frame(planes), "declares no size"),
      (one + zstandard.ZstdCompressor(dict_data=_zstd_dictionary()).compress(planes),
       "dictionary"),
      (one + _webp(_mosaic(tiles)), "not a zstd frame"),
      (b"\2" + good, "first byte 2 names no layout"),
      (good, "first byte 40 names no layout"),  # a frame without its layout byte
      (one + good + b"\0", "unused data"),
      (one + good + good, "unused data"),
  ]
  for body, msg in cases:
    with pytest.raises(payload.PayloadError, match=msg):
      payload.decode_payload(_hand_payload(body, 4, 4, 0))
  assert decodes.count("zstd") == 2  # only the two whole frames with bytes after them
  for body in (one + good, b"\0" + zstandard.ZstdCompressor(level=5).compress(tiles.tobytes())):
    np.testing.assert_array_equal(payload.decode_payload(_hand_payload(body, 4, 4, 0)).patches,
                                  tiles)


def test_bodies_declaring_other_images_are_refused_before_decoding(decodes):
  mosaic = _mosaic(_tiles(_scene(4))[:4])  # K = 4: 16x64 pixels
  gray = simplejpeg.encode_jpeg(np.ascontiguousarray(mosaic[..., :1]), 90, colorspace="GRAY")
  cases = [
      (_jpeg(np.zeros((32, 64, 3), np.uint8)), 2, 90, "declares 64x32 pixels"),
      (_jpeg(mosaic[:, :48]), 2, 90, "declares 48x16 pixels"),
      (_jpeg(mosaic, "420"), 2, 90, "YCbCr 420, jpeg:90 means YCbCr 444"),
      (_jpeg(mosaic, "444"), 3, 90, "YCbCr 444, jpeg420:90 means YCbCr 420"),
      (gray, 2, 90, "Gray"),
      (_webp(np.zeros((32, 64, 3), np.uint8)), 1, 0, "WebP declares 64x32"),
      (_webp(mosaic, lossless=False, quality=90), 1, 0, "not a simple lossless WebP"),
      (_webp(mosaic, exif=b"Exif\0\0xx"), 1, 0, "not a simple lossless WebP"),  # VP8X
      (_jpeg(mosaic), 1, 0, "not a simple lossless WebP"),
      (_webp(mosaic), 2, 90, "not a JPEG"),
  ]
  for body, cid, q, msg in cases:
    with pytest.raises(payload.PayloadError, match=msg):
      payload.decode_payload(_hand_payload(body, 4, cid, q))
  assert decodes == []
  ok = payload.decode_payload(_hand_payload(_webp(mosaic), 4, 1, 0))  # the right image passes
  np.testing.assert_array_equal(ok.patches, _tiles(_scene(4))[:4])


def test_oversize_bodies_are_refused(decodes):
  most = codecs.max_body_bytes(2, P, 3)
  assert most == 2 * 768 + 4096
  junk = b"\xff\xd8" + b"\0" * (10 * most)  # a JPEG start, then nothing
  # At the bound the size check passes and the JPEG header parse refuses it;
  # one byte more and the size check refuses it.
  with pytest.raises(payload.PayloadError, match="not a JPEG stream"):
    payload.decode_payload(_hand_payload(junk[:most], 2, 2, 90))
  for n in (most + 1, 10 * most):
    with pytest.raises(payload.PayloadError, match=f"payload of {13 + 2 + n} bytes"):
      payload.decode_payload(_hand_payload(junk[:n], 2, 2, 90))
    with pytest.raises(codecs.CodecError, match="exceeds"):
      codecs.decode_body(junk[:n], codecs.parse("jpeg:90"), 2, P, 3)
    with pytest.raises(payload.PayloadError, match="payload of"):
      payload.decode_payload(_hand_payload(_webp(np.zeros((16, 32, 3), np.uint8)) + junk[:n],
                                           2, 1, 0))
  assert decodes == []


def test_decompression_bombs_are_refused_by_the_dimension_check(decodes):
  """Tiny valid streams that declare huge images, inside payloads of few patches."""
  flat = np.full((60000, 16, 3), 77, np.uint8)
  tall = _jpeg(flat, q=10)
  k = next(k for k in range(1, 197) if codecs.max_body_bytes(k, P, 3) >= len(tall))
  assert k <= 40  # 960,000 declared pixels in a payload of at most 40 * 256
  webp_tall = _webp(flat[:16000])
  assert len(webp_tall) < 200
  sof = bytearray(_jpeg(flat[:16]))  # SOF0 rewritten to 60000x60000
  at = sof.find(b"\xff\xc0")
  sof[at + 5:at + 9] = (60000).to_bytes(2, "big") * 2
  vp8l = bytearray(_webp(flat[:16]))  # VP8L header rewritten to 8000x8000
  bits = int.from_bytes(vp8l[21:25], "little") & ~((1 << 28) - 1)
  vp8l[21:25] = (bits | 7999 | 7999 << 14).to_bytes(4, "little")
  for body, kk, cid, msg in [(tall, k, 2, "declares 16x60000"),
                             (webp_tall, 1, 1, "declares 16x16000"),
                             (bytes(sof), 1, 2, "declares 60000x60000"),
                             (bytes(vp8l), 1, 1, "declares 8000x8000")]:
    assert len(body) <= codecs.max_body_bytes(kk, P, 3)
    with pytest.raises(payload.PayloadError, match=msg):
      payload.decode_payload(_hand_payload(body, kk, cid, 10 if cid == 2 else 0))
  assert decodes == []


def test_codec_parsing():
  assert codecs.parse("jpeg:90") == codecs.Codec("jpeg", 90)
  assert codecs.parse(" jpeg420 : 75 ") == codecs.Codec("jpeg420", 75)
  assert codecs.parse("raw") == codecs.RAW == codecs.Codec("raw", 0)
  assert codecs.parse("webp-lossless").quality == 0
  assert str(codecs.parse(" jpeg420 : 75 ")) == "jpeg420:75"
  for spec, msg in [("jpeg", "needs its quality"), ("jpeg:0", "1..100, got 0"),
                    ("jpeg:101", "1..100, got 101"), ("raw:5", "no quality.*got 5"),
                    ("png", "unknown codec 'png'"), ("jpeg:x", "does not parse"),
                    ("webp-lossless:1", "got 1"), ("zstd:3", "got 3")]:
    with pytest.raises(codecs.CodecError, match=msg):
      codecs.parse(spec)
  with pytest.raises(payload.PayloadError, match="unknown codec"):
    payload.encode_payload(np.zeros((1, P, P, 3), np.uint8), [0], 14, "png")
  assert codecs.parse_grid(["raw", "jpeg:90", "jpeg420:90"]) == (
      codecs.RAW, codecs.Codec("jpeg", 90), codecs.Codec("jpeg420", 90))
  with pytest.raises(codecs.CodecError, match="twice"):
    codecs.parse_grid(["jpeg:90", "raw", " jpeg : 90"])


def test_codec_round_trips_through_the_header():
  tiles = _tiles(_scene(5))
  for spec, fields in [("raw", b"\0\0"), ("webp-lossless", b"\1\0"), ("jpeg:1", b"\2\1"),
                       ("jpeg:100", b"\2\x64"), ("jpeg420:33", b"\3\x21"),
                       ("zstd", b"\4\0")]:
    for k in (0, 3):
      data = payload.encode_payload(tiles[:k], np.arange(k), 14, codecs.parse(spec))
      assert data[7:9] == fields and payload.decode_payload(data).codec == codecs.parse(spec)


_HASHES = """
import hashlib, numpy as np
from rcst_edge.payload import codecs
def hashes(path):
  z, out = np.load(path), []
  for c in (codecs.parse("jpeg:80"), codecs.parse("jpeg420:80")):
    body = codecs.encode_body(z["tiles"], c)
    for b in (body, codecs.decode_body(body, c, len(z["tiles"]), 16, 3).tobytes(),
              codecs.roundtrip_images(z["image"][None], c).tobytes()):
      out.append(hashlib.sha256(b).hexdigest())
  return out
"""


def test_jpeg_bytes_do_not_depend_on_simd(tmp_path):
  """libjpeg-turbo's plain C paths (JSIMD_FORCENONE=1) code and decode the same bits."""
  image = _scene(6)
  np.savez(tmp_path / "in.npz", image=image, tiles=_tiles(image)[::3])
  here = {}
  exec(_HASHES, here)  # noqa: S102
  child = subprocess.run(
      [sys.executable, "-c", _HASHES + "import sys; print(*hashes(sys.argv[1]))",
       str(tmp_path / "in.npz")], env=dict(os.environ, JSIMD_FORCENONE="1"),
      capture_output=True, text=True, timeout=120, check=True)
  assert child.stdout.split() == here["hashes"](tmp_path / "in.npz")
