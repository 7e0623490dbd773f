"""Loading a model for sharded training (train.strategy fsdp and zero3) under a real
`torchrun --nproc_per_node 2` (gloo, CPU): rank 0 alone reads the weights, and every process ends
with exactly the values load_model gives.

The probe below runs in both processes: it loads the tiny model through the strategy (watching
which process takes tensor data out of a safetensors file), sets it up as a training stage does,
gathers the full state dict to rank 0 and compares it with the checkpoint read by load_model, bit for
bit; each process also compares its buffers the state dict leaves out (rotary inv_freq) and checks
that the tied output head is still the embedding. benchmarks/loading.py measures the memory this saves.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

PROBE = r'''
import json, sys
import torch
import transformers.modeling_utils as hf

reads = []  # tensors this process took out of a safetensors file while the strategy loaded


class Slice:
    def __init__(self, real, name):
        self.real, self.name = real, name

    def __getitem__(self, index):
        reads.append(self.name)
        return self.real[index]

    def __getattr__(self, attr):
        return getattr(self.real, attr)


class File:
    def __init__(self, real):
        self.real = real

    def __enter__(self):
        self.real.__enter__()
        return self

    def __exit__(self, *exc):
        return self.real.__exit__(*exc)

    def get_tensor(self, name):
        reads.append(name)
        return self.real.get_tensor(name)

    def get_slice(self, name):
        return Slice(self.real.get_slice(name), name)

    def __getattr__(self, attr):
        return getattr(self.real, attr)


real_open = hf.safe_open
hf.safe_open = lambda *a, **k: File(real_open(*a, **k))

from spinlm.config import build
from spinlm.modeling import load_model
from spinlm.training.steps import make_optimizer, linear_schedule
from spinlm.training.strategy import make_strategy

path, strategy_name, out = sys.argv[1], sys.argv[2], sys.argv[3]
cfg = build(overrides=[f"--train.strategy={strategy_name}"])
strategy = make_strategy(cfg.train)
model = strategy.load(path, cfg.model, False)
hf.safe_open = real_open
build_optimizer = lambda m: (lambda o: (o, linear_schedule(o, 4, 0.1, 1)))(make_optimizer("rmsprop", m, 1e-3, 0.0))
model, optimizer, scheduler, _ = strategy.setup(model, build_optimizer, None)
full = strategy.full_state_dict(model)
plain = strategy.unwrap(model)
reference = load_model(path, cfg.model, dtype=torch.float32, dev=torch.device("cpu"))
persistent = reference.state_dict()
computed = {n: b for n, b in reference.named_buffers() if n not in persistent}
result = {
    "rank": strategy.rank, "reads": len(reads),
    "computed_equal": sorted(n for n, b in plain.named_buffers()
                             if n in computed and torch.equal(b.cpu(), computed[n])),
    "computed": sorted(computed),
    "tied": plain.lm_head.weight is plain.get_input_embeddings().weight,
}
if strategy.is_main:
    names = [n for n in persistent if n != "lm_head.weight" or not result["tied"]]
    result["full_keys_equal"] = sorted(full) == sorted(names)
    result["unequal"] = [n for n in names if n not in full or not torch.equal(full[n], persistent[n])]
    result["entries"] = len(names)
with open(f"{out}.rank{strategy.rank}.json", "w") as f:
    json.dump(result, f)
'''


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_sharded_loading_reads_on_rank0_only_and_equals_load_model(strategy, tiny_model, tmp_path):
    if strategy == "zero3" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed")
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(probe), str(tiny_model), strategy, str(tmp_path / "result")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    zero, one = (json.loads((tmp_path / f"result.rank{r}.json").read_text()) for r in (0, 1))
    print(f"measured {strategy}: tensors read by rank 0: {zero['reads']}, by rank 1: {one['reads']}; "
          f"{zero['entries']} state dict entries compared")
    assert zero["reads"] > 0 and one["reads"] == 0, (zero["reads"], one["reads"])
    assert zero["full_keys_equal"] and zero["unequal"] == [], zero["unequal"]
    for result in (zero, one):
        assert result["computed"] and result["computed_equal"] == result["computed"], result
        assert result["tied"], "the output head is still the input embedding"
