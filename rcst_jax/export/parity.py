"""An exported edge against the Flax edge: the same images through ONNX
Runtime and `edge_step`, the largest differences, and every decision that
differs where the reference is not within ``tie`` of a threshold or a tie.

A decision may differ only at a tie: accept where |p_max - lambda_hat| is
below it, pred where the top two probabilities are, the APS set where a
cumulative sorted mass is that close to q_hat or the classes either side of
its edge to each other. `untied` counts the other differences, which must be zero.
"""

from __future__ import annotations

import numpy as np

from rcst_edge.errors import RcstError
from rcst_jax.inference.edge import edge_step
from rcst_jax.models.checkpoints import load_model

FLOATS = ("probs", "p_max", "cam", "patch_scores")


def session(path: str, threads: int = 0):
  """An ONNX Runtime CPU session of ``path`` (``threads`` 0: its default)."""
  try:
    import onnxruntime as ort
  except ImportError:
    raise RcstError("running an ONNX edge needs onnxruntime: pip install 'rcst_jax[onnx]'"
                    " (or `make export-env`)") from None
  opts = ort.SessionOptions()
  if threads:
    opts.intra_op_num_threads = threads
  return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def run_onnx(sess, images, lambda_hat, q_hat, tau: float = 0.5) -> dict:
  """The exported edge step's outputs by name, as numpy arrays (``keep``: the
  patches sent at ``tau``)."""
  feed = {"images": np.ascontiguousarray(images, np.uint8),
          "lambda_hat": np.asarray(lambda_hat, np.float32),
          "q_hat": np.asarray(q_hat, np.float32), "tau": np.asarray(tau, np.float32)}
  names = [o.name for o in sess.get_outputs()]
  return dict(zip(names, sess.run(names, feed)))


def margins(probs, aps_size, lambda_hat, q_hat) -> dict:
  """Per image, how far the reference is from changing each decision."""
  p = np.asarray(probs, np.float64)
  desc = -np.sort(-p, axis=-1)
  q = np.float64(np.float32(q_hat))
  to_q = (np.abs(np.cumsum(desc, axis=-1) - q).min(-1) if np.isfinite(q)
          else np.full(len(p), np.inf))
  # Two classes that swap across the set's edge (rank k-1 against rank k).
  k = np.asarray(aps_size)
  edge = np.where(k < p.shape[1], desc[np.arange(len(p)), k - 1]
                  - desc[np.arange(len(p)), np.minimum(k, p.shape[1] - 1)], np.inf)
  return {"accept": np.abs(desc[:, 0] - np.float64(np.float32(lambda_hat))),
          "pred": desc[:, 0] - desc[:, 1], "aps_mask": np.minimum(to_q, edge), "aps_size": to_q}


def compare(ref: dict, got: dict, lambda_hat, q_hat, tie: float = 1e-6) -> dict:
  """Max |difference| of each float output; per decision, the images that
  differ and those of them that are not within ``tie`` of a tie (``untied``).
  cam and patch_scores are compared on images whose APS sets agree."""
  same_set = np.all(np.asarray(ref["aps_mask"]) == np.asarray(got["aps_mask"]), axis=-1)
  report = {}
  for k in FLOATS:
    a, b = np.asarray(ref[k], np.float64), np.asarray(got[k], np.float64)
    if k in ("cam", "patch_scores"):
      a, b = a[same_set], b[same_set]
    report[f"max_abs_{k}"] = float(np.abs(a - b).max()) if a.size else 0.0
  for k, margin in margins(ref["probs"], ref["aps_size"], lambda_hat, q_hat).items():
    a, b = np.asarray(ref[k]), np.asarray(got[k])
    differ = (a != b).reshape(len(a), -1).any(-1)
    report[f"{k}_differ"] = int(differ.sum())
    report[f"{k}_untied"] = int((differ & (margin >= tie)).sum())
  return report


def check(path: str, edge_dir: str, images, lambda_hat, q_hat, tie: float = 1e-6) -> dict:
  """`compare` of the ONNX edge at ``path`` with `edge_step` of ``edge_dir``
  (its default, XLA-tuned forms) on ``images`` (uint8 [n, H, W, 3])."""
  ref = edge_step(load_model(edge_dir), np.asarray(images), lambda_hat, q_hat)
  got = run_onnx(session(path), images, lambda_hat, q_hat)
  return {"images": len(images), "lambda_hat": float(lambda_hat), "q_hat": float(q_hat),
          **compare({k: np.asarray(v) for k, v in ref.items()}, got, lambda_hat, q_hat, tie)}
