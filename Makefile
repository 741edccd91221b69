# Fresh machine: `make run` (set up + default job on the tiny model), `make test` (set up + tests).
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed-stamp
TORCH  ?= torch==2.13.0

.PHONY: setup run test sweep quantize bench bench-gpu gpu-wheels clean-outputs

setup: $(STAMP)

# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build. Re-runs install nothing
# unless pyproject.toml changed.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

run: setup
	$(PY) -m pipeline $(ARGS)

test: setup
	$(PY) -m pytest -q -n auto --dist loadfile $(ARGS)

quantize: setup
	$(PY) -m pipeline.quantize_job $(ARGS)

bench: setup
	$(PY) benchmarks/svdquant_error.py $(ARGS)

# Needs CUDA (see benchmarks/gpu_bench.py; --smoke checks it on CPU). Writes outputs/bench/gpu.json.
bench-gpu:
	$(PYTHON) benchmarks/gpu_bench.py $(ARGS)

gpu-wheels: setup
	PY=$(PY) benchmarks/gpu_wheels.sh

sweep: setup
	$(PY) -m pipeline -m quantization=none sampler.steps=2,4 $(ARGS)

clean-outputs:
	find outputs -mindepth 1 ! -name .gitkeep -exec rm -rf {} +
