# Set-up, the sample run and the tests, each one command.
#   make run    create .venv, install wsiseg, segment the bundled sample slide
#   make test   create .venv, install wsiseg with its test extras, run the test suite

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CORES ?= all
SNAKEMAKE_ARGS ?=

.PHONY: setup run test clean

$(BIN)/wsiseg: pyproject.toml envs/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r envs/requirements.txt -e ".[test]"
	touch $@

setup: $(BIN)/wsiseg

run: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/snakemake --cores $(CORES) $(SNAKEMAKE_ARGS)

test: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest

clean:
	rm -rf results .snakemake
