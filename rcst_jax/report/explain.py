"""What the edge decided for an image and why: shared by `rcst explain` and the gallery.

Both read the edge step's outputs and the decision of `methods.decide`, so a
picture shows exactly what Algorithm 2 did.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import jax.numpy as jnp
import numpy as np

from rcst_edge.payload import message as payload
from rcst_edge.payload.geometry import Geometry
from rcst_jax.inference import edge as edge_lib
from rcst_jax.inference import methods, saliency
from rcst_jax.inference.methods import OperatingPoint


@dataclasses.dataclass
class Explanation:
  cam: np.ndarray            # [H, W] APS-weighted Grad-CAM, upsampled, min-max normalised
  keep: np.ndarray           # [N] patches sent (offloaded) or that would be sent (accepted)
  aps: list                  # [(class, prob)] APS set, most probable first
  accepted: bool
  p_max: float
  pred: int
  nbytes: int                # payload bytes actually due (0 when accepted)


def explain_batch(e: dict, tau: float, geometry: Geometry, images,
                  codec="raw") -> list[Explanation]:
  """One Explanation per image of an edge-step batch `e` (numpy) of uint8
  ``images``, sending at tau with patches coded by ``codec``."""
  off, keep, _ = methods.decide(methods.PROPOSED, edge_lib.edge_view(e), [tau])
  off, keep = off[0], keep[0]
  # The bytes `rcst run` sends: the payloads as encoded.
  nbytes = np.zeros(len(off), np.int64)
  nbytes[off] = payload.coded_bytes(images, np.flatnonzero(off), keep[off], geometry, codec)
  # An accepted image sends nothing; show what its selection would have been.
  would = np.asarray(methods.PROPOSED.select(jnp.asarray(e["patch_scores"]), tau))
  size = (geometry.image_size, geometry.image_size)
  cams = np.asarray(saliency.minmax_normalize(saliency.upsample(jnp.asarray(e["cam"]), size)))
  out = []
  for i in range(len(off)):
    probs = e["probs"][i]
    members = np.flatnonzero(e["aps_mask"][i])
    members = members[np.argsort(-probs[members], kind="stable")]
    out.append(Explanation(cams[i], keep[i] if off[i] else would[i],
                           [(int(c), float(probs[c])) for c in members], not bool(off[i]),
                           float(e["p_max"][i]), int(e["pred"][i]), int(nbytes[i])))
  return out


def explain_images(edge, images, point: OperatingPoint, layer: str, geometry: Geometry,
                   batch_size: int = 16, sharding=None) -> list[Explanation]:
  """The edge step on uint8 images at an operating point, explained. Batches
  of ``batch_size`` (the last one padded), as `rcst run` makes them, so the
  same image gets the same p_max to the last bit in both. ``sharding``: the
  batch's (`edge_lib.edge_step`), e.g. a sweep's, whose compiled step it reuses."""
  e = edge_lib.edge_step_batched(edge, np.asarray(images), point.lambda_hat, point.q_hat,
                                 layer=layer, grid=geometry.grid, batch_size=batch_size,
                                 sharding=sharding)
  return explain_batch(e, point.tau, geometry, np.asarray(images), point.codec)


def explain_image(edge, image, point: OperatingPoint, layer: str, geometry: Geometry,
                  batch_size: int = 16) -> Explanation:
  """`rcst explain`: one uint8 image."""
  return explain_images(edge, np.asarray(image)[None], point, layer, geometry, batch_size)[0]


def namer(names: Sequence[str] | None) -> Callable[[int], str]:
  return (lambda c: names[c]) if names else str


def decision_text(x: Explanation, point: OperatingPoint, geometry: Geometry) -> str:
  where = ("certified pair" if point.certified else "server-only: nothing certified"
           if math.isinf(point.lambda_hat) and point.tau == 0 else "CRC lambda")
  if x.accepted:
    return f"accepted on edge: p_max {x.p_max:.3f} >= lambda {point.lambda_hat:.3f} ({where})"
  return (f"offloaded: p_max {x.p_max:.3f} < lambda {point.lambda_hat:.3f} ({where}); "
          f"{int(x.keep.sum())}/{geometry.num_patches} patches at tau={point.tau:g}, "
          f"{x.nbytes} bytes ({point.codec})")


def gallery_title(x: Explanation, name: Callable[[int], str], label: int, top: int = 3) -> str:
  more = "" if len(x.aps) <= top else f" +{len(x.aps) - top}"
  return ("APS: " + ", ".join(f"{name(c)} {p:.2f}" for c, p in x.aps[:top]) + more
          + f" | true: {name(label)}")
