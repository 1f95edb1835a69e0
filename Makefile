# Setup is idempotent: a fresh machine gets a venv with the CPU torch wheel and every extra the tests use.
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO ?= demo

.PHONY: setup test demo lint

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@# espeak-ng and sox make the test speech; install them where we can (root with apt).
	@command -v espeak-ng >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -qq && apt-get install -y -qq espeak-ng sox libportaudio2 chromium >/dev/null; } || true
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
	$(VENV)/bin/opens2s-edge init --preset tiny --force $(DEMO)
	$(VENV)/bin/opens2s-edge export --checkpoint $(DEMO)/checkpoint --decoder $(DEMO)/decoder --out $(DEMO)/bundle --force
	$(VENV)/bin/opens2s-edge run $(DEMO)/bundle --audio opens2s_edge/assets/hello.wav --out $(DEMO)/reply.wav
