"""benchmarks/profile_xla.py names XLA:CPU fusions from the optimised HLO;
its FLOP counts are checked against the hand count 2*M*K*N."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import profile_xla  # noqa: E402


def _kinds(fn, *args):
  hlo = jax.jit(fn).lower(*args).compile().as_text()
  return list(profile_xla.classify(hlo).values())


def test_matmul_flops_and_softmax_fusion_are_named():
  a = jnp.asarray(np.ones((48, 40)), jnp.float32)
  b = jnp.asarray(np.ones((40, 24)), jnp.float32)
  kinds = _kinds(lambda a, b: jnp.tanh(a @ b) * 3.0, a, b)
  mm = [k for k in kinds if k[0].startswith("matmul")]
  assert len(mm) == 1 and mm[0][1] == "f32[48,24]"
  assert mm[0][2] * 1e9 == 2 * 48 * 40 * 24
  # A batched matmul: FLOPs count every batch.
  x = jnp.ones((3, 8, 5), jnp.float32)
  y = jnp.ones((3, 5, 7), jnp.float32)
  kinds = _kinds(lambda x, y: jnp.einsum("bij,bjk->bik", x, y), x, y)
  assert sum(k[2] for k in kinds) * 1e9 == 2 * 3 * 8 * 5 * 7


def test_profile_reports_time_for_the_programs_thunks():
  a = jnp.asarray(np.random.default_rng(0).normal(size=(256, 256)), jnp.float32)
  wall, events, hlo = profile_xla.profile(lambda a: jnp.exp(a @ a) + 1.0, (a,), calls=2)
  kinds = profile_xla.classify(hlo)
  timed = [name for name in events if name in kinds]
  assert wall > 0 and timed, (list(events)[:10], list(kinds))
  assert all(events[n][0] > 0 for n in timed)
