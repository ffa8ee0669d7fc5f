"""One preprocessing for edge and server: what an edge device must do to an
image before its model sees it, without JAX.

The server receives pixels cut from the edge's image, so both models must see
the same 224x224 crop: resize the short side to 256 (bicubic), centre crop 224,
keep uint8 until the model normalises. This is timm's eval transform
(``Resize(floor(224 / 0.875))`` + ``CenterCrop(224)``) done with PIL, so
accuracies are comparable with timm's.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
from typing import Any

import numpy as np
from PIL import Image

from rcst_edge.errors import ConfigError, RcstError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


# Refused before decoding or resizing, so one odd file cannot exhaust memory:
# 64 Mpixel is 192 MB as RGB; an aspect of 50 resized to a 256 short side is
# still only 256 x 12800.
MAX_PIXELS = 64_000_000
MAX_ASPECT = 50


class BadItemError(RcstError):
  """An item a run should skip and count, not die on. `reason` keys the counter."""
  reason = "bad_item"


class BadImageError(BadItemError):
  """The bytes or file cannot be decoded as an image."""
  reason = "bad_image"


class ImageSizeError(BadImageError):
  """Too many pixels or too extreme an aspect ratio to process safely."""
  reason = "bad_image_size"


class BadLabelError(BadItemError):
  """The label is missing or outside [0, num_classes)."""
  reason = "bad_label"


# ---------------------------------------------------------------- pixels


def check_size(width: int, height: int, name: str = "<image>") -> None:
  """Refuses empty, huge (> MAX_PIXELS) and extreme (> MAX_ASPECT) images, naming why."""
  if width < 1 or height < 1:
    raise ImageSizeError(f"{name}: empty image ({width}x{height})")
  if width * height > MAX_PIXELS:
    raise ImageSizeError(f"{name}: image too large ({width}x{height} = {width * height}"
                         f" pixels > {MAX_PIXELS})")
  if max(width, height) > MAX_ASPECT * min(width, height):
    raise ImageSizeError(f"{name}: aspect ratio too extreme ({width}x{height},"
                         f" more than {MAX_ASPECT}:1)")


def _to_rgb(img: Image.Image, name: str) -> Image.Image:
  """RGB with 8 bits per channel; high-bit-depth gray is scaled, never clipped.

  PIL's own convert('RGB') clips 16-bit values above 255 (a normal 16-bit PNG
  turns white). Integer modes (I;16*, I) are read as 16-bit, 0..65535 -> 0..255
  by round(v / 257); float images (F) must hold intensities in [0, 1].
  """
  if img.mode.startswith("I"):
    a = np.asarray(img)
    if a.size and (a.min() < 0 or a.max() > 65535):
      raise BadImageError(f"{name}: {img.mode} image with values in [{a.min()}, {a.max()}],"
                          " outside the 16-bit range [0, 65535]; cannot scale to 8 bits")
    a8 = ((a.astype(np.uint32) + 128) // 257).astype(np.uint8)  # round(v/257): never a tie
    return Image.fromarray(a8, "L").convert("RGB")
  if img.mode == "F":
    a = np.asarray(img, np.float32)
    if not np.isfinite(a).all() or (a.size and (a.min() < 0 or a.max() > 1)):
      raise BadImageError(f"{name}: float image with values outside [0, 1] (or NaN);"
                          " its intensity range is unknown")
    return Image.fromarray(np.round(a * 255).astype(np.uint8), "L").convert("RGB")
  return img.convert("RGB")


def open_rgb(path_or_bytes: str | os.PathLike | bytes) -> Image.Image:
  """Decodes fully and converts to RGB (grayscale, 16-bit, palette, RGBA, CMYK, ...).

  The size is checked from the header, before the pixels are decoded.
  """
  name = "<bytes>" if isinstance(path_or_bytes, (bytes, bytearray)) else os.fspath(path_or_bytes)
  src = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, (bytes, bytearray)) else name
  try:
    with Image.open(src) as img:
      check_size(*img.size, name)
      # The conversion forces the full decode, so truncated files fail here, not later.
      return _to_rgb(img, name)
  except BadImageError:
    raise
  except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
    if isinstance(e, (FileNotFoundError, IsADirectoryError, PermissionError)):
      raise BadImageError(f"cannot read image {name}: {e.strerror}") from e
    raise BadImageError(f"cannot decode image {name}: {e}") from e


def array_to_rgb(image: np.ndarray) -> np.ndarray:
  """Makes a decoded array uint8 [H, W, 3]: gray [H,W] / [H,W,1] and RGBA accepted."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise BadImageError(f"expected a uint8 image, got {image.dtype}")
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3, 4) or min(image.shape[:2]) < 1:
    raise BadImageError(f"not an image array: shape {image.shape}")
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  return image[..., :3]  # RGBA -> RGB drops alpha, as PIL's convert('RGB') does


def resize_short_side(img: Image.Image, size: int, interpolation: str = "bicubic") -> Image.Image:
  """torchvision ``Resize(int)``: short side -> size, long side truncated to int."""
  w, h = img.size
  if w <= h:
    new_w, new_h = size, int(size * h / w)
  else:
    new_w, new_h = int(size * w / h), size
  if (new_w, new_h) == (w, h):
    return img
  return img.resize((new_w, new_h), INTERPOLATIONS[interpolation])


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """torchvision ``CenterCrop``: offsets use Python's round (half to even)."""
  h, w = image.shape[:2]
  if h < size or w < size:
    raise ValueError(f"cannot crop {size} from a {h}x{w} image")
  top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
  return image[top:top + size, left:left + size]


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """Resize short side, centre crop -> uint8 [crop, crop, 3]. Callable on a
  path, encoded bytes, a PIL image or a uint8 array."""
  resize_size: int = 256
  crop_size: int = 224
  interpolation: str = "bicubic"

  def __post_init__(self):
    if self.interpolation not in INTERPOLATIONS:
      raise ConfigError(f"unknown interpolation {self.interpolation!r}; "
                       f"one of {sorted(INTERPOLATIONS)}")
    if self.resize_size < self.crop_size:
      raise ConfigError(f"resize_size {self.resize_size} < crop_size {self.crop_size}")

  @classmethod
  def from_timm_cfg(cls, cfg: dict[str, Any]) -> "Preprocess":
    """From a timm pretrained cfg: resize = floor(input / crop_pct).

    crop_pct=1.0 with 224 input leaves 224x224 images (e.g. SyntheticShapes) untouched.
    A key that is absent takes timm's default; a key that is present must be valid.
    """
    size = int(_get(cfg, "input_size", (3, 224, 224))[-1])
    crop_pct = _get(cfg, "crop_pct", 0.875)
    if (isinstance(crop_pct, bool) or not isinstance(crop_pct, (int, float))
        or not 0 < crop_pct <= 1):
      raise ConfigError(f"crop_pct must lie in (0, 1], got {crop_pct!r}")
    if _get(cfg, "crop_mode", "center") != "center":
      raise ConfigError(f"only crop_mode='center' is supported, got {cfg['crop_mode']!r}")
    return cls(resize_size=math.floor(size / crop_pct), crop_size=size,
               interpolation=_get(cfg, "interpolation", "bicubic"))

  def __call__(self, image) -> np.ndarray:
    if isinstance(image, np.ndarray):
      image = array_to_rgb(image)
      check_size(image.shape[1], image.shape[0], "<array>")
      image = Image.fromarray(image)
    elif not isinstance(image, Image.Image):
      image = open_rgb(image)
    else:
      check_size(*image.size, "<PIL image>")
      image = _to_rgb(image, "<PIL image>") if image.mode != "RGB" else image
    image = resize_short_side(image, self.resize_size, self.interpolation)
    return center_crop(np.asarray(image, dtype=np.uint8), self.crop_size)


def _get(cfg, key, default):
  value = cfg.get(key)
  return default if value is None else value
