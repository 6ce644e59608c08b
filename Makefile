# make demo: install into .venv and run the embedded default evaluation (no network needed).
# make test: install into .venv and run the whole test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean
TORCHRAY := $(VENV)/.torchray

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/opticam demo

# TorchRay, the peer for extremal perturbation, only for its parity tests: --no-deps because its
# declared dependencies (pycocotools, pymongo, ...) are not needed by the code the tests use.
$(TORCHRAY): $(STAMP)
	$(PY) -m pip install --quiet --no-deps torchray
	touch $(TORCHRAY)

test: $(STAMP) $(TORCHRAY)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m benchmarks.methods

clean:
	rm -rf $(VENV) runs .pytest_cache
