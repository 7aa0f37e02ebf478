# Thin wrappers over commands you can run by hand. `make install` uses the active virtual environment, or creates
# .venv when none is active. TORCH picks the torch build (a GPU user may set e.g. TORCH="torch==2.13.0 --index-url ...").
TORCH ?= torch==2.13.0
ifdef VIRTUAL_ENV
  PY := python
  ENV_DIR := $(VIRTUAL_ENV)
else
  PY := .venv/bin/python
  ENV_DIR := .venv
endif
# diffperc is installed in editable mode: code changes need no reinstall, a changed pyproject.toml or constraints.txt
# does. constraints.txt pins the versions the README's numbers were measured with.
INSTALLED := $(ENV_DIR)/.diffperc-installed
CONFIG ?= configs/quickstart/depth.yaml
SWEEP ?= sweeps/tiny/model_size.yaml

.PHONY: install test test-fast demo lint format bench models sweep reproduce-tiny clean

.venv/bin/python:
	python3 -m venv .venv

$(INSTALLED): pyproject.toml constraints.txt | $(if $(VIRTUAL_ENV),,.venv/bin/python)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install $(TORCH)
	$(PY) -m pip install -e ".[dev]" -c constraints.txt
	touch $@

install: $(INSTALLED)

# One worker per core, a test file per worker (files share their toy runs): 5 min on 2 cores instead of 9.
test: install
	$(PY) -m pytest -q -n auto --dist loadfile --timeout 900 --durations 10

test-fast:
	$(PY) -m pytest -q -n auto --dist loadfile -m "not slow" --timeout 300

# `--ckpt_path last`: a second `make demo` resumes (or finds finished) the run the first one started.
demo: install
	$(PY) -m diffperc fit --config $(CONFIG) --ckpt_path last
	$(PY) -m diffperc test --config $(CONFIG) --ckpt_path last
	$(PY) -m diffperc predict --config $(CONFIG) --ckpt_path last --trainer.limit_predict_batches 1
	$(PY) -m diffperc.demo --config $(CONFIG)

lint:
	$(PY) -m ruff check diffperc tests benchmarks

format:
	$(PY) -m ruff format diffperc tests benchmarks
	$(PY) -m ruff check --fix diffperc tests benchmarks

models:
	$(PY) -m diffperc.models

bench: install
	$(PY) benchmarks/run_all.py --out benchmarks/results.md

sweep: install
	$(PY) -m diffperc sweep run $(SWEEP)

reproduce-tiny: install
	$(PY) -m diffperc.scaling.reproduce

clean:
	rm -rf runs
