# Two commands a fresh machine needs: `make demo` (set up + run the main job) and `make test` (set up + test).
# `make test-fast` skips the slow tests (subprocesses, compilation, resume, end-to-end); `make lint` (ruff check,
# ruff format --check and `mkdocs build --strict` over docs/) is what CI runs before `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; GPU users create their own environment and `pip install -e .` after their torch.
TORCH ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export WANDB_MODE ?= offline

.PHONY: setup demo test test-fast lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m koala.demo

test: setup
	$(PY) -m pytest -q

# the tests not marked slow, one process per core (each single-threaded): 49 s on an idle 2-core machine
test-fast: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "not slow" -n auto

lint: setup
	$(VENV)/bin/ruff check koala tests scripts
	$(VENV)/bin/ruff format --check koala tests scripts
	$(VENV)/bin/mkdocs build --strict --quiet

clean:
	rm -rf $(VENV) outputs .cache
