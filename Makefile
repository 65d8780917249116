# Two commands: `make serve` runs the backend, `make test` runs the whole suite
# (`make test-fast` skips the tests that need a Label Studio server).
# Both create .venv and install the pinned requirements on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: serve test test-fast lint venv clean-venv

$(VENV)/.runtime-installed: requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.dev-installed: $(VENV)/.runtime-installed requirements-dev.txt requirements-data.txt
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-data.txt
	@# tests/test_pages.py drives Debian's chromium (Playwright's own browser download needs the internet).
	@test -x /usr/bin/chromium || ! command -v apt-get >/dev/null || \
		{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } || true
	@test -x /usr/bin/chromium || echo "warning: no /usr/bin/chromium; tests/test_pages.py needs it (apt-get install chromium, or set CHROMIUM)" >&2
	touch $@

venv: $(VENV)/.runtime-installed

# Listens on 127.0.0.1 only; `HOST=0.0.0.0 make serve` for a Label Studio on another machine.
serve: $(VENV)/.runtime-installed
	$(PY) -m backend serve

# The whole suite: the linter, then every test including those against a real Label Studio.
test: lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest tests $(PYTEST_ARGS)

# The inner loop: everything that needs no Label Studio server (a few minutes).
test-fast: lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest tests -m "not e2e" $(PYTEST_ARGS)

lint: $(VENV)/.dev-installed
	$(VENV)/bin/ruff check .

clean-venv:
	rm -rf $(VENV)
