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

run: $(STAMP) $(CONFIG)/tls_cert.pem
	$(BIN)/outboundd -c $(CONFIG)

# A self-signed certificate for the local default config, so STARTTLS works
# out of the box (as Debian's Postfix does with its snakeoil certificate).
# Never committed; replace it with a real one for production.
$(CONFIG)/tls_cert.pem:
	openssl req -x509 -newkey rsa:2048 -nodes -days 825 -subj "/CN=localhost" \
	  -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
	  -keyout $(CONFIG)/tls_key.pem -out $(CONFIG)/tls_cert.pem 2>/dev/null
	chmod 600 $(CONFIG)/tls_key.pem

test: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check outboundd tests tools
	$(BIN)/ruff format --check outboundd tests tools
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format outboundd tests tools
	$(BIN)/ruff check --fix outboundd tests tools

# `make bench ARGS="--peers"` or `make bench -- --peers`: words after the
# goal are the benchmark's own arguments, not make targets.
ifeq (bench,$(firstword $(MAKECMDGOALS)))
  BENCH_ARGS := $(wordlist 2,$(words $(MAKECMDGOALS)),$(MAKECMDGOALS))
  $(eval $(BENCH_ARGS):;@:)
endif

bench: $(STAMP)
	$(BIN)/python tools/bench $(ARGS) $(BENCH_ARGS)

demo: $(STAMP)
	$(BIN)/python tools/demo

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache queue
