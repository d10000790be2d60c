# make demo  - synthetic Vaihingen -> processing -> task 3-1s steps 0 and 1 (FT, MiB, MiCro) on CPU -> table + figures
# make test  - the pytest suite (CPU, synthetic data)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test demo clean-demo

$(STAMP): requirements.txt scripts/setup_env.sh
	bash scripts/setup_env.sh $(VENV)
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	PYTHON=$(PY) bash scripts/demo.sh

clean-demo:
	rm -rf demo_out
