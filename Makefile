# reconcile: every target creates or refreshes the project-local virtualenv (.venv) first.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
UV_VERSION := 0.13.9
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo
export AIRFLOW_HOME ?= $(CURDIR)/.airflow

.PHONY: venv test demo ui bench lock schema clean

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "==> installing pinned requirements into $(VENV) (first time takes a few minutes)"
	@$(BIN)/python -m pip install -q --disable-pip-version-check "uv==$(UV_VERSION)"
	@$(BIN)/uv pip install -q --python $(BIN)/python -r requirements.txt
	@$(BIN)/uv pip install -q --python $(BIN)/python --no-deps -e .
	@touch $(STAMP)

# One pytest worker per core (pytest-xdist; PYTEST_WORKERS=0 runs in one process, e.g. to debug with pdb).
PYTEST_WORKERS ?= auto
test: $(STAMP)
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

demo: $(STAMP)
	@bash scripts/demo.sh "$(DEMO_DIR)"

# Airflow locally with the demo and the reconcile UI plugin; UI_PORT (default 8080), UI_USER / UI_PASSWORD.
ui: $(STAMP)
	@UI_PORT="$(UI_PORT)" UI_USER="$(UI_USER)" UI_PASSWORD="$(UI_PASSWORD)" bash scripts/ui.sh "$(DEMO_DIR)"

bench: $(STAMP)
	$(BIN)/python scripts/bench.py $(BENCH_ARGS)

# Re-resolve requirements.txt from requirements.in (needs PyPI).
lock: $(STAMP)
	$(BIN)/uv pip compile --python-version 3.11 --no-header requirements.in -o requirements.txt

schema: $(STAMP)
	$(BIN)/reconcile schema > docs/reconcile.schema.json

clean:
	rm -rf $(VENV) $(DEMO_DIR) .airflow .pytest_cache
