# Every target sets itself up: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vlrm-installed
export HF_HUB_OFFLINE ?= 1

.PHONY: setup demo test test-fast clean

$(STAMP): pyproject.toml examples/reward_plugin/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]' -e examples/reward_plugin
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/vlrm-run --config configs/tiny.yaml

test: $(STAMP)
	$(PY) -m pytest tests

test-fast: $(STAMP)
	$(PY) -m pytest tests -m "not slow"

clean:
	rm -rf runs .pytest_cache .benchmarks
