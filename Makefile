# Every target creates .venv and installs what it needs by itself.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
CONFIG ?= config/default.toml

.PHONY: install test demo batch sample train schedule serve bench clean

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

demo: install
	$(PY) -m batch --config $(CONFIG) demo

schedule: install
	$(PY) -m batch --config $(CONFIG) schedule

serve: install
	HYBRIDSERVE_CONFIG=$(CONFIG) $(PY) -m gunicorn -c python:serving.gunicorn_conf 'serving.app:create_app()'

bench: install
	@command -v wrk >/dev/null || apt-get install -y wrk || sudo apt-get install -y wrk
	$(PY) tests/bench/run_all.py

clean:
	rm -rf $(VENV) data/store data/store-demo data/sample
