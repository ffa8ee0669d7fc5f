"""How the kept patches are coded inside a payload: raw, lossless or mosaic JPEG.

The image codecs tile the K kept patches into one mosaic, in index order,
MOSAIC_COLUMNS patches a row (one 16-pixel strip up to 64 patches), and code
the mosaic as one image. Coding the mosaic rather than each patch shares the
file overhead (headers, Huffman tables) over all patches; coding each patch
alone saves almost nothing over raw bytes.

Codecs (chosen by measurement: benchmarks/bench_codecs.py):
  raw            the uint8 patches as they are (payload v1's body)
  zstd           lossless: zstd level 1 over either the patches' bytes or
                 their residual planes (`zstd_body`: each patch's G, R-G,
                 B-G, less the gradient prediction from the left and upper
                 neighbours, inside the patch), whichever is shorter; a first
                 byte names which. Photos need the prediction (1.9x below raw
                 against 1.1x without); the demo's periodic textures compress
                 best unpredicted. About 3x faster to encode than webp-lossless,
                 within 6 % of its bytes (smaller on the demo's objects).
  webp-lossless  WebP lossless, method 0 (Pillow's libwebp): the smallest
                 lossless mosaic measured (2.0x below raw on photos, PNG
                 1.6x, zstd on raw bytes 1.1x) at 0.9-1.5 ms to encode 60
                 patches
  jpeg:Q         JPEG at quality Q (1-100), 4:4:4 (simplejpeg's
                 libjpeg-turbo: encodes as fast as Pillow's, decodes 1.6x
                 faster, and can decode without "fancy" upsampling)
  jpeg420:Q      the same with 4:2:0 chroma, decoded with box (not "fancy")
                 upsampling

Patch locality: with patches of a multiple of 16 pixels at multiples of 16
in the mosaic, every JPEG coding unit lies inside one patch, and with 4:4:4
or box upsampling nothing crosses a unit. A patch therefore decodes to the
same pixels whatever else is in the mosaic, and the same as the same patch of
the whole image coded at Q. `roundtrip_images` uses that: the sweep codes each
test image once per quality instead of once per kept set (a test checks the
identity on every layout it relies on).

Every size is known before decoding: the decoder checks the stream's
declared width, height, colour space and chroma layout (zstd: the
frame's declared content size) against the header's K, patch size and
channels, so a hostile stream cannot make it allocate more than the raw
patches would.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import re

import numpy as np

from rcst_edge import host
from rcst_edge.payload import zstd_body

MOSAIC_COLUMNS = 64
# A compressed body longer than this is not a coded mosaic of the declared patches.
_SLACK_BYTES = 4096


class CodecError(ValueError):
  """A codec name that does not parse, or a body that does not decode as declared."""


@dataclasses.dataclass(frozen=True)
class Codec:
  name: str          # "raw", "zstd", "webp-lossless", "jpeg", "jpeg420"
  quality: int = 0   # JPEG quality 1..100; 0 for the others

  def __post_init__(self):
    if self.name not in CODEC_IDS:
      raise CodecError(f"unknown codec {self.name!r}; known: raw, zstd, "
                       "webp-lossless, jpeg:Q, jpeg420:Q")
    if self.lossy != (1 <= self.quality <= 100) or (not self.lossy and self.quality):
      raise CodecError(f"codec {self.name}: quality must be "
                       f"{'1..100' if self.lossy else '0 (no quality)'}, got {self.quality}")

  @property
  def lossy(self) -> bool:
    return self.name in ("jpeg", "jpeg420")

  @property
  def id(self) -> int:
    return CODEC_IDS[self.name]

  @property
  def spec(self) -> str:
    """The name users write: "raw", "zstd", "jpeg:90"."""
    return f"{self.name}:{self.quality}" if self.lossy else self.name

  def __str__(self) -> str:
    return self.spec


CODEC_IDS = {"raw": 0, "webp-lossless": 1, "jpeg": 2, "jpeg420": 3, "zstd": 4}
_BY_ID = {v: k for k, v in CODEC_IDS.items()}
RAW = Codec("raw")


def parse(spec) -> Codec:
  """"raw" | "zstd" | "webp-lossless" | "jpeg:Q" | "jpeg420:Q" (a Codec passes through)."""
  if isinstance(spec, Codec):
    return spec
  m = re.fullmatch(r"\s*([a-z0-9-]+)\s*(?::\s*(\d+)\s*)?", str(spec))
  if m is None:
    raise CodecError(f"codec {spec!r} does not parse: write raw, zstd, webp-lossless, "
                     "jpeg:Q or jpeg420:Q")
  name, q = m.group(1), m.group(2)
  if name in ("jpeg", "jpeg420") and q is None:
    raise CodecError(f"codec {spec!r}: a JPEG codec needs its quality, e.g. {name}:90")
  return Codec(name, int(q) if q is not None else 0)


def from_header(codec_id: int, quality: int) -> Codec:
  if codec_id not in _BY_ID:
    raise CodecError(f"unknown codec id {codec_id}")
  return Codec(_BY_ID[codec_id], quality)


def parse_grid(specs) -> tuple[Codec, ...]:
  """A config's codec list: parsed, duplicates refused."""
  out = tuple(parse(s) for s in specs)
  if len(set(out)) != len(out):
    raise CodecError(f"codec list {tuple(str(c) for c in out)} names a codec twice")
  return out


def sweep_grid(*spec_lists) -> tuple[Codec, ...]:
  """A sweep's codecs: raw first (always evaluated; it codes nothing), then
  those of ``spec_lists`` in order, each once."""
  out = dict.fromkeys([RAW] + [parse(s) for specs in spec_lists for s in specs])
  return tuple(out)


# ---------------------------------------------------------------- mosaic


def mosaic_shape(k: int, p: int) -> tuple[int, int]:
  """(height, width) in pixels of the mosaic of k patches of p pixels."""
  cols = min(k, MOSAIC_COLUMNS)
  return -(-k // cols) * p, cols * p


def to_mosaic(patches: np.ndarray) -> np.ndarray:
  """[K, p, p, c] -> [rows*p, cols*p, c]; empty slots of the last row are 0."""
  k, p, _, c = patches.shape
  rows, cols = (n // p for n in mosaic_shape(k, p))
  full = np.zeros((rows * cols, p, p, c), np.uint8)
  full[:k] = patches
  return full.reshape(rows, cols, p, p, c).transpose(0, 2, 1, 3, 4).reshape(
      rows * p, cols * p, c)


def from_mosaic(mosaic: np.ndarray, k: int, p: int) -> np.ndarray:
  rows, cols = mosaic.shape[0] // p, mosaic.shape[1] // p
  c = mosaic.shape[2]
  x = mosaic.reshape(rows, p, cols, p, c).transpose(0, 2, 1, 3, 4).reshape(rows * cols, p, p, c)
  return np.ascontiguousarray(x[:k])


# ---------------------------------------------------------------- bodies


_SUBSAMPLING = {"jpeg": "444", "jpeg420": "420"}


def _encode_jpeg(image: np.ndarray, codec: Codec) -> bytes:
  import simplejpeg  # noqa: PLC0415 (only payloads that use JPEG need it)
  return simplejpeg.encode_jpeg(np.ascontiguousarray(image), codec.quality, colorspace="RGB",
                                colorsubsampling=_SUBSAMPLING[codec.name])


def encode_body(patches: np.ndarray, codec: Codec) -> bytes:
  """The coded bytes of K patches [K, p, p, c] uint8 (K >= 1 for compressed codecs)."""
  if codec.name == "raw":
    return np.ascontiguousarray(patches).tobytes()
  k, p, _, c = patches.shape
  if c != 3:
    raise CodecError(f"codec {codec}: needs 3 channels, got {c}")
  if codec.name == "zstd":
    return zstd_body.encode(patches, zstd_body.delta_planes(patches))
  mosaic = to_mosaic(patches)
  if codec.lossy:
    return _encode_jpeg(mosaic, codec)
  from PIL import Image  # noqa: PLC0415
  buf = io.BytesIO()
  Image.fromarray(mosaic).save(buf, "WEBP", lossless=True, method=0, quality=0)
  return buf.getvalue()


def body_encoder(tiles: np.ndarray, codec: Codec):
  """``idx -> encode_body(tiles[idx], codec)`` for many subsets of one image's
  patches [N, p, p, c]; zstd predicts within each patch, so its residual
  planes are computed once per image rather than once per subset."""
  if codec.name == "zstd" and tiles.shape[-1] == 3:
    planes = zstd_body.delta_planes(tiles)
    return lambda idx: zstd_body.encode(tiles[idx], planes[:, idx])
  return lambda idx: encode_body(tiles[idx], codec)


def max_body_bytes(k: int, p: int, c: int) -> int:
  """The longest body a payload of k patches may declare: raw size plus slack."""
  return k * p * p * c + _SLACK_BYTES


def decode_body(body: bytes, codec: Codec, k: int, p: int, c: int) -> np.ndarray:
  """The K patches [K, p, p, c] uint8 a body codes; CodecError names what is wrong."""
  if codec.name == "raw":
    if len(body) != k * p * p * c:
      raise CodecError(f"raw body of {len(body)} bytes, expected {k * p * p * c}")
    return np.frombuffer(body, np.uint8).reshape(k, p, p, c).copy()
  if k == 0:
    raise CodecError(f"codec {codec}: a payload without patches has no body")
  if c != 3:
    raise CodecError(f"codec {codec}: needs 3 channels, got {c}")
  if len(body) > max_body_bytes(k, p, c):
    raise CodecError(f"{codec} body of {len(body)} bytes exceeds {max_body_bytes(k, p, c)} "
                     f"for {k} patches")
  if codec.name == "zstd":
    try:
      return zstd_body.decode(body, k, p)
    except zstd_body.BodyError as e:
      raise CodecError(str(e)) from None
  h, w = mosaic_shape(k, p)
  mosaic = _decode_jpeg(body, codec, h, w) if codec.lossy else _decode_webp(body, h, w)
  return from_mosaic(mosaic, k, p)


def _decode_jpeg(body: bytes, codec: Codec, h: int, w: int) -> np.ndarray:
  import simplejpeg  # noqa: PLC0415
  try:
    got_h, got_w, space, sub = simplejpeg.decode_jpeg_header(body)
  except ValueError as e:
    raise CodecError(f"{codec} body is not a JPEG stream: {e}") from None
  if (got_h, got_w) != (h, w):
    raise CodecError(f"JPEG declares {got_w}x{got_h} pixels, the header's patches need {w}x{h}")
  if body[-2:] != b"\xff\xd9":  # bytes after the end of image would ride along unseen
    raise CodecError(f"{codec} body does not end with the JPEG end-of-image marker")
  if space != "YCbCr" or sub != _SUBSAMPLING[codec.name]:
    raise CodecError(f"JPEG is {space} {sub}, {codec} means YCbCr {_SUBSAMPLING[codec.name]}")
  try:
    out = simplejpeg.decode_jpeg(body, colorspace="RGB", fastupsample=True)
  except ValueError as e:
    raise CodecError(f"{codec} body does not decode: {e}") from None
  if out.shape != (h, w, 3):
    raise CodecError(f"JPEG decoded to {out.shape}, expected {(h, w, 3)}")
  return out


def _decode_webp(body: bytes, h: int, w: int) -> np.ndarray:
  from PIL import Image  # noqa: PLC0415
  # A plain lossless WebP: RIFF header, then the one VP8L chunk, nothing else.
  if body[:4] != b"RIFF" or body[8:16] != b"WEBPVP8L":
    raise CodecError("webp-lossless body is not a simple lossless WebP (RIFF/WEBP/VP8L)")
  if int.from_bytes(body[4:8], "little") != len(body) - 8:
    raise CodecError("webp-lossless body's RIFF size disagrees with its length")
  try:
    with Image.open(io.BytesIO(body), formats=("WEBP",)) as im:
      if im.size != (w, h):  # read from the header, before any pixel is decoded
        raise CodecError(f"WebP declares {im.size[0]}x{im.size[1]} pixels, the header's "
                         f"patches need {w}x{h}")
      if getattr(im, "n_frames", 1) != 1:
        raise CodecError("WebP body is animated")
      out = np.asarray(im.convert("RGB") if im.mode != "RGB" else im)
  except CodecError:
    raise
  except Exception as e:  # Pillow raises OSError/ValueError/SyntaxError on bad streams
    raise CodecError(f"webp-lossless body does not decode: {e}") from None
  if out.shape != (h, w, 3):
    raise CodecError(f"WebP decoded to {out.shape}, expected {(h, w, 3)}")
  return out


def roundtrip_images(images: np.ndarray, codec: Codec) -> np.ndarray:
  """What the server decodes, for every patch of every image [B, H, W, 3] at once.

  For the lossy codecs each whole image is coded at the codec's quality and
  decoded (patch locality makes every patch of it the patch the payload's
  mosaic decodes to); lossless codecs return the images themselves.
  """
  images = np.asarray(images, np.uint8)
  if not codec.lossy:
    return images
  import simplejpeg  # noqa: PLC0415

  def roundtrip(im):
    return simplejpeg.decode_jpeg(_encode_jpeg(im, codec), colorspace="RGB", fastupsample=True)
  with concurrent.futures.ThreadPoolExecutor(threads()) as pool:
    return np.stack(list(pool.map(roundtrip, images)))


def threads() -> int:
  """Host threads for coding many payloads (libjpeg-turbo, libwebp and zstd release the GIL)."""
  return min(8, host.cores())
