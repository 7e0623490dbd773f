# spinlm: `make demo` runs the CPU demo, `make test` the test suite, `make bench` the benchmarks.
# The venv gets the local CPU build of torch by default; set TORCH= to choose another, e.g.
#   make test TORCH='torch==2.14.1'      (an existing torch in the venv is always kept)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.spinlm-installed
TEST_STAMP := $(VENV)/.spinlm-test-installed

.PHONY: install demo test bench clean

# The package alone (what the demo needs), then the test extras (TRL, peft, lm-eval, matplotlib,
# transformers[serving], the four experiment trackers) for the tests and the benchmarks.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e .
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(TEST_STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/spinlm demo $(ARGS)

test: $(TEST_STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q $(ARGS)

bench: $(TEST_STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks.run $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
