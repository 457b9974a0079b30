# One command runs the main job, one runs the tests; both build the environment first.
#   make reproduce   train the chapter-7 grid unless committed results/ covers it, execute every
#                    chapter notebook headless, then write the report (preset: $MRILIB_PRESET,
#                    default thesis; the thesis grid wants a GPU)
#   make test        pytest for the library + nbval over every notebook, quick preset
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.14.1 is the version the project is developed with; on Linux x86-64 PyPI serves
# it as a CUDA build, which also runs on a CPU. The library also runs on 2.11.
TORCH ?= torch==2.14.1 torchvision==0.29.1
# A copy of the dataset beside the repository is used when MRILIB_DATA is not set (README, Data).
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

# The grid runs first (resumable: a rerun after an interruption continues it) unless
# mrilib.grid.needs_grid says the committed results/ already hold what chapter 7 reads;
# notebook 05 and the report read the runs by the same rule (mrilib.grid.chapter_results).
reproduce: env
	mkdir -p build/notebooks
	@preset=$${MRILIB_PRESET:-thesis}; \
	if $(PY) -c 'import sys; from mrilib.grid import needs_grid; sys.exit(not needs_grid(sys.argv[1]))' $$preset; then \
	  echo "== chapter-7 grid (preset $$preset)"; \
	  $(PY) -m mrilib grid --preset $$preset --train-generators --resume || exit 1; \
	else \
	  echo "== committed results/ cover the $$preset grid: not training"; \
	fi
	for nb in notebooks/[0-9]*.ipynb; do \
	  echo "== $$nb (preset $${MRILIB_PRESET:-thesis})"; \
	  $(PY) -m jupyter nbconvert --to notebook --execute --ExecutePreprocessor.timeout=-1 \
	    --output-dir build/notebooks "$$nb" || exit 1; \
	done
	$(PY) -m mrilib report --preset $${MRILIB_PRESET:-thesis}
	@echo "Executed notebooks are in build/notebooks/; figures in figures/ (thesis preset) or cache/<preset>/figures/; summary.md beside the results read."

lab: env
	$(PY) -m jupyter lab notebooks

clean-cache:
	rm -rf cache
