# make demo  - synthetic Vaihingen -> processing -> task 3-1s steps 0 and 1 (FT, MiB, MiCro) on CPU -> table + figures
# make test  - ruff check, then the pytest suite (CPU, synthetic data)
# make lint  - ruff check (settings in pyproject.toml)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# pytest-xdist workers: most tests wait on subprocesses, so 2 workers halve the suite's time on 2 cores
TEST_WORKERS ?= 2

.PHONY: setup test lint demo clean-demo

$(STAMP): requirements.txt pyproject.toml scripts/setup_env.sh
	bash scripts/setup_env.sh $(VENV)
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n $(TEST_WORKERS) tests

lint: $(STAMP)
	$(PY) -m ruff check .

demo: $(STAMP)
	PYTHON=$(PY) bash scripts/demo.sh

clean-demo:
	rm -rf demo_out
