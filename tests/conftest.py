"""Shared test helpers. Parity tests build timm models at random init."""

import os
import tempfile

# Sharding tests need several CPU devices; set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# The `rcst` command's compilation cache goes to this session's own directory, not
# the user's (subprocesses inherit it; tests/core checks the cache itself).
os.environ.setdefault("RCST_COMPILATION_CACHE", tempfile.mkdtemp(prefix="rcst-test-xla-"))

import numpy as np
import pytest
from support import randomize_batchnorm  # noqa: F401  (the tests import it from here)


def timm_state_dict_numpy(torch_model) -> dict:
  return {k: v.detach().cpu().numpy() for k, v in torch_model.state_dict().items()}


def max_rel_err(a, b) -> float:
  """Max abs difference relative to the reference's scale (max |b|, at least 1)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))


def pytest_configure(config):
  # Every test process (both xdist workers, and the `rcst` subprocesses) shares
  # that cache: a program compiled by one is loaded by the others.
  from rcst_jax.core import compile_cache
  compile_cache.enable()


@pytest.fixture(scope="session")
def rng():
  return np.random.default_rng(0)


@pytest.fixture(scope="session")
def demo_smoke(tmp_path_factory):
  """`rcst demo --config demo:smoke` once per session: (output dir, what it printed).
  Other tests reuse its cache (e.g. `rcst calibrate` certifies from it)."""
  import contextlib
  import io

  from rcst_jax import cli
  out = tmp_path_factory.mktemp("demo") / "demo"
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    assert cli.main(["demo", "--config", "demo:smoke", f"--config.output_dir={out}"]) == 0
  return out, buf.getvalue()


@pytest.fixture(scope="module")
def calibration(demo_smoke, tmp_path_factory):
  """`rcst calibrate` on the smoke demo's cache: Algorithm 1 and the certificate's
  calibration outcomes are cached there, so no model may run."""
  import support

  from rcst_jax import cli
  path = tmp_path_factory.mktemp("cal") / "cal.json"
  with pytest.MonkeyPatch.context() as m:
    support.refuse_model_calls(m)
    assert cli.main(["calibrate", "--config", "demo:smoke", f"--config.output_dir={demo_smoke[0]}",
                     "--out", str(path)]) == 0
    # The refusals bite: without the cache, Algorithm 1 is the first model call.
    empty = tmp_path_factory.mktemp("nocache")
    with pytest.raises(AssertionError, match="ran a model"):
      cli.main(["calibrate", "--config", "demo:smoke", f"--config.output_dir={empty}",
                "--out", str(empty / "cal.json")])
  return path
