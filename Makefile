# Every target creates .venv and installs what it needs by itself.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
CONFIG ?= config/default.toml

.PHONY: install test demo batch sample train serve bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q

sample: install
	$(PY) -m batch --config $(CONFIG) generate-sample

train: install
	$(PY) -m batch --config $(CONFIG) train

batch: install
	$(PY) -m batch --config $(CONFIG) generate-sample --if-missing
	$(PY) -m batch --config $(CONFIG) run

demo: batch
	$(PY) -m batch --config $(CONFIG) snapshots
	$(PY) -m batch --config $(CONFIG) sql "SELECT run_id, status, round(expected_hit_rate, 3) AS expected_hit_rate, stage_seconds->>'train' AS train_s, stage_seconds->>'precompute' AS precompute_s FROM runs ORDER BY started_at DESC LIMIT 3"

bench: install
	$(PY) tests/bench/bench_batch.py

clean:
	rm -rf $(VENV) data/store data/sample
