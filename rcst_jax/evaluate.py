"""Evaluation engine: calibration, cached edge pass, sweeps of every method.

Flow (one way): calibration set -> edge softmax -> Algorithm 1 (lambda_hat,
q_hat). Test set, chunk by chunk: edge step (proposed: CRC acceptance, APS
Grad-CAM patch scores) and baseline edge (DeiT-Tiny softmax + CLS attention)
once per image; then the server once per distinct (image, kept-patch set)
over *all* operating points, so points that keep the same patches share work.
Each finished chunk is written atomically under ``cache/<fingerprint>/``; a
restarted run skips finished chunks, and any change of config, model weights
or data gives a new fingerprint, so a stale cache is never reused.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import time
import zlib
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rcst_jax import conformal, pipeline, plots, tables, transmit
from rcst_jax.checkpoints import Model
from rcst_jax.data import batches, normalize

# Keys of the config that change results (and so the cache fingerprint).
_RESULT_KEYS = ("alpha_crc", "alpha_aps", "eta", "tau_grid", "k_grid", "delta_sum_grid",
                "seed", "gradcam_layer", "empty_policy", "dtype", "matmul_precision",
                "chunk_size")


@dataclasses.dataclass
class Sources:
  """Calibration and test images: ImageSources plus the indices used from each
  (None: all of it). ImageNet uses one source split by index; the demo uses
  two synthetic splits."""
  cal_source: object
  test_source: object
  cal_indices: np.ndarray | None = None
  test_indices: np.ndarray | None = None
  name: str = "dataset"

  def __post_init__(self):
    if self.cal_indices is None:
      self.cal_indices = np.arange(len(self.cal_source))
    if self.test_indices is None:
      self.test_indices = np.arange(len(self.test_source))
    self.cal_indices = np.asarray(self.cal_indices, np.int64)
    self.test_indices = np.asarray(self.test_indices, np.int64)


@dataclasses.dataclass
class Models:
  edge: Model           # EfficientNet (proposed method)
  server: Model         # DeiT-Base on transmitted tokens
  baseline_edge: Model  # DeiT-Tiny (Im et al. baselines)


# ---------------------------------------------------------------- identity


def variables_digest(variables) -> str:
  h = hashlib.blake2b(digest_size=12)
  for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(variables),
                           key=lambda kv: jax.tree_util.keystr(kv[0])):
    h.update(jax.tree_util.keystr(path).encode())
    h.update(np.ascontiguousarray(jax.device_get(leaf)).tobytes())
  return h.hexdigest()


def fingerprint(config, models: Models, sources: Sources) -> str:
  ident = {k: _plain(config.get(k)) for k in _RESULT_KEYS}
  ident["models"] = {
      name: [getattr(models, name).metadata.get("timm_name"),
             variables_digest(getattr(models, name).variables)]
      for name in ("edge", "server", "baseline_edge")}
  ident["data"] = [sources.name, len(sources.cal_source), len(sources.test_source),
                   hashlib.sha1(np.asarray(sources.cal_indices, np.int64).tobytes()).hexdigest(),
                   hashlib.sha1(np.asarray(sources.test_indices, np.int64).tobytes()).hexdigest()]
  return hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def _plain(x):
  if hasattr(x, "to_dict"):
    x = x.to_dict()
  if isinstance(x, (list, tuple)):
    return [_plain(v) for v in x]
  if isinstance(x, dict):
    return {k: _plain(v) for k, v in x.items()}
  if isinstance(x, np.generic):
    return x.item()
  return x


# ---------------------------------------------------------------- devices


def make_mesh(devices: str | int = "all") -> Mesh:
  """A 1-D mesh over the batch axis of this host's devices."""
  local = jax.local_devices()
  n = len(local) if devices == "all" else int(devices)
  return Mesh(np.asarray(local[:n]), ("batch",))


def _shard(mesh: Mesh, *arrays):
  spec = NamedSharding(mesh, PartitionSpec("batch"))
  return [jax.device_put(a, spec) for a in arrays]


def _replicate(mesh: Mesh, tree):
  return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def _probs_fn(model: Model, with_attn: bool):
  mean, std = tuple(model.metadata["mean"]), tuple(model.metadata["std"])
  module = model.module

  @jax.jit
  def fn(variables, images):
    logits, out = module.apply(variables, normalize(images, mean, std))
    probs = jax.nn.softmax(logits.astype(jnp.float32), -1)
    return (probs, out["cls_attn"].astype(jnp.float32)) if with_attn else (probs, None)
  return fn


# ---------------------------------------------------------------- operating points


def point_list(config) -> list[tuple[str, str | None, float | None]]:
  """(method, param_name, param) for every operating point of the sweep."""
  pts = [("server_only", None, None), ("edge_only", None, None)]
  pts += [("proposed", "tau", float(t)) for t in config.tau_grid]
  pts += [("random", "k", float(k)) for k in config.k_grid]
  pts += [("topk", "k", float(k)) for k in config.k_grid]
  pts += [("attention_sum", "delta_sum", float(d)) for d in config.delta_sum_grid]
  return pts


def _point_masks(points, edge: dict, base: dict, random_ranks: np.ndarray, policy: str):
  """Per point: (offloaded [n] bool, keep [n, N] bool, fallback prediction [n])."""
  n, num = edge["patch_scores"].shape
  out = []
  for method, _, param in points:
    if method == "server_only":
      off, keep, fallback = np.ones(n, bool), np.ones((n, num), bool), edge["pred"]
    elif method == "edge_only":
      off, keep, fallback = np.zeros(n, bool), np.zeros((n, num), bool), edge["pred"]
    elif method == "proposed":
      off = ~edge["accept"]
      keep = np.asarray(transmit.select_threshold(edge["patch_scores"], param))
      fallback = edge["pred"]
    else:
      off, fallback = ~base["accept"], base["pred"]
      if method == "random":
        keep = random_ranks < param
      elif method == "topk":
        keep = np.asarray(transmit.select_topk(base["attn"], int(param)))
      elif method == "attention_sum":
        keep = np.asarray(transmit.select_attention_sum(base["attn"], param))
        off, keep = map(np.asarray, transmit.apply_empty_policy(off, keep, base["attn"], policy))
      else:
        raise ValueError(f"unknown method {method!r}")
    keep = np.asarray(keep, bool) & np.asarray(off, bool)[:, None]
    out.append((np.asarray(off, bool), keep, np.asarray(fallback)))
  return out


# ---------------------------------------------------------------- engine


@dataclasses.dataclass
class Evaluation:
  config: object
  models: Models
  sources: Sources
  out_dir: str
  progress: bool = True

  def __post_init__(self):
    self.mesh = make_mesh(self.config.get("devices", "all"))
    ndev = self.mesh.devices.size
    for key in ("batch_size", "server_batch"):
      if int(self.config[key]) % ndev:
        raise ValueError(f"{key} {self.config[key]} must be a multiple of the {ndev} devices")
    self.fp = fingerprint(self.config, self.models, self.sources)
    self.cache_dir = os.path.join(self.out_dir, "cache", self.fp)
    os.makedirs(self.cache_dir, exist_ok=True)
    self.skipped = collections.Counter()
    self.timings = collections.defaultdict(float)
    self.points = point_list(self.config)
    rep = lambda m: dataclasses.replace(m, variables=_replicate(self.mesh, m.variables))
    self._edge, self._server, self._base = (
        rep(self.models.edge), rep(self.models.server), rep(self.models.baseline_edge))
    self._edge_probs = _probs_fn(self._edge, False)
    self._base_probs = _probs_fn(self._base, True)

  # -- calibration (Algorithm 1)

  def calibrate(self) -> conformal.Calibration:
    path = os.path.join(self.cache_dir, "calibration.json")
    if os.path.exists(path):
      return conformal.Calibration.from_json(path)
    probs, labels = [], []
    for b in self._batches(self.sources.cal_source, self.sources.cal_indices, "calibration"):
      p, _ = self._edge_probs(self._edge.variables, *_shard(self.mesh, b.images))
      probs.append(np.asarray(p)[b.valid])
      labels.append(b.labels[b.valid])
    cal = conformal.calibrate(
        np.concatenate(probs), np.concatenate(labels), self.config.alpha_crc,
        self.config.alpha_aps, edge_model=self.models.edge.metadata.get("timm_name"),
        server_model=self.models.server.metadata.get("timm_name"),
        dataset=self.sources.name, split=f"calibration:{len(self.sources.cal_indices)}")
    _atomic_write_text(path, json.dumps(cal.to_dict(), indent=2))
    return cal

  def _batches(self, source, indices, desc):
    return batches(source, indices, int(self.config.batch_size),
                   skipped=self.skipped, progress=self.progress, desc=desc)

  # -- one chunk of the test set

  def _chunk_path(self, c: int) -> str:
    return os.path.join(self.cache_dir, f"chunk_{c:05d}.npz")

  def chunks(self) -> list[np.ndarray]:
    idx = np.asarray(self.sources.test_indices)
    size = int(self.config.chunk_size)
    return [idx[i:i + size] for i in range(0, len(idx), size)]

  def run_chunk(self, c: int, indices: np.ndarray, cal: conformal.Calibration) -> None:
    t0 = time.perf_counter()
    imgs, labels, keys = [], [], []
    edge, base = collections.defaultdict(list), collections.defaultdict(list)
    for b in self._batches(self.sources.test_source, indices, f"chunk {c} edge"):
      v = b.valid
      images = _shard(self.mesh, b.images)[0]
      e = jax.device_get(pipeline.edge_step(self._edge, images, cal.lambda_hat, cal.q_hat,
                                            layer=self.config.gradcam_layer,
                                            grid=self._server.module.grid))
      bp, attn = jax.device_get(self._base_probs(self._base.variables, images))
      lab = b.labels[v]
      edge["pred"].append(e["pred"][v])
      edge["p_max"].append(e["p_max"][v])
      edge["accept"].append(e["accept"][v])
      edge["aps_size"].append(e["aps_size"][v])
      edge["aps_cover"].append(e["aps_mask"][v][np.arange(v.sum()), lab])
      edge["patch_scores"].append(e["patch_scores"][v])
      base["pred"].append(bp[v].argmax(-1).astype(np.int32))
      base["p_max"].append(bp[v].max(-1))
      base["accept"].append(np.asarray(transmit.min_entropy_accept(bp[v], self.config.eta)))
      base["attn"].append(attn[v])
      imgs.append(b.images[v])
      labels.append(lab)
      keys.extend(k for k, ok in zip(b.keys, v) if ok)
    self.timings["edge_s"] += time.perf_counter() - t0
    if not labels:  # every item of the chunk was bad
      _atomic_savez(self._chunk_path(c), labels=np.zeros(0, np.int32))
      return
    edge = {k: np.concatenate(v) for k, v in edge.items()}
    base = {k: np.concatenate(v) for k, v in base.items()}
    images, labels = np.concatenate(imgs), np.concatenate(labels)
    n, num = edge["patch_scores"].shape
    ranks = self._random_ranks(keys, num)
    t1 = time.perf_counter()
    preds, kept, offl = self._server_all_points(images, edge, base, ranks)
    self.timings["server_s"] += time.perf_counter() - t1
    _atomic_savez(self._chunk_path(c), labels=labels, preds=preds, kept=kept, offloaded=offl,
                  **{f"edge_{k}": v for k, v in edge.items() if k != "patch_scores"},
                  **{f"base_{k}": v for k, v in base.items() if k != "attn"})

  def _random_ranks(self, keys, num):
    # Per-image permutation from (seed, the image's key): independent of
    # chunking and of bad items elsewhere, and nested across k.
    key = jax.random.PRNGKey(int(self.config.seed))
    ids = jnp.asarray([zlib.crc32(k.encode()) for k in keys], jnp.uint32)
    perm = jax.vmap(lambda i: jax.random.permutation(jax.random.fold_in(key, i), num))(ids)
    return np.asarray(jnp.argsort(perm, axis=-1))

  def _server_all_points(self, images, edge, base, ranks):
    masks = _point_masks(self.points, edge, base, ranks, self.config.empty_policy)
    n, num = edge["patch_scores"].shape
    # Deduplicate (image, kept set) pairs across points.
    rows, keys = [], {}
    which = []
    for off, keep, _ in masks:
      ids = np.full(n, -1, np.int64)
      packed = np.packbits(keep, axis=1)
      for i in np.flatnonzero(off):
        key = (i, packed[i].tobytes())
        if key not in keys:
          keys[key] = len(rows)
          rows.append((i, keep[i]))
        ids[i] = keys[key]
      which.append(ids)
    server_pred = np.zeros(len(rows), np.int32)
    if rows:
      img_rows = np.fromiter((r[0] for r in rows), np.int64, len(rows))
      keep_rows = np.stack([r[1] for r in rows])
      srv = pipeline.Server(self._server, int(self.config.server_batch),
                            tuple(self.config.buckets), NamedSharding(self.mesh, PartitionSpec("batch")))
      server_pred = srv.logits(images, keep_rows, rows=img_rows).argmax(-1).astype(np.int32)
    preds = np.stack([np.where(off, server_pred[np.maximum(ids, 0)], fb)
                      for (off, _, fb), ids in zip(masks, which)]).astype(np.int32)
    kept = np.stack([keep.sum(-1) for _, keep, _ in masks]).astype(np.int16)
    offl = np.stack([off for off, _, _ in masks])
    return preds, kept, offl

  # -- aggregation

  def aggregate(self, cal: conformal.Calibration) -> list[dict]:
    data = [np.load(self._chunk_path(c)) for c in range(len(self.chunks()))]
    data = [d for d in data if len(d["labels"])]
    cat = lambda k: np.concatenate([d[k] for d in data], axis=-1)
    labels, preds, kept, offl = cat("labels"), cat("preds"), cat("kept"), cat("offloaded")
    e_pred, e_acc, b_pred, b_acc = cat("edge_pred"), cat("edge_accept"), cat("base_pred"), \
        cat("base_accept")
    n = len(labels)
    grid = self._server.module.grid
    num, patch = grid * grid, int(self._server.module.patch_size)
    raw = (grid * patch) ** 2 * 3
    out = []
    for j, (method, pname, param) in enumerate(self.points):
      off, k = offl[j], kept[j].astype(np.int64)
      nbytes = np.where(off, np.asarray(transmit.payload_bytes(k, N=num, patch=patch)), 0)
      if method == "proposed":
        risk = float(np.mean(e_acc & (e_pred != labels)))
      elif method in ("random", "topk", "attention_sum"):
        risk = float(np.mean(b_acc & (b_pred != labels)))
      elif method == "edge_only":
        risk = float(np.mean(e_pred != labels))
      else:
        risk = 0.0
      prop = method == "proposed"
      out.append({
          "method": method, "param_name": pname, "param": param,
          "accuracy": float(np.mean(preds[j] == labels)),
          "cost": float(k[off].sum() / (n * num)),
          "cost_bytes": float(nbytes.sum() / (n * raw)),
          "offload_rate": float(off.mean()),
          "mean_patches": float(k[off].mean()) if off.any() else 0.0,
          "edge_risk": risk,
          "alpha_crc": cal.alpha_crc if prop else None,
          "aps_set_size": float(cat("edge_aps_size").mean()) if prop else None,
          "aps_coverage": float(cat("edge_aps_cover").mean()) if prop else None,
          "n": n,
      })
    return out

  # -- the whole run

  def run(self, stop_after: int | None = None, on_chunk: Callable | None = None) -> dict:
    # float32 matmuls on TPU default to bfloat16 passes; "highest" keeps timm parity.
    with jax.default_matmul_precision(self.config.get("matmul_precision", "highest")):
      return self._run(stop_after, on_chunk)

  def _run(self, stop_after, on_chunk) -> dict:
    t0 = time.perf_counter()
    cal = self.calibrate()
    chunks = self.chunks()
    done = 0
    from tqdm.auto import tqdm
    bar = tqdm(total=len(chunks), desc="test chunks", disable=not self.progress)
    pid, nproc = jax.process_index(), jax.process_count()
    for c, idx in enumerate(chunks):
      if c % nproc == pid and not os.path.exists(self._chunk_path(c)):
        if stop_after is not None and done >= stop_after:
          raise Interrupted(f"stopped after {done} chunks (test hook)")
        self.run_chunk(c, idx, cal)
        done += 1
        if on_chunk:
          on_chunk(c)
      bar.update(1)
    bar.close()
    if nproc > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("rcst_chunks_done")
    points = self.aggregate(cal)
    self.timings["total_s"] += time.perf_counter() - t0
    return {"calibration": cal, "points": points, "fingerprint": self.fp,
            "skipped": dict(self.skipped), "timings": dict(self.timings),
            "chunks_computed": done}


class Interrupted(RuntimeError):
  """Raised by the test hook that simulates a disconnect mid-run."""


# ---------------------------------------------------------------- atomic files


def _atomic_savez(path: str, **arrays) -> None:
  tmp = path + ".tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def _atomic_write_text(path: str, text: str) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


# ---------------------------------------------------------------- outputs


def gallery_examples(ev: Evaluation, cal: conformal.Calibration, tau: float, count: int,
                     class_names: Sequence[str] | None):
  """The first `count` offloaded test images: image, upsampled map, kept patches, title."""
  picked = []
  for b in ev._batches(ev.sources.test_source, ev.sources.test_indices[:32 * count], "gallery"):
    e = jax.device_get(pipeline.edge_step(ev.models.edge, b.images, cal.lambda_hat, cal.q_hat,
                                          layer=ev.config.gradcam_layer,
                                          grid=ev.models.server.module.grid))
    for i in np.flatnonzero(b.valid & ~e["accept"]):
      picked.append((b.images[i], e["cam"][i], e["probs"][i], e["aps_mask"][i],
                     e["patch_scores"][i], int(b.labels[i])))
    if len(picked) >= count:
      break
  picked = picked[:count]
  if not picked:
    return None
  from rcst_jax import saliency
  size = picked[0][0].shape[:2]
  cams = np.asarray(saliency.minmax_normalize(
      saliency.upsample(jnp.stack([p[1] for p in picked]), size)))
  keep = np.asarray(transmit.select_threshold(jnp.stack([p[4] for p in picked]), tau))
  name = (lambda c: class_names[c]) if class_names else str
  titles = []
  for _, _, probs, mask, _, label in picked:
    members = np.flatnonzero(mask)
    members = members[np.argsort(-probs[members])][:3]
    more = "" if mask.sum() <= 3 else f" +{int(mask.sum()) - 3}"
    titles.append("APS: " + ", ".join(f"{name(c)} {probs[c]:.2f}" for c in members)
                  + more + f" | true: {name(label)}")
  return np.stack([p[0] for p in picked]), cams, keep, titles


def write_outputs(ev: Evaluation, result: dict, gallery_size: int = 6) -> dict:
  """results.json/csv, Table 1-2 (Markdown), Figures 1-2 and the gallery (PNG)."""
  out = ev.out_dir
  points = result["points"]
  paths = {}
  paths["results_json"], paths["results_csv"] = map(str, tables.write_results(points, out))
  for name, text in (("table1.md", tables.table1_markdown(points)),
                     ("table1_bytes.md", tables.table1_markdown(points, cost_key="cost_bytes")),
                     ("table2.md", tables.table2_markdown(points))):
    _atomic_write_text(os.path.join(out, name), text + "\n")
    paths[name] = os.path.join(out, name)
  ops = tables.operating_points(points)
  paths["figure1"] = str(plots.figure1(points, os.path.join(out, "figure1.png")))
  paths["figure2"] = str(plots.figure2(ops, os.path.join(out, "figure2.png")))
  prop = ops.get("proposed") or {}
  chosen = prop.get("within_gap") or prop.get("best")
  if gallery_size and chosen is not None:
    names = ev.models.edge.metadata.get("class_names")
    if not names and ev.models.edge.metadata.get("label_set") == "imagenet1k":
      from rcst_jax.data.labels import imagenet_class_names
      names = imagenet_class_names()
    g = gallery_examples(ev, result["calibration"], chosen["param"], gallery_size, names)
    if g is not None:
      paths["gallery"] = str(plots.saliency_gallery(*g, os.path.join(out, "gallery.png"),
                                                    grid=ev.models.server.module.grid))
  result["calibration"].to_json(os.path.join(out, "calibration.json"))
  paths["calibration"] = os.path.join(out, "calibration.json")
  summary = {k: v for k, v in result.items() if k not in ("points", "calibration")}
  summary.update(devices=int(ev.mesh.devices.size), backend=jax.default_backend(),
                 dtype=ev.config.dtype, operating_points=ops, outputs=paths)
  _atomic_write_text(os.path.join(out, "summary.json"),
                     json.dumps(_plain(summary), indent=2, default=str))
  paths["summary"] = os.path.join(out, "summary.json")
  return paths


# ---------------------------------------------------------------- from a config


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def load_models(config) -> Models:
  from rcst_jax.checkpoints import load_model
  path = lambda name: os.path.join(config.models_dir, name)
  return with_dtype(Models(load_model(path(config.edge)), load_model(path(config.server)),
                           load_model(path(config.baseline_edge))), config.dtype)


def with_dtype(models: Models, dtype: str) -> Models:
  """Same weights (float32), computation in `dtype` (bfloat16 is what TPUs prefer)."""
  if dtype not in DTYPES:
    raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
  cast = lambda m: dataclasses.replace(m, module=m.module.clone(dtype=DTYPES[dtype]))
  return Models(cast(models.edge), cast(models.server), cast(models.baseline_edge))


def dtype_comparison(points_a, points_b, name_a: str, name_b: str) -> str:
  """Markdown: accuracy and cost of every operating point under two compute dtypes."""
  lines = [f"| method | param | acc {name_a} (%) | acc {name_b} (%) | diff (pp) | "
           f"cost {name_a} | cost {name_b} |", "|---|---|---|---|---|---|---|"]
  for a, b in zip(points_a, points_b):
    assert (a["method"], a["param"]) == (b["method"], b["param"])
    param = "" if a["param"] is None else f"{a['param_name']}={a['param']:g}"
    lines.append(f"| {a['method']} | {param} | {100 * a['accuracy']:.2f} | "
                 f"{100 * b['accuracy']:.2f} | {100 * (b['accuracy'] - a['accuracy']):+.2f} | "
                 f"{a['cost']:.3f} | {b['cost']:.3f} |")
  return "\n".join(lines)


def load_sources(config) -> Sources:
  d = config.data
  if d.name == "synthetic":
    from rcst_jax.data.synthetic import SyntheticShapes
    return Sources(SyntheticShapes("calibration", d.n_cal, seed=d.seed),
                   SyntheticShapes("test", d.n_test, seed=d.seed), name="synthetic")
  if d.name == "folder":
    from rcst_jax.data.folder import ImageFolder
    source = ImageFolder(d.folder_root, d.label_map)
  else:
    from rcst_jax.data import imagenet
    kw = dict(data_dir=d.data_dir, pil_decode=d.get("pil_decode", True))
    if d.name == "imagenet2012":
      source = imagenet.imagenet2012(d.split, **kw)
    elif d.name == "imagenet_v2":
      source = imagenet.imagenet_v2(**kw)
    elif d.name == "imagenette":
      source = imagenet.imagenette(d.split, **kw)
    else:
      raise ValueError(f"unknown data.name {d.name!r}")
  n = len(source) if not d.get("limit") else min(len(source), int(d.limit))
  from rcst_jax.data.imagenet import calibration_test_split
  split = calibration_test_split(n, min(int(d.n_cal), n - 1) if n > 1 else 0, d.split_seed)
  return Sources(source, source, split.cal_idx, split.test_idx, name=f"{d.name}/{d.split}")


def evaluate_config(config, models: Models | None = None, sources: Sources | None = None,
                    progress: bool | None = None) -> dict:
  """`rcst evaluate`: the whole run from a config; returns the output paths."""
  if config.get("multihost", False):
    jax.distributed.initialize()
  models = with_dtype(models, config.dtype) if models else load_models(config)
  sources = sources or load_sources(config)
  progress = config.progress if progress is None else progress
  ev = Evaluation(config, models, sources, config.output_dir, progress=progress)
  result = ev.run()
  other = config.get("compare_dtype")
  if other and other != config.dtype:
    # The same sweep in the other dtype (its own cache): the accuracy change
    # is measured, not assumed.
    alt_config = config.copy_and_resolve_references()
    with alt_config.unlocked():
      alt_config.dtype = other
    alt = Evaluation(alt_config, with_dtype(models, other), sources, config.output_dir,
                     progress=progress).run()
  if jax.process_index() != 0:
    return {}
  paths = write_outputs(ev, result, int(config.gallery_size))
  if other and other != config.dtype:
    path = os.path.join(config.output_dir, "dtype_comparison.md")
    _atomic_write_text(path, dtype_comparison(result["points"], alt["points"], config.dtype,
                                              other) + "\n")
    paths["dtype_comparison"] = path
  return {"paths": paths, "result": result}
