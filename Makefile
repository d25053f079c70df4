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

# Reruns every experiment that feeds a generated section, in order of value, then regenerates
# README.md/docs (experiments/report.py). Each step writes its small committed result file under
# docs/ (docs/results/*.json, docs/*.json); `make report` rebuilds every table from those alone.
# Expected times on 2 CPU cores (idle; under nice with other jobs, up to ~2x):
#   heart-disease table ~10 min, stacked-seeds benchmark ~3, sweep benchmark ~3, batched inversion benchmark ~5,
#   DP streaming benchmark ~2, security grid ~8-15,
#   heterogeneity grid ~15-20, inversion sweep ~12, privacy ~25 (+~5 for 10 heart seeds),
#   FTL 3 splits ~20, FTL protection costs ~5, native-resolution inversion ~15:
#   about 2.5 hours in all.
NICE ?= nice -n 19
results: $(VENV)/.installed-test
	$(NICE) $(BIN)/python -m experiments.heart_disease_table
	$(NICE) $(BIN)/python -m benchmarks.stacked_seeds
	$(NICE) $(BIN)/python -m benchmarks.sweep
	$(NICE) $(BIN)/python benchmarks/inversion_batched.py
	$(NICE) $(BIN)/python benchmarks/dp_streaming.py
	$(NICE) $(BIN)/python experiments/security.py
	$(NICE) $(BIN)/python experiments/heterogeneity.py --workers 1
	$(NICE) $(BIN)/python experiments/inversion_sweep.py
	$(NICE) $(BIN)/python experiments/privacy.py
	$(NICE) $(BIN)/python experiments/privacy.py --settings=hd_client,hd_client_secagg,hd_patient --seeds=0,1,2,3,4,5,6,7,8,9
	$(NICE) $(BIN)/python experiments/ftl.py
	$(NICE) $(BIN)/python experiments/ftl.py --split=b_has_age_sex --overlaps=10,20,50,100
	$(NICE) $(BIN)/python experiments/ftl.py --split=main_no_pretrain --overlaps=10,50,100
	$(NICE) $(BIN)/python benchmarks/ftl_costs.py
	$(NICE) $(BIN)/python experiments/inversion_native.py --victims 8
	$(BIN)/python -m experiments.report

# Rebuilds the generated tables from the committed result files only (seconds, no runs).
report: $(VENV)/.installed
	$(BIN)/python -m experiments.report

clean:
	rm -rf $(VENV) workdir .pytest_cache
