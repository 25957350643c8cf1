# Two entry points that work on a fresh machine: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.dwvit-installed

.PHONY: demo test bench install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q --durations=15 tests

# The main job end to end with no network: scikit-learn's handwritten digits by default, or DATASET=<folder or Hub id>.
demo: $(STAMP)
	HF_HUB_OFFLINE=$(if $(DATASET),0,1) $(BIN)/python examples/demo.py $(if $(DATASET),--dataset $(DATASET))

clean:
	rm -rf $(VENV) outputs
