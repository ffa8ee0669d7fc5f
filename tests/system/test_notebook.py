"""The Colab notebook runs top to bottom (smoke mode) and is built from its source.

Smoke mode (RCST_SMOKE=1): random timm weights converted through `rcst
convert --weights`, tfds mock data, tiny grids, CPU. The kernel is pinned to
this interpreter (a kernelspec written to tmp_path with sys.executable), so
the test never picks up a global Jupyter kernel.
"""

import importlib.util
import json
import os
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("timm")
pytest.importorskip("tensorflow_datasets")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COLAB = os.path.join(REPO, "colab")
NOTEBOOK = os.path.join(COLAB, "rcst_imagenet.ipynb")
PNG = b"\x89PNG\r\n\x1a\n"

# Appended by the test only: a second evaluation in the same kernel must come
# entirely from the cache (what a rerun after a disconnect relies on).
RESUME_CELL = """
with data_context():
  again = evaluate_config(config)
print("RESUME", json.dumps({"chunks_computed": again["result"]["chunks_computed"],
                            "same_points": again["result"]["points"] == result["points"]}))
"""


def _builder():
  spec = importlib.util.spec_from_file_location("build_notebook", os.path.join(COLAB,
                                                                              "build_notebook.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_notebook_is_built_from_its_source():
  """colab/rcst_imagenet.ipynb is what colab/build_notebook.py makes of colab/rcst_imagenet.py."""
  builder = _builder()
  built = builder.build_notebook()
  assert builder.main(["--check"]) == 0, "run `.venv/bin/python colab/build_notebook.py`"
  with open(NOTEBOOK, encoding="utf-8") as f:
    committed = nbformat.read(f, as_version=4)
  nbformat.validate(committed)
  assert [(c.cell_type, c.get("id"), c.source) for c in committed.cells] == \
      [(c.cell_type, c.get("id"), c.source) for c in built.cells], \
      "notebook out of date: run `.venv/bin/python colab/build_notebook.py`"
  assert committed.metadata == built.metadata
  assert all(not c.get("outputs") for c in committed.cells if c.cell_type == "code")


def _kernel_manager(tmp_path):
  """A KernelManager whose only kernelspec runs ipykernel in this interpreter."""
  from jupyter_client.kernelspec import KernelSpecManager
  from jupyter_client.manager import KernelManager
  spec_dir = tmp_path / "kernels" / "rcst-test"
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "rcst test", "language": "python"}))
  ksm = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")], ensure_native_kernel=False)
  assert ksm.get_kernel_spec("rcst-test").argv[0] == sys.executable
  return KernelManager(kernel_name="rcst-test", kernel_spec_manager=ksm)


def _text(cell) -> str:
  out = []
  for o in cell.get("outputs", []):
    if o.output_type == "stream":
      out.append(o.text)
    elif "data" in o:
      out.append(o.data.get("text/markdown", "") or o.data.get("text/plain", ""))
  return "".join(out)


@pytest.mark.slow
def test_notebook_runs_in_smoke_mode(tmp_path):
  with open(NOTEBOOK, encoding="utf-8") as f:
    nb = nbformat.read(f, as_version=4)
  nb.cells.append(nbformat.v4.new_code_cell(RESUME_CELL.strip()))
  work = tmp_path / "work"
  env = dict(os.environ, RCST_SMOKE="1", RCST_REPO_DIR=REPO, RCST_WORKDIR=str(work),
             MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
  client = nbclient.NotebookClient(nb, km=_kernel_manager(tmp_path), timeout=600,
                                   resources={"metadata": {"path": REPO}})
  client.execute(env=env)  # raises CellExecutionError on the first failing cell

  code = [c for c in nb.cells if c.cell_type == "code"]
  for c in code:
    assert c.execution_count is not None, c.source[:60]
    assert not [o for o in c.outputs if o.output_type == "error"], c.source[:60]
  cells = {c.get("id"): c for c in nb.cells}
  # The kernel is this venv's interpreter.
  assert f"python : {sys.executable}" in _text(cells["devices"])

  out_dir = work / "imagenet"
  table1 = (out_dir / "table1.md").read_text()
  assert "| Proposed |" in table1
  assert "Proposed" in (out_dir / "table2.md").read_text()
  for name in ("figure1.png", "figure2.png", "gallery.png"):
    data = (out_dir / name).read_bytes()
    assert data.startswith(PNG) and len(data) > 1000, name
  points = json.loads((out_dir / "results.json").read_text())
  assert {p["method"] for p in points} == {"server_only", "edge_only", "proposed", "random",
                                          "topk", "attention_sum"}
  assert all(p["n"] == 16 for p in points)
  calibration = json.loads((out_dir / "calibration.json").read_text())
  assert calibration["n"] == 24 and calibration["lambda_valid"]
  for name in ("efficientnet_b0.ra_in1k", "deit_tiny_patch16_224.fb_in1k"):
    assert (work / "models" / name / "metadata.json").exists(), name

  # Inline outputs: both tables, the paper comparison, three images, the calibration.
  images = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
  assert len(images) == 3
  tables_text = _text(cells["tables"])
  assert "Table 1 (this run)" in tables_text and "| Proposed |" in tables_text
  assert "Paper vs. this run" in tables_text and "81.80" in tables_text
  cal_text = _text(cells["calibration"])
  assert "lambda_hat =" in cal_text and "q_hat      =" in cal_text and "edge risk" in cal_text

  # The API cell's Algorithm 2 decides as `rcst run` does on the same files.
  api = json.loads(_text(cells["api"]).split("API", 1)[1])
  assert api == {"same_as_rcst_run": True, "n": 4}

  resume = _text(code[-1])
  record = json.loads(resume.split("RESUME", 1)[1])
  assert record == {"chunks_computed": 0, "same_points": True}
