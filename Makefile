PY := .venv/bin/python

.PHONY: setup test lint

# Installs everything into .venv: torch first (the CPU-capable build this project is tested with), then the project.
setup:
	python3 -m venv .venv
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e .[dev]

test:
	$(PY) -m pytest -q tests

lint:
	.venv/bin/ruff check .
