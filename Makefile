# The README's two commands: `make demo` and `make test`.
# Both create .venv on first use; later runs reuse it and install nothing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow test-unit test-property test-integration test-e2e lint bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt -e '.[test,lab,onnx]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) scripts/local_network.py --nodes 8

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n 2 --dist loadgroup

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# One kind of test at a time (each file's `pytestmark`; see tests/conftest.py).
test-unit test-property test-integration test-e2e: test-%: $(STAMP)
	$(PY) -m pytest -q -m '$* and not slow'

bench: $(STAMP)
	$(PY) scripts/bench_codec.py
	$(PY) scripts/bench_simulate.py
	$(PY) scripts/bench_network.py
	$(PY) scripts/bench_models.py
	$(PY) scripts/bench_loop_stall.py
	$(PY) scripts/bench_resnet.py
	$(PY) scripts/bench_sim_large.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
