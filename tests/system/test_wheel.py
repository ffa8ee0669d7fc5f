"""The package works where it is installed: build a wheel from the tracked
files, install it (non-editable) into a fresh virtual environment, and run the
demo from an empty directory. The new environment is layered on this one's
site-packages (no downloads); the checkout is never on its path."""

import glob
import json
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(cmd, cwd, **kw):
  out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, **kw)
  assert out.returncode == 0, f"{cmd}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
  return out.stdout


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
  if not shutil.which("git") or not os.path.isdir(os.path.join(REPO, ".git")):
    pytest.skip("needs a git checkout to know the tracked files")
  tmp = tmp_path_factory.mktemp("wheel")
  src = tmp / "src"
  files = _run(["git", "ls-files", "-z"], REPO).split("\0")
  for f in filter(None, files):
    if os.path.isfile(os.path.join(REPO, f)):  # tracked and present (no stale build/)
      os.makedirs(src / os.path.dirname(f), exist_ok=True)
      shutil.copy2(os.path.join(REPO, f), src / f)
  _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
        "-w", str(tmp / "dist"), str(src)], tmp)
  wheel, = glob.glob(str(tmp / "dist" / "rcst_jax-*.whl"))
  env = tmp / "venv"
  _run([sys.executable, "-m", "venv", "--without-pip", str(env)], tmp)
  site = _run([str(env / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp).strip()
  # Layer: this environment's packages, but not its .pth hooks (the editable install).
  with open(os.path.join(site, "layer.pth"), "w") as f:
    f.write(sysconfig.get_path("purelib") + "\n")
  _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", site,
        wheel], tmp)
  # pip --target writes no console script; make the one the wheel declares.
  rcst = env / "bin" / "rcst"
  rcst.write_text(f"#!{env / 'bin' / 'python'}\nimport sys\nfrom rcst_jax.cli import main\n"
                  "sys.exit(main())\n")
  rcst.chmod(0o755)
  return {"python": str(env / "bin" / "python"), "rcst": str(rcst), "site": site, "tmp": tmp}


def test_imported_from_the_wheel_with_configs_and_models(venv):
  empty = venv["tmp"] / "empty1"
  empty.mkdir()
  out = json.loads(_run([venv["python"], "-c", (
      "import json, rcst_jax, rcst_jax.configs; from importlib import resources;"
      "print(json.dumps([rcst_jax.__file__, rcst_jax.configs.__file__,"
      " str(resources.files('rcst_jax.weights') / 'demo_edge' / 'metadata.json')]))")],
      empty))
  for path in out:
    assert path.startswith(venv["site"]) and os.path.exists(path), path
  assert "demo:smoke" in _run([venv["rcst"], "configs"], empty)


def test_demo_and_predict_from_an_empty_directory(venv):
  empty = venv["tmp"] / "empty2"
  empty.mkdir()
  printed = _run([venv["rcst"], "demo", "--config", "demo:smoke"], empty)
  assert "| Proposed |" in printed
  summary = json.loads((empty / "outputs" / "demo" / "summary.json").read_text())
  assert summary["rcst_jax_version"] and (empty / "outputs" / "demo" / "figure1.png").exists()
  assert not os.path.exists(os.path.join(venv["site"], "outputs"))  # never into site-packages
  image = empty / "x.png"
  from rcst_jax.data.synthetic import SyntheticShapes
  Image.fromarray(SyntheticShapes("test", 1, seed=9)[0].image).save(image)
  model = os.path.join(venv["site"], "rcst_jax", "weights", "demo_edge")
  record = json.loads(_run([venv["rcst"], "predict", "--model", model, str(image)], empty))
  assert record["image"] == str(image) and len(record["top5"]) == 5
