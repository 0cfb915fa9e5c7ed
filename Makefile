# protopool-hf: two commands do all the set-up on a fresh machine.
#   make test       installs (.venv, the package with its dev, docs, viz, onnx and app extras), then lint, format check, the tests
#                   without those marked slow, docs build
#   make test-all   the same with the slow tests too (several processes, short training runs): what CI runs (.ci/run)
#   make demo       installs, then trains ProtoPool on real Fashion-MNIST and writes demo-output/
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch and torchvision are pinned to the builds that work together here (the preinstalled torch 2.13 CPU wheel
# breaks torchvision's operators, which timm needs). Changing the pins reinstalls (see $(PINS)).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=
PINS := $(VENV)/.torch-pins

.PHONY: install test test-all lint format docs demo clean FORCE

# A clear message, before anything is created, when the interpreter is missing, too old, or lacks venv / ensurepip
# (Debian and Ubuntu ship them in a separate package).
$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { \
	  echo "protopool-hf needs Python >= 3.11, and '$(PYTHON)' is missing or older: install Python 3.11 or newer and run make PYTHON=python3.11 (or its path)." >&2; \
	  exit 1; }
	@$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || { \
	  echo "'$(PYTHON)' has no venv/ensurepip module, which make needs to create $(VENV): install it (Debian/Ubuntu: apt-get install python3-venv, or python3.X-venv for your version), then run make again." >&2; \
	  exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The torch pins as a file that changes only when the pins change (written to a temporary file, then renamed), so a new
# TORCH_PINS reinstalls while an unchanged one leaves the install stamp alone.
$(PINS): FORCE | $(BIN)/python
	@printf '%s\n' '$(TORCH_PINS)' > $@.tmp
	@if cmp -s $@.tmp $@; then rm -f $@.tmp; else mv $@.tmp $@; fi

$(VENV)/.installed: $(BIN)/python $(PINS) pyproject.toml
	$(BIN)/python -m pip install --quiet $(TORCH_PINS)
	$(BIN)/python -m pip install --quiet -e ".[dev,docs,viz,onnx,app]"
	touch $@

FORCE:

install: $(VENV)/.installed

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

# Tests marked slow are opt-in (tests/conftest.py: --run-slow or RUN_SLOW=1); test-all opts in.
test: lint
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest $(PYTEST_ARGS)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir site

test-all: lint
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest --run-slow $(PYTEST_ARGS)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir site

demo: install
	bash examples/demo_setup.sh $(BIN)/python
	$(BIN)/python examples/demo.py --output-dir demo-output

clean:
	rm -rf site demo-output build dist *.egg-info .pytest_cache
