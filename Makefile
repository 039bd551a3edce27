# Every target builds what it needs from nothing: a fresh clone needs only python3 (3.11) and pip.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv lint test demo bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[test,examples]"
	touch $(STAMP)

venv: $(STAMP)

# ruff configuration: [tool.ruff] in pyproject.toml. CI (`.ci/run` -> `make test`) fails on a lint finding.
lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest tests

# make demo DEMO_ARGS="--task mnist1d"   (any `kfc-compile demo` options; see `kfc-compile demo --help`)
DEMO_ARGS ?=
demo: $(STAMP)
	$(VENV)/bin/kfc-compile demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis .ruff_cache
