PY := .venv/bin/python

.PHONY: setup test test-fast lint

# Installs everything into .venv: torch first (the CPU-capable build this project is tested with), then the project
# with both products and the test tools.
setup:
	python3 -m venv .venv
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e .[vit,fairseq,dev]

# The full suite, as CI runs it.
test:
	$(PY) -m pytest -q tests

# The core and model tests, without the subprocess, multi-process and compile tests marked slow.
test-fast:
	$(PY) -m pytest -q -m "not slow" tests

lint:
	.venv/bin/ruff check .
