#!/bin/bash
# The GPU checks of issues 13 and 18, as one script for a lent GPU machine (one GPU; its image has
# torch, transformers, accelerate, peft and pytest, and no network). Not run yet: no session so far
# was lent a GPU. What it checks: tests/test_gpu.py (fsdp with bf16 compute and with CPU offload
# against fp32, sharded bf16 scoring against the whole model, the memory plan against torch's
# measured peak, the device cache released before a generation server, and, where vLLM is
# installed, the in-process vLLM backend on CUDA inside `spinlm run` with per-row seeds). The CPU
# suites are not rerun there (CI runs them). The lent machine's image has no vLLM and its wheels
# exceed the 64 MiB a call can carry, so on it that test skips (saying so); on a GPU machine of
# your own, `pip install vllm` first. Not here: NCCL across several ranks (one GPU).
#
# Before the device call, here, in the repo root (wheels of what the image lacks):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl datasets dill multiprocess
# Then: run(command="bash scripts/gpu_checks.sh", carry=[".whl"], timeout_s=540)
set -o pipefail
OUT=${OUT:-/tmp/gpu-checks}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
{ nvidia-smi; python3 -c "import torch, transformers, accelerate; print(torch.__version__, transformers.__version__, accelerate.__version__)"; } \
  > "$OUT/environment.txt" 2>&1
timeout 480 python3 -m pytest -q -rP -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/gpu-tests.log"
