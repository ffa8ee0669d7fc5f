"""Classify image files with a converted or trained model directory."""

from __future__ import annotations

from typing import Iterable, Iterator

import jax
import numpy as np

from rcst_edge import errors
from rcst_jax.data import preprocess
from rcst_jax.data.labels import imagenet_class_names
from rcst_jax.models.checkpoints import Model


def class_names_for(model: Model) -> list[str] | None:
  names = model.metadata.get("class_names")
  if names:
    return list(names)
  if model.metadata.get("label_set") == "imagenet1k":
    return imagenet_class_names()
  return None


def predict_files(model: Model, paths: Iterable[str], k: int = 5,
                  batch_size: int = 16) -> Iterator[dict]:
  """Yields one record per path, in input order: top-k predictions, or an error message.

  A file that cannot be read, decoded or is refused (size, bit depth) costs
  only its own answer: it gets ``{"image": path, "error": why}``.
  """
  names = class_names_for(model)
  prep = preprocess.Preprocess.from_timm_cfg(model.metadata)  # timm's eval transform
  apply = jax.jit(lambda v, x: jax.nn.softmax(model.module.apply(v, model.normalize(x))[0]))
  pending = []  # (path, image or error) in input order, so output order = input order

  def flush():
    images = [x for _, x in pending if isinstance(x, np.ndarray)]
    probs = iter(np.asarray(apply(model.variables, np.stack(images)))) if images else iter(())
    for path, x in pending:
      if not isinstance(x, np.ndarray):
        yield {"image": path, "error": x}
        continue
      p = next(probs)
      top = np.argsort(-p, kind="stable")[:k]
      yield {"image": path, f"top{k}": [
          {"index": int(i), "label": names[i] if names else None, "prob": float(p[i])}
          for i in top]}
    pending.clear()

  for path in paths:
    try:
      pending.append((path, prep(path)))
    except (errors.RcstError, OSError, MemoryError) as e:
      pending.append((path, errors.describe(e) if not isinstance(e, MemoryError)
                      else f"{path}: out of memory while reading the image"))
    if sum(isinstance(x, np.ndarray) for _, x in pending) == batch_size:
      yield from flush()
  yield from flush()
