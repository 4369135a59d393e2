# The two commands of the README: `make demo` and `make test`. Both create .venv when it is missing
# and install the project into it (the CUDA extension builds against the venv's torch, hence
# --no-build-isolation and torch installed first).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fastbert-installed
# The venv's tools first: torch's extension builder looks for the ninja installed below on PATH.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: demo test install bench clean

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade "pip>=24" setuptools wheel ninja
	$(PY) -m pip install "torch>=2.11,<2.15"
	$(PY) -m pip install --no-build-isolation -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m fastbert.demo

test: $(STAMP)
	$(PY) -m pytest tests -q

bench: $(STAMP)
	$(PY) -m pytest benchmarks --benchmark-only -q

clean:  # the stamp too: the next install rebuilds the extension it removes
	rm -rf build *.egg-info fastbert/_C*.so $(STAMP)
