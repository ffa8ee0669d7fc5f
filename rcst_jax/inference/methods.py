"""The method table and the one decision rule of Algorithm 2 behind every number.

Each method is declared once: which edge it reads, its offload rule, its
selection rule and parameter (with the config key of its grid), nothing about
how it is shown (report/styles.py). `decide` turns one edge's outputs into,
per image, (offloaded, kept patches, fallback prediction) for a whole
parameter grid in one vmapped call; `combine` is Eq. 27.
`collaborative.collaborative_inference`, the sweep engine, `rcst explain` and
the gallery all go through these two functions, so adding a method is one
entry here, its selection function in `selection` and its style.

An edge "view" is a dict of per-image arrays: ``pred`` [n] (the edge's top-1,
the answer when nothing is offloaded), ``accept`` [n] bool (the edge's own
offload rule: CRC for the proposed edge, Im et al.'s min-entropy for the
baseline edge), and the score arrays the selection rules read (``scores``
[n, N]; ``rank`` [n, N] for random-k).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from rcst_edge.deployment import OperatingPoint, combine  # noqa: F401  (Eq. 27 and the point)
from rcst_jax.inference import selection

EDGE, BASELINE = "edge", "baseline"  # the proposed CNN edge, Im et al.'s DeiT-Tiny edge


@dataclasses.dataclass(frozen=True)
class Method:
  """What decides: the edge it reads, its offload and selection rules (shown by
  ``name`` in report/styles.py)."""
  name: str
  edge: str                         # which edge's view it reads
  param: Optional[str] = None       # parameter name ("tau", "k", ...)
  grid_key: Optional[str] = None    # config key of its grid
  select: Optional[Callable] = None  # (scores [n, N], param) -> keep [n, N]; jnp
  score_key: str = "scores"
  offload: str = "edge_rule"        # "edge_rule": ~accept; "all"; "none"
  may_be_empty: bool = False        # selection can keep 0 patches: empty_policy applies
  reference: bool = False           # server-only / edge-only: rows, never candidates


SERVER_ONLY = Method("server_only", EDGE, offload="all", reference=True)
EDGE_ONLY = Method("edge_only", EDGE, offload="none", reference=True)
PROPOSED = Method("proposed", EDGE, "tau", "tau_grid", selection.select_threshold)
RANDOM = Method("random", BASELINE, "k", "k_grid", selection.select_random_k, score_key="rank")
TOPK = Method("topk", BASELINE, "k", "k_grid", selection.select_topk)
ATTENTION_SUM = Method("attention_sum", BASELINE, "delta_sum", "delta_sum_grid",
                       selection.select_attention_sum, may_be_empty=True)

# The Learn-then-Test choice (calibration/certificate.py): one (lambda, tau) point,
# with its own acceptance threshold and the APS q_hat of the fitting split,
# so it reads an edge view of its own ("certified"). Added to a sweep only
# when certification is configured.
CERTIFIED = Method("certified", "certified", "tau", None, selection.select_threshold)

# Sweep order: the paper's rows, then the references.
METHODS = (RANDOM, TOPK, ATTENTION_SUM, PROPOSED, SERVER_ONLY, EDGE_ONLY)
# Table order, including the methods a run may add.
ALL_METHODS = (RANDOM, TOPK, ATTENTION_SUM, PROPOSED, CERTIFIED, SERVER_ONLY, EDGE_ONLY)
BY_NAME = {m.name: m for m in ALL_METHODS}


def get(name: str) -> Method:
  try:
    return BY_NAME[name]
  except KeyError:
    raise ValueError(f"unknown method {name!r}; known: {sorted(BY_NAME)}") from None


def grid(method: Method, config) -> tuple[float, ...]:
  """The method's parameter values from the config (one None for references)."""
  if method.grid_key is None:
    return (None,)
  return tuple(float(v) for v in config[method.grid_key])


def operating_points(config) -> list[tuple[Method, Optional[float]]]:
  """(method, param) for every point of a sweep, in table order."""
  return [(m, p) for m in METHODS for p in grid(m, config)]


# ---------------------------------------------------------------- decisions


@functools.partial(jax.jit, static_argnames=("offload", "select", "score_key", "may_be_empty",
                                             "empty_policy"))
def _decide(view, params, *, offload: str, select: Callable, score_key: str, may_be_empty: bool,
            empty_policy: str):
  n, num = view["scores"].shape
  p = params.shape[0]
  if offload == "all":
    off = jnp.ones((p, n), bool)
  elif offload == "none":
    off = jnp.zeros((p, n), bool)
  else:
    off = jnp.broadcast_to(~view["accept"], (p, n))
  if select is None:
    keep = jnp.ones((p, n, num), bool)
  else:
    keep = jax.vmap(select, in_axes=(None, 0))(view[score_key], params)
  if may_be_empty:
    off, keep = jax.vmap(selection.apply_empty_policy, in_axes=(0, 0, None, None))(
        off, keep, view["scores"], empty_policy)
  return off, keep & off[..., None]


def _offloaded(method: Method, view: dict, p: int) -> np.ndarray:
  """[p, n]: which images the method's offload rule sends to the server (as `_decide`)."""
  n = np.shape(view["scores"])[0]
  if method.offload in ("all", "none"):
    return np.full((p, n), method.offload == "all")
  return np.broadcast_to(~np.asarray(view["accept"]), (p, n)).copy()


def decide(method: Method, view: dict, params, empty_policy: str = "cls_only"):
  """Algorithm 2's decision for every image and every parameter in `params`.

  Returns numpy (offloaded [P, n] bool, keep [P, n, N] bool, fallback [n]):
  offloaded images are answered by the server from their kept patches, the
  others by `fallback`, the edge's own prediction (Eq. 16).
  """
  if empty_policy not in selection.EMPTY_POLICIES:
    raise ValueError(f"unknown empty-selection policy {empty_policy!r}; "
                     f"choose from {selection.EMPTY_POLICIES}")
  values = [0.0 if v is None else v for v in np.atleast_1d(params)]
  if method.select is None and not method.may_be_empty:  # all patches: nothing to compile
    off = _offloaded(method, view, len(values))
    num = np.shape(view["scores"])[1]
    return off, np.repeat(off[..., None], num, -1), np.asarray(view["pred"])
  # The program depends on the rule alone, not on the method's name or grid,
  # and numpy inputs go in as they are (jnp.asarray would compile a copy per shape).
  off, keep = _decide({k: v if isinstance(v, jax.Array) else np.asarray(v)
                       for k, v in view.items()},
                      np.asarray(values, np.float32), offload=method.offload,
                      select=method.select, score_key=method.score_key,
                      may_be_empty=method.may_be_empty, empty_policy=empty_policy)
  return np.asarray(off), np.asarray(keep), np.asarray(view["pred"])

