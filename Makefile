# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv and install exactly the versions in constraints.txt.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check -c constraints.txt
EXPORT_VENV := .venv-export
EXPORT_PY := $(EXPORT_VENV)/bin/python
EXPORT_PIP := $(EXPORT_PY) -m pip install -q --disable-pip-version-check -c constraints.txt

.PHONY: demo test bench serve remote-demo clean export-env test-export

$(VENV)/.base: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -e .
	touch $@

# The test extra adds torch + timm (parity tests, conversion), the notebook runner
# and gRPC (`rcst serve`).
$(VENV)/.test: $(VENV)/.base
	$(PIP) -e '.[convert,test,serve,onnx]'
	touch $@

demo: $(VENV)/.base
	$(PY) -m rcst_jax.cli demo $(ARGS)

# Test files spread over TEST_WORKERS processes (pytest-xdist; one file stays
# in one process, so its module fixtures are built once): 11 min against 15
# one at a time on 2 cores. TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= 2
# The ONNX export's own tests (tests/export/test_onnx_edge.py) need jax2onnx:
# they run in the export venv, after the rest.
test: $(VENV)/.test $(EXPORT_VENV)/.ok
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --ignore=tests/export/test_onnx_edge.py $(ARGS)
	$(EXPORT_PY) -m pytest -q -p no:cacheprovider tests/export/test_onnx_edge.py

# Edge and server as two processes: `make serve` in one shell, then
# `make remote-demo` (after `make demo`, which writes the calibration) in another.
$(VENV)/.serve: $(VENV)/.base
	$(PIP) -e '.[serve]'
	touch $@

serve: $(VENV)/.serve
	$(PY) -m rcst_jax.cli serve --server weights/demo_server $(ARGS)

IMAGES := outputs/demo/images
remote-demo: $(VENV)/.serve
	$(PY) -c "import os, sys; from PIL import Image; from rcst_jax.data.synthetic import SyntheticShapes; \
	  os.makedirs('$(IMAGES)', exist_ok=True); s = SyntheticShapes('test', 16, seed=5); \
	  [Image.fromarray(s[i].image).save(f'$(IMAGES)/{i:02d}.png') for i in range(16)]"
	$(PY) -m rcst_jax.cli run --edge weights/demo_edge --server 127.0.0.1:50051 \
	  --calibration outputs/demo/calibration.json $(ARGS) $(IMAGES)/*.png

$(VENV)/.bench: $(VENV)/.test
	$(PIP) -e '.[convert,test,serve,bench]'
	touch $@

bench: $(VENV)/.bench
	$(PY) benchmarks/bench_models.py

# `rcst export` (the edge as ONNX) in a venv of its own: jax2onnx's metadata
# pins orbax-checkpoint<0.11.37 against rcst_jax's 0.12.8, so it is installed
# with --no-deps after everything it imports (export-requirements.txt), and
# the main venv never sees it. The [onnx] extra (onnxruntime, to run the
# file) installs into either venv.

$(EXPORT_VENV)/.ok: pyproject.toml constraints.txt export-requirements.txt
	test -x $(EXPORT_PY) || $(PYTHON) -m venv $(EXPORT_VENV)
	$(EXPORT_PIP) -e '.[onnx]' -r export-requirements.txt
	$(EXPORT_PIP) --no-deps jax2onnx
	$(EXPORT_PY) -c "import jax2onnx, onnxruntime, rcst_jax.export.onnx_edge"
	touch $@

export-env: $(EXPORT_VENV)/.ok

# The ONNX edge against the Flax edge (tests/export; skipped in the main venv).
test-export: $(EXPORT_VENV)/.ok
	$(EXPORT_PY) -m pytest -q tests/export $(ARGS)

clean:
	rm -rf $(VENV) $(EXPORT_VENV) outputs
