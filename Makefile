# protopool-hf: two commands do all the set-up on a fresh machine.
#   make test   installs (.venv, the package with its dev and docs extras), then lint, format check, tests, docs build
#   make demo   installs, then trains ProtoPool on real Fashion-MNIST and writes demo-output/
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch and torchvision are pinned to the builds that work together here (the preinstalled torch 2.13 CPU wheel
# breaks torchvision's operators, which timm needs).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: install test lint format docs demo clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet $(TORCH_PINS)
	$(BIN)/python -m pip install --quiet -e ".[dev,docs,viz,onnx]"
	touch $@

install: $(VENV)/.installed

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

test: lint
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest $(PYTEST_ARGS)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir site

demo: install
	bash examples/demo_setup.sh $(BIN)/python
	$(BIN)/python examples/demo.py --output-dir demo-output

clean:
	rm -rf site demo-output build dist *.egg-info .pytest_cache
