# Shortcuts for the commands the README and CONTRIBUTING.md give; each uses the .venv/ the
# README's test command creates (make test creates it).

VENV := .venv

.PHONY: lint test-fast test docs bench

$(VENV)/bin/python:
	python3 -m venv $(VENV) && $(VENV)/bin/pip install -q -e '.[test]'

lint: $(VENV)/bin/python
	$(VENV)/bin/ruff check proxy tests && $(VENV)/bin/mypy

test-fast: $(VENV)/bin/python
	$(VENV)/bin/python -m pytest -q -m "not slow"

# Exactly the README's test command, which CI (.ci/run) runs too.
test:
	python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]' && scripts/with-redis.sh bundled .venv/bin/python -m pytest -q && scripts/with-redis.sh debian .venv/bin/python -m pytest -q -m redis && .venv/bin/ruff check proxy tests && .venv/bin/mypy

docs: $(VENV)/bin/python
	$(VENV)/bin/mkdocs build --strict

bench: $(VENV)/bin/python
	$(VENV)/bin/python tests/bench/run_bench.py --duration 10 --rounds 3 --scenario short --cluster-orgs 0
