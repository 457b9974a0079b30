# One command runs the main job, one runs the tests; both build the environment first.
#   make reproduce   execute every chapter notebook headless (preset: $MRILIB_PRESET, default thesis)
#   make test        pytest for the library + nbval over every notebook, quick preset
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.14.1 is what these machines serve from local disk; PyPI serves the same
# (a CUDA build) on a Linux x86-64 machine with a GPU. The library also runs on 2.11.
TORCH ?= torch==2.14.1 torchvision==0.29.1
SHARED_DATA := $(abspath ../shared/data/alzheimer_mri)
export MRILIB_DATA ?= $(if $(wildcard $(SHARED_DATA)),$(SHARED_DATA),)

.PHONY: env test reproduce lab clean-cache

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (mrilib)" >/dev/null
	touch $@

test: env
	MRILIB_PRESET=quick $(PY) -m pytest -ra tests --nbval-lax notebooks

reproduce: env
	mkdir -p build/notebooks
	for nb in notebooks/[0-9]*.ipynb; do \
	  echo "== $$nb (preset $${MRILIB_PRESET:-thesis})"; \
	  $(PY) -m jupyter nbconvert --to notebook --execute --ExecutePreprocessor.timeout=-1 \
	    --output-dir build/notebooks "$$nb" || exit 1; \
	done
	@echo "Executed notebooks are in build/notebooks/; figures in figures/ (thesis preset) or cache/<preset>/figures/."

lab: env
	$(PY) -m jupyter lab notebooks

clean-cache:
	rm -rf cache
