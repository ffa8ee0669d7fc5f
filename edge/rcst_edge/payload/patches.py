"""Image -> patch layout, as ViT token order numbers patches: row-major over
the (H/p) x (W/p) grid. Works on numpy and JAX arrays alike (reshape and
transpose only), so the wire format and the server share one definition."""


def patchify(images, p: int = 16):
  """[B, H, W, C] -> [B, N, p, p, C], patches in row-major grid order."""
  b, h, w, c = images.shape
  if h % p or w % p:
    raise ValueError(f"image {h}x{w} is not divisible into {p}x{p} patches")
  x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p, p, c)
