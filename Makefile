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

# mrilib.reproduce decides: the grid where a GPU is (or TRAIN=1 asks), every notebook whose
# generators and results are at hand, the report; what waits for a GPU is said, not run.
reproduce: env
	$(PY) -m mrilib reproduce $(if $(TRAIN),--train,)

lab: env
	$(PY) -m jupyter lab notebooks

clean-cache:
	rm -rf cache
