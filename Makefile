# torch==2.13.0 resolves to the local CPU wheel on this kind of machine; on a GPU box pick a CUDA build, e.g.
#   make setup TORCH_SPEC="torch==2.11.0" TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup test test-slow test-browser demo lint format clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]" "$(TORCH_SPEC)"
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q -x --durations=10 $(PYTEST_ARGS)

test-slow: setup
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

# The web page in Debian's headless Chromium (Selenium); installs chromium and chromedriver when absent.
test-browser: setup
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver)
	$(PY) -m pip install -q "selenium>=4.20"
	OMNILM_TEST_BROWSER=1 $(PY) -m pytest -q -s tests/test_serve_browser.py $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/omnilm demo --train

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
