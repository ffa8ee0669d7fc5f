"""Device placement: the batch mesh, per-device programs, CPU micro-batching.

Under plain jit, XLA's sharding propagation decides how a batch-sharded
input is split. It cannot split a sequential loop along the axis it loops
over: the EfficientNet's CPU micro-batching (``lax.map`` over chunks of the
batch, ``EfficientNet.inference_chunk``) makes it all-gather the batch in
front of the loop and run the whole batch on every device (8x the work on 8
devices, with the results replicated). ``per_device`` states the intent
instead: each device runs the function on its own rows (``jax.shard_map``),
with no collective at all, so any micro-batching inside applies per device.
"""

from __future__ import annotations

import collections
import concurrent.futures

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rcst_edge import host


def make_mesh(devices: str | int = "all") -> Mesh:
  """A 1-D mesh over the batch axis of this host's devices."""
  local = jax.local_devices()
  n = len(local) if devices == "all" else int(devices)
  return Mesh(np.asarray(local[:n]), ("batch",))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows split over the mesh's batch axis."""
  return NamedSharding(mesh, PartitionSpec("batch"))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def on_cpu() -> bool:
  """Whether the models' 'auto' switches pick their CPU forms."""
  return jax.default_backend() == "cpu"


def host_concurrency(requested: int = 0, sharding=None) -> int:
  """Device calls to keep in flight from host threads: ``requested``, or for
  0 two on a single CPU device of a host with 2+ cores (one XLA:CPU call of a
  small model keeps about one core busy), else one (an accelerator, or a CPU
  mesh whose devices already share the cores, pipelines by itself)."""
  if requested:
    return int(requested)
  if not on_cpu() or (sharding is not None and sharding.mesh.size > 1):
    return 1
  return min(2, host.cores())


def host_map(fn, items, concurrency: int):
  """``fn(item)`` for each of ``items`` in order, with up to ``concurrency``
  calls in flight on host threads (`host_concurrency`); ``items`` is read in
  this thread, one ahead of the calls at most."""
  if concurrency <= 1:
    yield from map(fn, items)
    return
  with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
    pending = collections.deque()
    for item in items:
      pending.append(pool.submit(fn, item))
      if len(pending) > concurrency:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()


def map_chunks(fn, args: tuple, n: int):
  """``fn(*args)`` over micro-batches of n rows (``lax.map``), the batch
  (axis 0 of every arg) padded to a multiple of n; every output has the
  batch as axis 0 and comes back unpadded."""
  b = args[0].shape[0]
  pad = -b % n
  split = lambda a: jnp.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1)).reshape(
      -1, n, *a.shape[1:])
  out = jax.lax.map(lambda chunk: fn(*chunk), tuple(split(a) for a in args))
  return jax.tree_util.tree_map(lambda y: y.reshape(-1, *y.shape[2:])[:b], out)


def per_device(fn, sharding: NamedSharding | None, batch_args: tuple[int, ...] = (1,)):
  """``fn(*args)`` run on each device's rows of ``sharding``'s batch axis.

  The positional args in ``batch_args`` are split along axis 0 as
  ``sharding`` splits them; the others are replicated; every output has the
  batch as axis 0. Only for functions whose rows are independent (no
  reduction over the batch), so the result equals ``fn`` on the whole
  batch. ``sharding`` None or a single device: ``fn`` itself. Call it inside
  jit; the batch must be a multiple of the mesh size.
  """
  if sharding is None or sharding.mesh.size == 1:
    return fn
  spec, mesh = sharding.spec, sharding.mesh

  def run(*args):
    specs = tuple(spec if i in batch_args else PartitionSpec() for i in range(len(args)))
    return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=spec)(*args)
  return run


def varying_axes(x) -> tuple[str, ...]:
  """The shard_map axes over which x varies (inside ``per_device``), else ()."""
  t = jax.typeof(x)
  manual = getattr(t, "manual_axis_type", None)
  axes = manual.varying if manual is not None else getattr(t, "vma", ())
  return tuple(sorted(axes))


def vary_like(tree, x):
  """``tree`` cast to vary over the shard_map axes that x varies over.

  A value made inside ``per_device`` from shapes alone (zeros) is
  device-invariant; differentiated as a per-row input, its gradient would
  be summed over the devices. Outside shard_map: ``tree`` unchanged.
  """
  axes = varying_axes(x)
  if not axes:
    return tree
  return jax.tree_util.tree_map(lambda a: jax.lax.pcast(a, axes, to="varying"), tree)
