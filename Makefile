# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv and install exactly the versions in constraints.txt.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check -c constraints.txt

.PHONY: demo test bench clean

$(VENV)/.base: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -e .
	touch $@

# The test extra adds torch + timm (parity tests, conversion), the notebook runner
# and gRPC (`rcst serve`).
$(VENV)/.test: $(VENV)/.base
	$(PIP) -e '.[convert,test,serve]'
	touch $@

demo: $(VENV)/.base
	$(PY) -m rcst_jax.cli demo $(ARGS)

test: $(VENV)/.test
	$(PY) -m pytest -q $(ARGS)

$(VENV)/.bench: $(VENV)/.test
	$(PIP) -e '.[convert,test,serve,bench]'
	touch $@

bench: $(VENV)/.bench
	$(PY) benchmarks/bench_models.py

clean:
	rm -rf $(VENV) outputs
