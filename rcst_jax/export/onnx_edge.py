"""`rcst export`: the edge step as one ONNX graph with a dynamic batch.

uint8 images [B, H, W, 3] and the operating point (lambda_hat, q_hat, tau)
-> probs, p_max, pred, accept (Eq. 15), APS mask and size (Eqs. 17-18),
Grad-CAM (Eqs. 19-22), patch scores (Eq. 23) and the patches sent at tau
(Eqs. 24-25, none for an accepted image). The graph is a trace of the
functions `rcst run` calls (`inference.edge`, `inference.selection`), not a
second implementation; rcst_edge.onnx_edge runs it and checks its metadata.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp

from rcst_edge import onnx_format
from rcst_edge.deployment import file_digest
from rcst_edge.errors import OutputRefusedError, RcstError
from rcst_edge.payload.geometry import Geometry
from rcst_jax import __version__
from rcst_jax.core.fileio import atomic_write_bytes
from rcst_jax.data.sources import run_transform
from rcst_jax.inference import edge as edge_lib
from rcst_jax.inference import selection
from rcst_jax.models import efficientnet
from rcst_jax.models.checkpoints import Model, load_model, variables_digest

OPSET = 23  # ONNX Runtime 1.32 runs the batch-16 edge 36 % slower at opset 21


def export_form(edge: Model) -> Model:
  """The edge's inference form (BatchNorm folded) with the standard conv forms
  (ONNX Conv, grouped depthwise) and the whole batch at once: a symbolic
  batch cannot be split into micro-batches, and ONNX Runtime has real convs."""
  fast = edge.inference()
  module = fast.module
  if hasattr(module, "conv_impl"):  # EfficientNet's CPU forms of its convs
    module = module.clone(conv_impl="xla", depthwise_impl="grouped", inference_chunk=0)
  return dataclasses.replace(fast, module=module)


def edge_function(edge: Model, layer: str, grid: int):
  """(images, lambda_hat, q_hat, tau) -> the outputs of `onnx_format.OUTPUTS`, in order."""
  form = export_form(edge)
  meta = form.metadata

  def fn(images, lambda_hat, q_hat, tau):
    out = edge_lib._edge_rows(form.variables, images, lambda_hat, q_hat, module=form.module,
                              mean=tuple(meta["mean"]), std=tuple(meta["std"]), layer=layer,
                              grid=grid)
    out["keep"] = selection.select_threshold(out["patch_scores"], tau) & ~out["accept"][:, None]
    return tuple(out[k] for k in onnx_format.OUTPUTS)
  return fn


def _jaxpr_replay(fn, specs):
  """``fn`` traced once here, then replayed primitive by primitive: the
  converter sees plain JAX primitives (jax.vjp included), never the Flax
  modules that it would otherwise swap for its own, non-differentiable ones."""
  closed = jax.make_jaxpr(fn)(*specs)
  return lambda *args: tuple(jax.core.eval_jaxpr(closed.jaxpr, closed.consts, *args))


def metadata(edge: Model, geometry: Geometry, layer: str) -> dict[str, str]:
  """What the file says of itself (ONNX metadata_props, all strings)."""
  from importlib import metadata as md
  t = run_transform(edge.metadata)
  versions = {d: md.version(d) for d in ("jax", "jax2onnx", "onnx")}
  versions["rcst_jax"] = __version__
  return onnx_format.metadata_props(
      edge_digest=variables_digest(edge.variables), geometry=geometry.to_dict(),
      grid=geometry.grid, transform={"resize_size": t.resize_size, "crop_size": t.crop_size,
                                     "interpolation": t.interpolation},
      mean=list(edge.metadata["mean"]), std=list(edge.metadata["std"]), gradcam_layer=layer,
      num_classes=int(edge.metadata["num_classes"]), opset=OPSET, versions=versions)


def export(edge: Model, out_path: str, geometry: Geometry = Geometry(),
           layer: str = "features") -> dict:
  """Writes ``out_path``; returns its metadata and the seconds it took."""
  try:
    from jax2onnx import to_onnx
  except ImportError as e:
    raise onnx_format.MissingRuntime(
        f"`rcst export` needs jax2onnx ({e}); it lives in the export environment: "
        "`make export-env`, then `.venv-export/bin/rcst export ...`") from None
  import onnx
  t0 = time.perf_counter()
  size = geometry.image_size
  batch = jax.export.symbolic_shape("B")[0]
  specs = [jax.ShapeDtypeStruct((batch, size, size, geometry.channels), jnp.uint8)] + \
      [jax.ShapeDtypeStruct((), jnp.float32)] * 3
  model = to_onnx(_jaxpr_replay(edge_function(edge, layer, geometry.grid), specs), specs,
                  model_name="rcst_edge", opset=OPSET, input_names=list(onnx_format.INPUTS),
                  output_names=list(onnx_format.OUTPUTS))
  props = metadata(edge, geometry, layer)
  onnx.helper.set_model_props(model, props)
  onnx.checker.check_model(model)  # a file ONNX itself calls valid, or nothing is written
  atomic_write_bytes(out_path, model.SerializeToString())  # never half a file
  return {"metadata": props, "seconds": time.perf_counter() - t0}



INPUTS, OUTPUTS = onnx_format.INPUTS, onnx_format.OUTPUTS


class ExportError(RcstError):
  """A request `rcst export` cannot honour (file name, layer, patch size)."""


def _check_request(edge: Model, out: str, layer: str, patch: int, overwrite: bool) -> Geometry:
  if not out.endswith(".onnx"):
    raise ExportError(f"--out must name a .onnx file, got {out!r}")
  if os.path.exists(out) and not overwrite:
    raise OutputRefusedError(f"{out} exists; pass --overwrite to replace it")
  size = int(edge.metadata["input_size"][-1])
  if size % patch:
    raise ExportError(f"the edge's {size}-pixel images are not a multiple of {patch}-pixel "
                      "patches")
  taps = efficientnet.TAPS  # the only family exported
  if layer not in taps:
    raise ExportError(f"layer {layer!r} is not a Grad-CAM tap; available: {sorted(taps)}")
  return Geometry(size, patch)


def export_edge(edge_dir: str, out: str, layer: str = "features", patch: int = 16,
                overwrite: bool = False) -> dict:
  """`rcst export`: the model directory ``edge_dir`` to the ONNX file ``out``
  (patch scores on the grid of a server with ``patch``-pixel patches)."""
  try:
    import jax2onnx  # noqa: F401
  except ImportError as e:
    raise onnx_format.MissingRuntime(
        f"`rcst export` needs jax2onnx ({e}); it lives in the export venv: run "
        "`make export-env`, then `.venv-export/bin/rcst export ...`") from None
  edge = load_model(edge_dir)
  geometry = _check_request(edge, out, layer, patch, overwrite)
  done = export(edge, out, geometry, layer)
  return {"out": out, "bytes": os.path.getsize(out), "seconds": round(done["seconds"], 1),
          "sha256": file_digest(out), "edge_digest": done["metadata"]["rcst.edge_digest"]}
