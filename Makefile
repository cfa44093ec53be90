# outboundd — the commands a developer and an operator need.
# Everything installs itself into .venv on first use.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= config

.PHONY: install run test lint format bench demo clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,speed]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/outboundd -c $(CONFIG)

test: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check outboundd tests tools
	$(BIN)/ruff format --check outboundd tests tools
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format outboundd tests tools
	$(BIN)/ruff check --fix outboundd tests tools

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache queue
