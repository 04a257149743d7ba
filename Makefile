# The two commands of the README. Both bootstrap a venv on a fresh machine.
PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.installed

.PHONY: up test unit lint clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e ".[test]"
	touch $(STAMP)

## run the platform: embedded NATS, PostgreSQL, Redis and all four services
up: $(STAMP)
	$(VENV)/bin/vge up

## pyflakes' checks (ruff) and the import contracts (services never import each other)
lint: $(STAMP)
	$(VENV)/bin/ruff check
	$(VENV)/bin/lint-imports

## run the whole test suite (unit, integration, e2e) against real servers, after lint
test: lint
	$(VENV)/bin/pytest

unit: $(STAMP)
	$(VENV)/bin/pytest tests/unit

clean:
	rm -rf $(VENV) .vge
