# Two commands on a fresh machine: `make run` and `make test`. Each builds the virtual
# environment it needs first; nothing else has to be installed by hand.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= $(or $(COLT_BROKER_CONFIG),$(wildcard $(HOME)/.config/colt-broker/config.toml),$(wildcard /etc/colt-broker/config.toml))
PYTEST_ARGS ?=

.PHONY: run test lint fmt bench soak clean venv

# editable_mode=compat: a plain path entry instead of an import hook, which would cost every
# `colt-broker token` ~10 ms of start-up.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]' --config-settings editable_mode=compat
	touch $@

venv: $(STAMP)

# The daemon in the foreground; with no configuration anywhere, the demo (embedded emulator).
run: $(STAMP)
ifeq ($(strip $(CONFIG)),)
	$(BIN)/colt-broker serve --demo
else
	$(BIN)/colt-broker serve --config $(CONFIG)
endif

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check broker tests bench
	$(BIN)/ruff format --check broker tests bench
	$(BIN)/mypy

# The benchmark (bench/README.md), about 8 minutes. BENCH_ARGS=--quick: a one-minute smoke run;
# BENCH_ARGS=--profile: also a py-spy profile. Debian's nginx and wrk are installed when missing.
BENCH_ARGS ?=
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
bench: $(STAMP)
	@for tool in nginx wrk taskset cc; do \
	  PATH="$$PATH:/usr/sbin:/sbin" command -v $$tool >/dev/null || missing=1; \
	done; \
	if [ -n "$$missing" ]; then \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx wrk util-linux gcc; \
	fi
	$(BIN)/pip install --quiet -e '.[dev,bench]' --config-settings editable_mode=compat
	$(BIN)/python bench/run.py $(BENCH_ARGS)

# Minutes of mixed load with upstream faults against a real daemon (not part of CI).
SOAK_SECONDS ?= 600
soak: $(STAMP)
	$(BIN)/python bench/soak.py --seconds $(SOAK_SECONDS)

fmt: $(STAMP)
	$(BIN)/ruff format broker tests bench
	$(BIN)/ruff check --fix broker tests bench

clean:
	rm -rf $(VENV) build *.egg-info
