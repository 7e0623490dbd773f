"""Checks that need a CUDA GPU (issue 13 / 18): bf16 under fsdp, CPU offload, sharded scoring in
bf16, the memory plan against the measured peak, in-process vLLM on CUDA (where vLLM is installed). They
skip, saying so, on a machine without CUDA
(CI and the project's CPU machines); scripts/gpu_checks.sh runs them on a lent GPU machine.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_checks.sh)")

COMMON = ["--data.max_prompt_length=64", "--data.max_length=128", "--run.progress=false"]


def _spinlm(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("SPINLM_FAULT", None)
    return subprocess.run([sys.executable, "-m", "spinlm", *args], env=env, capture_output=True, text=True,
                          timeout=600)


def _history(out) -> list[dict]:
    return json.loads((out / "spinlm_train.json").read_text())["history"]


def test_fsdp_bf16_and_offload_train_like_fp32(tiny_model, pairs, tmp_path):
    """fsdp on a GPU (a group of one, NCCL): bf16 compute with fp32 reduction, and with the shards
    offloaded to CPU, track the fp32 ddp run's loss; saved models stay fp32 and reload."""
    from transformers import AutoModelForCausalLM

    args = ["train", "--model", str(tiny_model), "--pairs", str(pairs), "--train.batch_size=8",
            "--train.learning_rate=1e-3", "--train.epochs=1", "--run.log_every=1", *COMMON]
    runs = {"fp32": ["--train.mixed_precision=no"],
            "fsdp-bf16": ["--train.strategy=fsdp", "--train.mixed_precision=bf16"],
            "fsdp-offload": ["--train.strategy=fsdp", "--train.mixed_precision=bf16", "--train.fsdp_cpu_offload=true"]}
    for name, flags in runs.items():
        done = _spinlm([*args, "--out", str(tmp_path / name), *flags])
        assert done.returncode == 0, (name, done.stderr[-3000:])
    base = [r["loss"] for r in _history(tmp_path / "fp32")]
    for name in ("fsdp-bf16", "fsdp-offload"):
        losses = [r["loss"] for r in _history(tmp_path / name)]
        print(f"measured {name} vs fp32 loss: max |diff| {max(abs(a - b) for a, b in zip(base, losses)):.3g}")
        assert len(losses) == len(base) and max(abs(a - b) for a, b in zip(base, losses)) < 2e-2
        model = AutoModelForCausalLM.from_pretrained(tmp_path / name)
        assert next(model.parameters()).dtype == torch.float32


def test_sharded_scoring_in_bf16_matches_the_whole_model(tiny_model, pairs, tmp_path):
    gens = pairs.parent / "gens.jsonl"
    args = ["score", "--model", str(tiny_model), "--generations", str(gens), "--model.dtype=bfloat16", *COMMON]
    whole = _spinlm([*args, "--out", str(tmp_path / "whole.jsonl")])
    sharded = _spinlm([*args, "--out", str(tmp_path / "sharded.jsonl"), "--train.strategy=fsdp",
                       "--train.fsdp_inference=true", "--train.mixed_precision=bf16"])
    assert whole.returncode == 0 and sharded.returncode == 0, (whole.stderr[-2000:], sharded.stderr[-2000:])
    from spinlm.io import read_jsonl

    a, b = read_jsonl(tmp_path / "whole.jsonl"), read_jsonl(tmp_path / "sharded.jsonl")
    per_token = max(abs(x["ref_real_logp"] - y["ref_real_logp"]) / max(x["real_tokens"], 1) for x, y in zip(a, b))
    print(f"measured bf16 sharded vs whole scoring: max |diff| per token {per_token:.3g}")
    assert per_token < 5e-2


def test_memory_plan_bounds_the_measured_peak(tiny_model, pairs, tmp_path):
    """The estimate of `spinlm validate` against torch's peak allocation of a real training stage."""
    from spinlm import memory
    from spinlm.config import build
    from spinlm.stages.train import train
    from spinlm.validate import model_weights

    cfg = build(overrides=[f"--model.name_or_path={tiny_model}", "--data.train=x", "--train.batch_size=8",
                           "--train.epochs=1", *COMMON])
    torch.cuda.reset_peak_memory_stats()
    train(str(tiny_model), pairs, tmp_path / "m", cfg, 0)
    peak = torch.cuda.max_memory_allocated()
    arch = memory.arch_of(str(tiny_model), model_weights(str(tiny_model))["parameters"])
    plan = memory.estimate(cfg, arch, 1, memory.row_tokens(cfg, 64, 64), on_gpu=True)
    print(f"measured peak {peak / 2**20:.1f} MiB vs training estimate {plan['train_total'] / 2**20:.1f} MiB")
    assert plan["train_total"] >= 0.5 * peak


def test_release_device_memory_hands_the_cache_back(tiny_model):
    from spinlm.config import Config
    from spinlm.modeling import load_model, release_device_memory

    model = load_model(str(tiny_model), Config().model)
    assert torch.cuda.memory_allocated() > 0
    del model
    release_device_memory()
    assert torch.cuda.memory_reserved() == 0


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM on this GPU machine")
def test_in_process_vllm_on_the_gpu_then_training_gets_the_memory(task_data, tmp_path):
    """generation.backend vllm on CUDA inside `spinlm run`: the engine generates (sampled ids kept,
    a row's seed reproduces it), is shut down, and scoring and training run in the same process."""
    import yaml

    from spinlm.demo.build import build_tiny
    from spinlm.io import read_jsonl

    texts = [v for line in task_data["train"].read_text().splitlines()
             for k, v in json.loads(line).items() if k in ("prompt", "response")]
    tiny_model = build_tiny(tmp_path / "model", texts, hidden_size=64, num_layers=2, num_heads=2,
                            max_position_embeddings=256)  # head_dim 32: a size vLLM's kernels take

    def run(name: str):
        cfg = {"model": {"name_or_path": str(tiny_model)},
               "data": {"train": str(task_data["train"]), "max_train_rows": 16, "val_size": 0,
                        "max_prompt_length": 64, "max_length": 128},
               "run": {"dir": str(tmp_path / name), "progress": False, "seed": 5},
               "generation": {"backend": "vllm", "max_new_tokens": 8, "vllm_args": "--max-model-len 256"},
               "spin": {"iterations": 1}, "eval": {"enabled": False},
               "train": {"epochs": 1, "batch_size": 4, "learning_rate": 1e-3}}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        done = _spinlm(["run", str(tmp_path / f"{name}.yaml")])
        assert done.returncode == 0, done.stderr[-4000:]
        return read_jsonl(tmp_path / name / "iteration-0" / "generations.jsonl")

    first, second = run("a"), run("b")
    assert all(r["generated_ids"] and r["finish"] in ("eos", "length") for r in first)
    assert [r["generated_ids"] for r in first] == [r["generated_ids"] for r in second]  # per-row seeds
    assert (tmp_path / "a" / "iteration-0" / "model" / "model.safetensors").exists()
