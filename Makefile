# One-command entry points; each creates .venv and installs on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
RUNTIME := $(VENV)/.installed-runtime
DEV     := $(VENV)/.installed-dev

.PHONY: run test lint typecheck bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# What the processor needs to run.
$(RUNTIME): pyproject.toml | $(VENV)/bin/python
	$(BIN)/pip install --quiet -e .
	touch $(RUNTIME)

# Plus what the tests need: moto's server, pytest, ruff, mypy, cfn-lint.
$(DEV): pyproject.toml | $(VENV)/bin/python
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(RUNTIME) $(DEV)

## Run the main job once on the embedded default (SQLite, offline composer, sandbox sender).
run: $(RUNTIME)
	$(BIN)/channel-processor process examples/context.json

## Lint, format check, type check, then the whole test suite.
test: lint typecheck
	$(BIN)/pytest -q

lint: $(DEV)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: $(DEV)
	$(BIN)/mypy src

## Throughput / latency / memory figures (see bench/).
bench: $(DEV)
	$(BIN)/python -m bench.throughput

clean:
	rm -rf $(VENV) .channel-processor .pytest_cache .mypy_cache .ruff_cache
