# Two commands on a new machine: `make demo` (the main job on the embedded default model) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RAPID := $(VENV)/bin/rapid

.PHONY: install demo test lint bench eval-small clean

install: $(VENV)/.installed

# torch first, from the CPU wheel pinned in pyproject.toml, so nothing pulls a CUDA build
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

demo: install
	$(RAPID) models pull
	$(RAPID) demo

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(PY) -m eval.bench_decode

eval-small: install
	$(RAPID) models pull
	$(RAPID) eval small

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
