# outboundd — the commands a developer and an operator need.
# Everything installs itself into .venv on first use.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= config

.PHONY: install run test lint format bench demo clean

# The hot modules setup.py compiles with mypyc (its COMPILED_MODULES), built
# in place beside their .py files: pure-Python instead with OUTBOUNDD_PURE=1
# or where no C compiler is found.  BUILT records the form last built; it is
# rebuilt when one of those sources changed, so an edit never runs stale
# compiled code (tests/conftest.py refuses an extension older than its source).
FORM   := $(if $(filter 1,$(OUTBOUNDD_PURE)),pure,compiled)
HOT    := $(shell sed -n 's/^ *"\(outboundd\/[a-z_/]*\.py\)",.*/\1/p' setup.py)
BUILT  := $(VENV)/.built-$(FORM)
REPORT := $(BIN)/python -c 'import outboundd.submission.data as m; \
	print("outboundd: hot modules run", "compiled" if m.__file__.endswith((".so", ".pyd")) else "as pure Python")'

install: $(BUILT)

# The editable install itself is built pure: the $(BUILT) rule is the one
# place that compiles, so a fresh install runs mypyc once, not twice.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip 'setuptools>=68' wheel
	OUTBOUNDD_PURE=1 $(BIN)/pip install --quiet -e '.[dev,speed]'
	rm -f $(VENV)/.built-*
	touch $(STAMP)

$(BUILT): $(STAMP) setup.py $(HOT)
	$(BIN)/python setup.py --quiet build_ext --inplace
	rm -f $(VENV)/.built-*
	touch $@
	@$(REPORT)

run: $(BUILT) $(CONFIG)/tls_cert.pem
	$(BIN)/outboundd -c $(CONFIG)

# A self-signed certificate for the local default config, so STARTTLS works
# out of the box (as Debian's Postfix does with its snakeoil certificate).
# Never committed; replace it with a real one for production.
$(CONFIG)/tls_cert.pem:
	openssl req -x509 -newkey rsa:2048 -nodes -days 825 -subj "/CN=localhost" \
	  -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
	  -keyout $(CONFIG)/tls_key.pem -out $(CONFIG)/tls_cert.pem 2>/dev/null
	chmod 600 $(CONFIG)/tls_key.pem

test: $(BUILT)
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

bench: $(BUILT)
	$(BIN)/python tools/bench $(ARGS) $(BENCH_ARGS)

demo: $(BUILT)
	$(BIN)/python tools/demo

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache queue build
	find outboundd -name '*.so' -delete
