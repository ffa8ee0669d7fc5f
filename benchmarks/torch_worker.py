"""timm in a subprocess, default or best-tuned, timed on request.

The benchmarks interleave JAX and two torch configurations in one run. The
tuned one needs LD_PRELOAD, which only acts at process start, so each torch
configuration lives in its own worker process that answers JSON lines:

  {"op": "prepare", "case": "effnet_fwd", "batch": 16}  -> builds, warms up
  {"op": "time", "case": ..., "batch": ..., "inner": 3} -> {"s": seconds per call}
                                                        (after untimed calls for "settle" s)

Configurations:
  default  timm as most people run it: eval(), torch.no_grad(), NCHW.
  tuned    tcmalloc + a shim that makes MKL take its AVX-512 path on AMD
           (LD_PRELOAD, set up by ``tuned_env``), channels_last weights and
           inputs, torch.inference_mode(), denormals flushed.

Run directly only through ``common.TorchWorker``.
"""

import glob
import json
import os
import shutil
import subprocess
import sys

CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache")
SHIM_C = "int mkl_serv_intel_cpu_true(void) { return 1; }\n"
LAMBDA_HAT, Q_HAT = 0.9, 0.9
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ---------------------------------------------------------------- tuned setup

def tuned_env(cache: str = CACHE):
  """(environment for the tuned worker, None) or (None, why it cannot be built).

  Builds the MKL shim with gcc and unpacks Debian's libtcmalloc-minimal4
  (apt-get download + dpkg -x, no root install) into ``cache`` once.
  """
  os.makedirs(cache, exist_ok=True)
  shim = os.path.join(cache, "libmkl_amd_shim.so")
  if not os.path.exists(shim):
    if not shutil.which("gcc"):
      return None, "gcc not found (needed for the MKL shim)"
    src = os.path.join(cache, "mkl_amd_shim.c")
    with open(src, "w") as f:
      f.write(SHIM_C)
    r = subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", shim, src],
                       capture_output=True, text=True)
    if r.returncode:
      return None, f"gcc failed: {r.stderr.strip()[:200]}"
  pattern = os.path.join(cache, "tcmalloc", "usr", "lib", "*", "libtcmalloc_minimal.so.4")
  found = glob.glob(pattern)
  if not found:
    if not (shutil.which("apt-get") and shutil.which("dpkg")):
      return None, "apt-get/dpkg not found (needed for libtcmalloc-minimal4)"
    r = subprocess.run(["apt-get", "download", "libtcmalloc-minimal4"], cwd=cache,
                       capture_output=True, text=True)
    debs = glob.glob(os.path.join(cache, "libtcmalloc-minimal4_*.deb"))
    if not debs:
      return None, f"apt-get download libtcmalloc-minimal4 failed: {r.stderr.strip()[:200]}"
    r = subprocess.run(["dpkg", "-x", debs[0], os.path.join(cache, "tcmalloc")],
                       capture_output=True, text=True)
    found = glob.glob(pattern)
    if not found:
      return None, f"dpkg -x failed: {r.stderr.strip()[:200]}"
  env = dict(os.environ, LD_PRELOAD=f"{found[0]} {shim}")
  return env, None


# ---------------------------------------------------------------- worker side

def _loaded(name: str) -> bool:
  with open("/proc/self/maps") as f:
    return name in f.read()


class Cases:
  def __init__(self, tuned: bool):
    import torch
    self.torch, self.tuned = torch, tuned
    torch.set_num_threads(os.cpu_count() or 1)
    if tuned:
      torch.set_flush_denormal(True)
    self.models, self.fns = {}, {}

  def model(self, name):
    import timm
    if name not in self.models:
      torch = self.torch
      torch.manual_seed(0)
      m = timm.create_model(name, pretrained=False).eval()
      if self.tuned:
        m = m.to(memory_format=torch.channels_last)
        for p in m.parameters():
          p.requires_grad_(False)
      self.models[name] = m
    return self.models[name]

  def images(self, batch):
    import numpy as np
    torch = self.torch
    imgs = np.random.default_rng(batch).integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8)
    x = ((torch.from_numpy(imgs).float() / 255 - torch.tensor(MEAN)) / torch.tensor(STD))
    x = x.permute(0, 3, 1, 2)
    fmt = torch.channels_last if self.tuned else torch.contiguous_format
    return x.contiguous(memory_format=fmt)

  def context(self):
    return self.torch.inference_mode() if self.tuned else self.torch.no_grad()

  def build(self, case, batch):
    """A zero-argument callable running one call of the case."""
    torch = self.torch
    x = self.images(batch)
    if case == "effnet_fwd":
      m = self.model("efficientnet_b0")
      def fn():
        with self.context():
          return m(x)
      return fn
    if case == "edge":
      m = self.model("efficientnet_b0")
      return (lambda: edge_tuned(torch, m, x)) if self.tuned else (
          lambda: edge_default(torch, m, x))
    if case.startswith("deit_"):
      m = self.model("deit_base_patch16_224")
      if case == "deit_full":
        def fn():
          with self.context():
            return m(x)
        return fn
      import numpy as np
      k = int(case.split("_")[-1])
      rng = np.random.default_rng(k)
      idx = torch.from_numpy(np.sort(np.stack(
          [rng.choice(196, k, replace=False) for _ in range(batch)]), 1))
      def fn():
        with self.context():
          return deit_tokens(torch, m, x, idx)
      return fn
    raise ValueError(case)


def deit_tokens(torch, tm, x, idx):
  """timm DeiT on a token subset: patch_embed, +pos, gather, CLS, blocks."""
  t = tm.patch_embed(x) + tm.pos_embed[:, 1:]
  t = torch.gather(t, 1, idx[..., None].expand(-1, -1, t.shape[-1]))
  cls = (tm.cls_token + tm.pos_embed[:, :1]).expand(t.shape[0], -1, -1)
  t = tm.norm(tm.blocks(torch.cat([cls, t], 1)))
  return tm.head(t[:, 0])


def _edge_tail(torch, logits, a, x):
  """Softmax, CRC accept, APS set, Grad-CAM at ``a`` (autograd), patch scores."""
  import torch.nn.functional as F
  probs = logits.softmax(-1)
  p_sorted, order = probs.sort(-1, descending=True)
  cum = p_sorted.cumsum(-1)
  k = ((cum <= Q_HAT).sum(-1) + 1).clamp(max=probs.shape[-1])
  in_set = torch.arange(probs.shape[-1])[None] < k[:, None]
  mask = torch.zeros_like(probs, dtype=torch.bool).scatter(1, order, in_set)
  w = torch.where(mask, probs, 0)
  w = (w / w.sum(-1, keepdim=True)).detach()
  grads = torch.autograd.grad((w * logits).sum(), a)[0]
  with torch.no_grad():
    cam = F.relu((grads.mean((2, 3), keepdim=True) * a).sum(1, keepdim=True))
    up = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)
    lo, hi = up.amin((2, 3), keepdim=True), up.amax((2, 3), keepdim=True)
    up = torch.where(hi > lo, (up - lo) / (hi - lo).clamp_min(1e-12), 0)
    pooled = F.adaptive_avg_pool2d(up, 14)
    lo, hi = pooled.amin((2, 3), keepdim=True), pooled.amax((2, 3), keepdim=True)
    pooled = torch.where(hi > lo, (pooled - lo) / (hi - lo).clamp_min(1e-12), 0)
  return probs.max(-1).values >= LAMBDA_HAT, pooled.flatten(1)


def edge_default(torch, tm, x):
  """The usual form: a forward hook on bn2 (BN + SiLU) and autograd to it."""
  store = {}
  h = tm.bn2.register_forward_hook(lambda m, i, o: store.update(a=o))
  with torch.enable_grad():
    logits = tm(x)
  h.remove()
  return _edge_tail(torch, logits, store["a"], x)


def edge_tuned(torch, tm, x):
  """Same tap, no autograd graph before it: forward_features in inference
  mode, then only the pooled head records a graph."""
  with torch.inference_mode():
    feats = tm.forward_features(x)
  a = feats.clone().requires_grad_()
  with torch.enable_grad():
    logits = tm.forward_head(a)
  return _edge_tail(torch, logits, a, x)


def main():
  import time
  mode = sys.argv[1]
  cases = Cases(mode == "tuned")
  torch = cases.torch
  info = {"torch": torch.__version__, "threads": torch.get_num_threads(),
          "tcmalloc": _loaded("libtcmalloc"), "mkl_shim": _loaded("libmkl_amd_shim")}
  print(json.dumps(info), flush=True)
  fns = {}
  for line in sys.stdin:
    req = json.loads(line)
    key = (req["case"], req["batch"])
    if req["op"] == "prepare":
      fns[key] = cases.build(*key)
      for _ in range(req.get("warmup", 2)):
        fns[key]()
      print(json.dumps({"ok": True}), flush=True)
    elif req["op"] == "time":
      fn = fns[key]
      t0 = time.perf_counter()  # untimed: refill caches after the other contenders ran
      fn()
      while time.perf_counter() - t0 < req.get("settle", 0.0):
        fn()
      t0 = time.perf_counter()
      for _ in range(req["inner"]):
        fn()
      print(json.dumps({"s": (time.perf_counter() - t0) / req["inner"]}), flush=True)
    elif req["op"] == "drop":
      fns.pop(key, None)
      print(json.dumps({"ok": True}), flush=True)


if __name__ == "__main__":
  main()
