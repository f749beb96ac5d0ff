# Every target sets itself up: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vlrm-installed
export HF_HUB_OFFLINE ?= 1

.PHONY: setup system-deps demo smoke test test-fast bench clean

$(STAMP): pyproject.toml examples/reward_plugin/pyproject.toml worlds/shapes/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-cache-dir -e '.[test,bench]' -e examples/reward_plugin -e worlds/shapes
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/vlrm-shapes demo --config configs/shapes/demo.yaml

smoke: $(STAMP)
	$(VENV)/bin/vlrm-run --config configs/tiny.yaml

# Debian packages the tests use: Chromium renders report.html, Java runs the COCO metrics.
system-deps:
	@if command -v chromium >/dev/null && command -v java >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends chromium default-jre-headless; \
	else echo "note: install chromium and a Java runtime (apt-get install chromium default-jre-headless) for the report and COCO-metrics tests"; fi

# Two pytest-xdist workers, one thread each, whole files per worker, in the order tests/conftest.py
# sets (the longest files first; xdist would otherwise order files by their number of tests).
TEST_WORKERS ?= 2
test: $(STAMP) system-deps
	$(PY) -m pytest tests -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder
	$(PY) -m pytest benchmarks --quick

# Throughput against TRL and the naive baselines (tiny and small presets; paper too on a GPU); ~25 min on 2 CPUs (sum of its timed parts).
bench: $(STAMP)
	$(PY) -m pytest benchmarks --benchmark-json=benchmarks/results/latest.json --results-md benchmarks/results/latest.md

test-fast: $(STAMP) system-deps
	$(PY) -m pytest tests -n $(TEST_WORKERS) --dist loadfile -m "not slow and not targets"

clean:
	rm -rf runs .pytest_cache .benchmarks
