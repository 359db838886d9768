# The local stack and the test tiers. `make demo` is the whole lifecycle on this machine.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PY      := .venv/bin/python
PYTEST  := .venv/bin/pytest
ENV     := source deploy/local/env.sh
PYTEST_ARGS ?=
DEMO_ARGS   ?=

.PHONY: help setup demo start stop status lint typecheck test test-unit test-integration test-e2e bench lock

help:  ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-17s %s\n", $$1, $$2}'

setup:  ## system packages + both venvs (fast no-op when up to date)
	deploy/local/setup.sh

start: setup  ## start the local stack (Airflow, MLflow, Prometheus) on 127.0.0.1
	deploy/local/stack.sh start

demo: setup  ## the lifecycle of recipe tiny-llama end to end (DEMO_ARGS=--no-follow-retrain to leave the retrain running)
	$(ENV) && $(PY) deploy/local/demo.py --land-only  # before the scheduler's first data run can start
	deploy/local/stack.sh start
	$(ENV) && $(PY) deploy/local/demo.py $(DEMO_ARGS)

stop:  ## stop everything the stack and the deploy stage started
	deploy/local/stack.sh stop

status:  ## what runs
	deploy/local/stack.sh status

lint: setup  ## ruff check (E, F, I, B, UP, no heavy module-level imports outside the job runtime) + ruff format --check
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

typecheck: setup  ## mypy on the job specs, the recipe schema and the rollout analysis ([tool.mypy] in pyproject.toml)
	.venv/bin/mypy

test: setup  ## unit + integration + e2e
	$(PYTEST) tests -m "unit or integration or e2e" --timeout=2700 --durations=25 $(PYTEST_ARGS)

test-unit:  ## fast tier, no engines
	$(PYTEST) tests -m unit -q $(PYTEST_ARGS)

test-integration: setup  ## real engines on this machine
	$(PYTEST) tests -m integration --timeout=1200 $(PYTEST_ARGS)

test-e2e: setup  ## the lifecycle through Airflow's real scheduler
	$(PYTEST) tests -m e2e --timeout=3600 $(PYTEST_ARGS)

bench: setup  ## benchmarks; results go to bench/results/
	@shopt -s nullglob; files=(bench/bench_*.py); \
	if [ $${#files[@]} -eq 0 ]; then echo "no bench/bench_*.py yet"; exit 1; fi; \
	for f in "$${files[@]}"; do echo "== $$f"; $(PY) "$$f" || exit 1; done

lock:  ## re-resolve requirements/*.lock from requirements/*.in
	uv pip compile --python 3.11 requirements/control-plane.in -o requirements/control-plane.lock
	uv pip compile --python 3.11 --find-links /opt/wheels --index-strategy unsafe-best-match \
		requirements/runtime.in -o requirements/runtime.lock
