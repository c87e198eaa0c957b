# taxomoco: `make serve` runs the backend, `make test` runs the whole test suite (real Redis and Label Studio).
# Installs are idempotent: a stamp file per virtual environment, redone only when setup.cfg changes.

PYTHON ?= python3
VENV ?= .venv
LS_VENV ?= .ls-venv
LABEL_STUDIO_VERSION ?= 1.23.2
PYTEST_ARGS ?= -q --timeout=900

PIP_FLAGS = --disable-pip-version-check --quiet

.PHONY: serve test lint install install-test redis-server chromium label-studio clean-venvs

serve: $(VENV)/.installed
	$(VENV)/bin/taxomoco serve

test: lint $(VENV)/.installed-test redis-server chromium label-studio
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# Static checks (configured in pyproject.toml): ruff on the whole tree, mypy on model/ (strict) and ml_backend/.
# mypy keeps its cache in .mypy_cache, so a rerun checks only what changed.
lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: setup.cfg pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/pip install $(PIP_FLAGS) -e .
	touch $@

# animal-mnist (the offline image dataset of the dataset tests and benchmarks) declares tensorflow, which
# it does not need: installed without its dependencies.
$(VENV)/.installed-test: setup.cfg pyproject.toml Makefile | $(VENV)/bin/python
	$(VENV)/bin/pip install $(PIP_FLAGS) -e '.[test]'
	$(VENV)/bin/pip install $(PIP_FLAGS) --no-deps animal-mnist==0.4
	touch $@ $(VENV)/.installed

redis-server:
	./scripts/install-redis-server.sh

# Debian's chromium + chromium-driver for the real-browser test (selenium, headless).
chromium:
	./scripts/install-chromium.sh

label-studio: $(LS_VENV)/.installed

# Label Studio pins its own Django stack: it lives in its own virtual environment.
$(LS_VENV)/.installed:
	$(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/pip install $(PIP_FLAGS) label-studio==$(LABEL_STUDIO_VERSION)
	$(LS_VENV)/bin/python -c "import label_studio; print('label-studio', label_studio.__version__)"
	touch $@

clean-venvs:
	rm -rf $(VENV) $(LS_VENV)
