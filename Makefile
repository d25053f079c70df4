# Two entry points that work on a fresh machine with only python3.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
WORKDIR ?= workdir/heart_disease_fedavg
CONFIG ?= configs/heart_disease_fedavg.py
PYTEST_ARGS ?=

.PHONY: run test venv install install-test clean results report

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

venv install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

run: $(VENV)/.installed
	$(BIN)/python -m launch.main --config=$(CONFIG) --workdir=$(WORKDIR)

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -n 2 $(PYTEST_ARGS)

# Reruns every experiment that feeds a generated table, then regenerates README.md/docs tables
# (experiments/report.py). About 75 min on 2 CPU cores: heart-disease table ~10, privacy ~25,
# security ~8, heterogeneity ~15, inversion sweep ~12, stacked-seeds benchmark ~3.
results: $(VENV)/.installed-test
	$(BIN)/python -m experiments.heart_disease_table
	$(BIN)/python -m benchmarks.stacked_seeds
	$(BIN)/python experiments/privacy.py
	$(BIN)/python experiments/security.py
	$(BIN)/python experiments/heterogeneity.py
	$(BIN)/python experiments/inversion_sweep.py
	$(BIN)/python -m experiments.report

# Rebuilds the generated tables from the committed result files only (seconds, no runs).
report: $(VENV)/.installed
	$(BIN)/python -m experiments.report

clean:
	rm -rf $(VENV) workdir .pytest_cache
