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
	$(BIN)/ruff check broker tests
	$(BIN)/ruff format --check broker tests
	$(BIN)/mypy

# Minutes of mixed load with upstream faults against a real daemon (not part of CI).
SOAK_SECONDS ?= 600
soak: $(STAMP)
	$(BIN)/python bench/soak.py --seconds $(SOAK_SECONDS)

fmt: $(STAMP)
	$(BIN)/ruff format broker tests
	$(BIN)/ruff check --fix broker tests

clean:
	rm -rf $(VENV) build *.egg-info
