# Setup is idempotent: a fresh machine gets a venv with the CPU torch wheel and every extra the tests use.
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO ?= demo

.PHONY: setup test demo lint

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

test: setup
	$(PY) -m pytest -q -x

lint: setup
	$(VENV)/bin/ruff check .

demo: setup
	$(VENV)/bin/opens2s-edge init --preset tiny --force $(DEMO)/checkpoint
	$(VENV)/bin/opens2s-edge generate --checkpoint $(DEMO)/checkpoint --audio opens2s_edge/assets/hello.wav --greedy
