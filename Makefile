# Every target creates .venv and installs what it needs by itself.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# Which config a target uses, the rule every command follows (docs/configuration.md): CONFIG=FILE
# when given (passed as --config, which wins), else $HYBRIDSERVE_CONFIG when set (no --config, so the
# variable is what the command reads), else config/default.toml.
ifdef CONFIG
CONFIG_ARG := --config $(CONFIG)
else ifdef HYBRIDSERVE_CONFIG
CONFIG_ARG :=
else
CONFIG_ARG := --config config/default.toml
endif

.PHONY: install test-tools lock test demo batch sample train schedule serve screenshot bench bench-server bench-tools clean

# Installs the versions in config/constraints.txt (what make test last passed with), never simply the
# newest of the day; `make lock` moves them forward on purpose.
PIP_INSTALL := $(PY) -m pip install -q -c config/constraints.txt

$(VENV)/.installed: pyproject.toml config/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip
	$(PIP_INSTALL) -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# What the suite drives for real, from Debian's packages: chromium (the page, through Playwright's
# executable_path: no browser download), nginx (the caching front), redis-server (the shared live tier),
# curl (the HTTP/2 client of tests/test_http2.py).
TEST_TOOLS := chromium nginx redis-server curl
test-tools:
	@missing=""; for t in $(TEST_TOOLS); do command -v $$t >/dev/null || test -x /usr/sbin/$$t || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
		SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium nginx-light redis-server curl; \
	fi

test: install test-tools
	$(PY) -m pytest -q

sample: install
	$(PY) -m batch $(CONFIG_ARG) generate-sample

train: install
	$(PY) -m batch $(CONFIG_ARG) train

batch: install
	$(PY) -m batch $(CONFIG_ARG) generate-sample --if-missing
	$(PY) -m batch $(CONFIG_ARG) run

demo: install
	$(PY) -m batch $(CONFIG_ARG) demo

schedule: install
	$(PY) -m batch $(CONFIG_ARG) schedule

# granian (serving/server.py); --host/--port/--workers after ARGS=, e.g. make serve ARGS="--port 8080"
serve: install
	$(PY) -m serving.server $(CONFIG_ARG) $(ARGS)

# docs/page.png: the page at / in Debian's chromium (the browser the tests drive), served from the
# configured store (the batch job runs first when it has no snapshot)
screenshot: install test-tools
	$(PY) -m batch $(CONFIG_ARG) generate-sample --if-missing
	$(PY) -m batch.tools.screenshot $(CONFIG_ARG) --out docs/page.png

# What the benchmarks compare against: nginx, Redis and wrk from apt; FastAPI, uvicorn, the Redis
# client and gunicorn (the former server, as a baseline) from the bench extra.
bench-tools: install
	@command -v wrk >/dev/null && command -v redis-server >/dev/null && { command -v nginx || test -x /usr/sbin/nginx; } >/dev/null \
		|| { SUDO=$$(test "$$(id -u)" = 0 || echo sudo); $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq wrk nginx-light redis-server; }
	$(PIP_INSTALL) -e '.[dev,bench]'

bench: bench-tools
	$(PY) tests/bench/run_all.py

# Only the server comparison (granian, nginx, FastAPI + Redis, the former loop worker) and the summary.
bench-server: bench-tools
	$(PY) tests/bench/run_all.py --only server

# Move config/constraints.txt to the newest releases pyproject.toml allows (every extra), in a
# throwaway venv; then run make test before committing it.
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install -q --upgrade pip
	.lock-venv/bin/python -m pip install -q -e '.[dev,bench]'
	{ sed -n '1,3p' config/constraints.txt; .lock-venv/bin/python -m pip freeze --all --exclude-editable \
		| grep -v '^setuptools=='; } > config/constraints.txt.new
	mv config/constraints.txt.new config/constraints.txt
	rm -rf .lock-venv
	rm -f $(VENV)/.installed

clean:
	rm -rf $(VENV) data/store data/store-demo data/sample
