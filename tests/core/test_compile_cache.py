"""The `rcst` command keeps compiled programs on disk: a second run of the
same command compiles nothing new and answers the same."""

import os
import subprocess
import sys

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _entries(root):
  return sorted(os.path.relpath(os.path.join(d, f), root)
                for d, _, files in os.walk(root) for f in files)


def _predict(cache, image):
  env = dict(os.environ, RCST_COMPILATION_CACHE=str(cache))
  r = subprocess.run([sys.executable, "-m", "rcst_jax.cli", "predict", "--model",
                      os.path.join(REPO, "weights", "demo_edge"), str(image)],
                     env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
  assert r.returncode == 0, r.stderr
  return r.stdout


def test_a_second_run_loads_every_program_and_answers_the_same(tmp_path):
  image = tmp_path / "x.png"
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (224, 224, 3), np.uint8)).save(image)
  cache = tmp_path / "cache"
  first = _predict(cache, image)
  after_first = _entries(cache)
  assert after_first, "nothing was cached"
  # One subdirectory: the host key (CPU, jax version, XLA flags).
  assert len(os.listdir(cache)) == 1
  second = _predict(cache, image)
  assert _entries(cache) == after_first, "the second run compiled programs again"
  assert second == first


def test_the_cache_can_be_turned_off(tmp_path):
  image = tmp_path / "x.png"
  Image.fromarray(np.zeros((224, 224, 3), np.uint8)).save(image)
  env = dict(os.environ, RCST_COMPILATION_CACHE="off", XDG_CACHE_HOME=str(tmp_path / "home"))
  r = subprocess.run([sys.executable, "-m", "rcst_jax.cli", "predict", "--model",
                      os.path.join(REPO, "weights", "demo_edge"), str(image)],
                     env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
  assert r.returncode == 0, r.stderr
  assert not (tmp_path / "home" / "rcst_jax").exists()
