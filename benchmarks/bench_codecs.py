"""Bytes and single-core speed of the payload codecs (`payload/codecs.py`)
next to the alternatives they were chosen over, on the same K kept patches.

  .venv/bin/python benchmarks/bench_codecs.py [--k 60] [--repeats 30] [--synthetic 3] [--quick]

Images: scikit-image's astronaut, coffee and chelsea (centre-cropped, bicubic
224x224) and the demo's synthetic scenes; one seeded kept set of K of the 196
patches for all. The project's codecs are timed through encode_payload /
decode_payload (whole payload: 13-byte header, indices, CRC, mosaic tiling);
the references code the ready-made mosaic (`codecs.to_mosaic`) or the raw
patch bytes directly, so they carry no header, index or tiling cost (all a
few us). Times are medians of R repeats per image on one pinned core (the
edge device codes one image at a time), averaged over the images of a group.
PSNR pools the squared error over every decoded patch of the group.
"""

import argparse
import io
import os
import statistics
import subprocess
import time
import zlib

import numpy as np
import PIL
import simplejpeg
import zstandard
from PIL import Image, features

from rcst_edge.payload import codecs
from rcst_edge.payload import message as payload
from rcst_jax.data import synthetic
from rcst_jax.inference.patches import patchify

GRID, P = 14, 16
PROJECT = ["raw", "zstd", "webp-lossless", "jpeg:75", "jpeg:90", "jpeg420:75", "jpeg420:90"]


def cpu_line() -> str:
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next(l.split(":", 1)[1].strip() for l in out.splitlines()
                 if l.startswith("Model name"))
  except (OSError, StopIteration):
    model = "unknown CPU"
  with open("/proc/cpuinfo") as f:
    avx512 = " avx512f " in f.read(1 << 16).replace("\n", " ")
  return f"{model}, {'with' if avx512 else 'no'} AVX-512"


def photos():
  """(name, 224x224x3 uint8) of the bundled photos, or [] without scikit-image."""
  try:
    from skimage import data
  except ImportError:
    print("note: scikit-image not installed, synthetic images only\n")
    return []
  out = []
  for name in ("astronaut", "coffee", "chelsea"):
    im = getattr(data, name)()
    h, w = im.shape[:2]
    s = min(h, w)
    im = im[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    out.append((name, np.asarray(Image.fromarray(im).resize((224, 224), Image.BICUBIC))))
  return out


# ---------------------------------------------------------------- candidates
# Each is (encode(patches, idx, mosaic) -> bytes, decode(bytes, k) -> [K, p, p, 3]);
# the per-patch one codes a list of K files.

def project(spec):
  codec = codecs.parse(spec)
  return (lambda patches, idx, mosaic: payload.encode_payload(patches, idx, GRID, codec),
          lambda data, k: payload.decode_payload(data).patches)


def pillow(fmt, **kw):
  def enc(patches, idx, mosaic):
    buf = io.BytesIO()
    Image.fromarray(mosaic).save(buf, fmt, **kw)
    return buf.getvalue()

  def dec(data, k):
    with Image.open(io.BytesIO(data)) as im:
      return codecs.from_mosaic(np.asarray(im.convert("RGB")), k, P)
  return enc, dec


def bytewise(compress, decompress):
  return (lambda patches, idx, mosaic: compress(patches.tobytes()),
          lambda data, k: np.frombuffer(decompress(data), np.uint8).reshape(k, P, P, 3))


def per_patch_jpeg(q):
  # Each patch its own JPEG file; the size counted is the sum of the K files.
  def enc(patches, idx, mosaic):
    return [simplejpeg.encode_jpeg(np.ascontiguousarray(t), q, colorspace="RGB",
                                   colorsubsampling="444") for t in patches]

  def dec(files, k):
    return np.stack([simplejpeg.decode_jpeg(f, colorspace="RGB") for f in files])
  return enc, dec


def candidates():
  c = {s: project(s) for s in PROJECT}
  c["ref: Pillow JPEG q75 4:4:4"] = pillow("JPEG", quality=75, subsampling=0)
  c["ref: Pillow JPEG q90 4:4:4"] = pillow("JPEG", quality=90, subsampling=0)
  c["ref: PNG level 1"] = pillow("PNG", compress_level=1)
  c["ref: WebP lossy q75 (method 4)"] = pillow("WEBP", quality=75)
  c["ref: zlib level 1 (raw bytes)"] = bytewise(lambda b: zlib.compress(b, 1), zlib.decompress)
  zc, zd = zstandard.ZstdCompressor(level=3), zstandard.ZstdDecompressor()
  c["ref: zstd level 3 (raw bytes)"] = bytewise(zc.compress, zd.decompress)
  c["ref: per-patch JPEG q75 (K files)"] = per_patch_jpeg(75)
  return c


# ---------------------------------------------------------------- measurement

def median_ms(fn, repeats):
  fn()  # warm: first call loads tables, grows buffers
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter_ns()
    fn()
    ts.append(time.perf_counter_ns() - t0)
  return statistics.median(ts) / 1e6


def measure(images, idx, cands, repeats):
  """{candidate: dict(bytes, enc, dec lists over images, sse, n, problems)}."""
  res = {name: dict(bytes=[], enc=[], dec=[], sse=0.0, n=0, problems=[]) for name in cands}
  k = len(idx)
  for img_name, image in images:
    patches = np.ascontiguousarray(patchify(image[None], P)[0][idx])
    mosaic = codecs.to_mosaic(patches)
    for name, (enc, dec) in cands.items():
      r = res[name]
      data = enc(patches, idx, mosaic)
      got = dec(data, k)
      if name in PROJECT:
        d = payload.decode_payload(data)
        if not (np.array_equal(d.idx, idx) and d.grid == GRID and str(d.codec) == name):
          r["problems"].append(f"{img_name}: indices/grid/codec do not round-trip")
      if got.shape != patches.shape:
        r["problems"].append(f"{img_name}: decoded shape {got.shape}")
        continue
      err = got.astype(np.float64) - patches
      lossless = name in ("raw", "zstd", "webp-lossless") or "PNG" in name or "raw bytes" in name
      if lossless and err.any():
        r["problems"].append(f"{img_name}: lossless codec is not exact")
      r["sse"] += float((err ** 2).sum())
      r["n"] += err.size
      r["bytes"].append(sum(map(len, data)) if isinstance(data, list) else len(data))
      r["enc"].append(median_ms(lambda: enc(patches, idx, mosaic), repeats))
      r["dec"].append(median_ms(lambda: dec(data, k), repeats))
  return res


def psnr(sse, n):
  return float("inf") if sse == 0 else 10 * np.log10(255.0 ** 2 / (sse / n))


def table(title, res, k):
  raw = int(payload.payload_bytes(k))
  print(f"\n### {title}\n")
  print("| candidate | mean bytes | x smaller than raw | encode ms | decode ms | PSNR dB |")
  print("|---|---:|---:|---:|---:|---:|")
  for name, r in res.items():
    if not r["bytes"]:
      continue
    b = np.mean(r["bytes"])
    print(f"| {name} | {b:.0f} | {raw / b:.2f} | {np.mean(r['enc']):.3f} | "
          f"{np.mean(r['dec']):.3f} | {psnr(r['sse'], r['n']):.2f} |")
  problems = [f"{n}: {p}" for n, r in res.items() for p in r["problems"]]
  for p in problems:
    print(f"\nPROBLEM {p}")


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--k", type=int, default=60, help="kept patches per image")
  ap.add_argument("--repeats", type=int, default=30, help="timed calls per (image, candidate)")
  ap.add_argument("--synthetic", type=int, default=3, help="synthetic scenes")
  ap.add_argument("--seed", type=int, default=0, help="seed of the kept set")
  ap.add_argument("--quick", action="store_true", help="smoke run: 3 repeats, 1 scene")
  args = ap.parse_args()
  if args.quick:
    args.repeats, args.synthetic = 3, 1
  # One core: the edge codes one payload at a time, and no library here may
  # borrow a second core (none should, this makes sure).
  core = min(os.sched_getaffinity(0))
  os.sched_setaffinity(0, {core})
  idx = np.sort(np.random.default_rng(args.seed).choice(GRID * GRID, args.k, replace=False))

  print(f"CPU: {cpu_line()}; pinned to core {core} (os.sched_setaffinity)")
  print(f"K={args.k} of {GRID * GRID} patches (seed {args.seed}), repeats={args.repeats}; "
        f"Pillow {PIL.__version__}, simplejpeg {simplejpeg.__version__}, "
        f"libwebp {features.version('webp')}, Pillow libjpeg {features.version('jpg')} "
        f"(libjpeg-turbo {features.version('libjpeg_turbo')}), "
        f"zlib {zlib.ZLIB_RUNTIME_VERSION}, zstandard {zstandard.__version__} "
        f"(zstd {'.'.join(map(str, zstandard.ZSTD_VERSION))})")
  print(f"raw payload of K={args.k}: {int(payload.payload_bytes(args.k))} bytes; times are "
        "the median of the repeats per image, mean over the group's images")
  groups = [("photos (astronaut, coffee, chelsea)", photos()),
            (f"synthetic ({args.synthetic} test scenes, seed 0)",
             [(f"scene {i}", synthetic.render_scene(0, "test", i).image)
              for i in range(args.synthetic)])]
  cands = candidates()
  for title, images in groups:
    if images:
      table(title, measure(images, idx, cands, args.repeats), args.k)


if __name__ == "__main__":
  main()
