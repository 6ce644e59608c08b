# make demo: install into .venv and run the embedded default evaluation (no network needed).
# make test: install into .venv and run the whole test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean
PEERS := $(VENV)/.peers

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[job,test,bench]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/opticam demo

# Peers for parity tests only, without their declared dependencies, which the code the tests
# use does not need: TorchRay (extremal perturbation; pulls pycocotools, pymongo) and Quantus
# (pointing games; pulls opencv-python, which clashes with the headless OpenCV installed here).
$(PEERS): $(STAMP)
	$(PY) -m pip install --quiet --no-deps torchray quantus
	touch $(PEERS)

test: $(STAMP) $(PEERS)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m benchmarks.methods

clean:
	rm -rf $(VENV) runs .pytest_cache
