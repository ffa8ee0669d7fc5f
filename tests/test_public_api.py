"""The package's front door: five names, loaded lazily, and a wire format
that a JAX-free edge can import."""

import os
import subprocess
import sys
import textwrap

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Makes `import jax` (and flax, jaxlib) fail in the child, as on an edge device.
_NO_JAX = textwrap.dedent("""
    import sys
    class _NoJax:
      def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("jax", "jaxlib", "flax", "optax", "orbax"):
          raise ImportError(f"{name} is not installed on this edge")
    sys.meta_path.insert(0, _NoJax())
""")


def _child(code: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.run([sys.executable, "-c", _NO_JAX + textwrap.dedent(code)], env=env,
                        capture_output=True, text=True, timeout=120)


def test_the_blocker_really_blocks_jax():
  r = _child("import jax")
  assert r.returncode != 0 and "not installed on this edge" in r.stderr


def test_the_wire_format_codes_and_decodes_without_jax():
  r = _child("""
      import numpy as np
      import rcst_jax
      from rcst_edge.payload import codecs, message
      from rcst_edge.payload.geometry import Geometry
      rng = np.random.default_rng(0)
      image = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
      keep = np.zeros(196, bool); keep[[0, 5, 195]] = True
      for codec in ("raw", "zstd", "jpeg420:50", "webp-lossless"):
        data = message.encode_image_payload(image, keep, Geometry(), codec)
        d = message.decode_payload(data)
        assert list(d.idx) == [0, 5, 195] and d.codec == codecs.parse(codec), codec
        if codec in ("raw", "zstd", "webp-lossless"):
          assert (d.patches[0] == image[:16, :16]).all(), codec
      print(sorted(m for m in sys.modules if m.split(".")[0] in ("jax", "flax")))
  """)
  assert r.returncode == 0, r.stderr
  assert r.stdout.strip() == "[]"


def test_import_rcst_jax_loads_no_jax_and_the_api_resolves_lazily():
  r = subprocess.run([sys.executable, "-c", textwrap.dedent("""
      import sys
      import rcst_jax
      assert "jax" not in sys.modules, "import rcst_jax loaded jax"
      assert sorted(dir(rcst_jax)) == sorted(rcst_jax.__all__)
      from rcst_jax.calibration.algorithm1 import calibrate
      from rcst_jax.calibration.artifact import Calibration
      from rcst_jax.inference.collaborative import collaborative_inference
      from rcst_jax.inference.methods import OperatingPoint
      from rcst_jax.models.checkpoints import load_model
      assert rcst_jax.calibrate is calibrate and rcst_jax.Calibration is Calibration
      assert rcst_jax.collaborative_inference is collaborative_inference
      assert rcst_jax.OperatingPoint is OperatingPoint and rcst_jax.load_model is load_model
      try:
        rcst_jax.nothing_here
      except AttributeError as e:
        assert "nothing_here" in str(e)
      else:
        raise SystemExit("an unknown name resolved")
  """)], env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr


def test_the_api_runs_algorithm_1_as_the_paper_writes_it():
  """rcst_jax.calibrate's CRC lambda, against Eq. 5 of the paper solved by
  scanning every candidate threshold by hand."""
  import rcst_jax
  rng = np.random.default_rng(3)
  n, k = 400, 5
  logits = rng.normal(size=(n, k)) * 2
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  labels = rng.integers(0, k, n)
  alpha = 0.1
  cal = rcst_jax.calibrate(probs.astype(np.float32), labels, alpha_crc=alpha, alpha_aps=alpha)
  p_max = probs.astype(np.float32).max(1).astype(np.float64)
  wrong = probs.argmax(1) != labels
  # Eq. 5: the smallest lambda with (sum of losses of accepted images + B) / (n + 1) <= alpha,
  # where the edge accepts an image iff p_max >= lambda (loss 1 if accepted and wrong).
  best = None
  for lam in sorted(set(p_max.tolist()) | {1.0}, reverse=True):
    risk = (np.sum(wrong & (p_max >= lam)) + 1.0) / (n + 1)
    if risk <= alpha:
      best = lam
    else:
      break
  assert best is not None
  accepted = p_max >= cal.lambda_hat
  assert np.array_equal(accepted, p_max >= best)
