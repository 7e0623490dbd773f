"""train.fsdp_inference: the score and evaluate stages with the model sharded (FSDP2) over
`torchrun --nproc_per_node 2` (gloo, CPU), against the whole model in one process.

Scoring splits every chunk's prompts between the processes; a process with fewer forwards pads with
forwards whose results it drops, so the layer gathers stay in step. Below, two files of a mix window (41
prompts, each in both) in packed rows of 56 tokens and forwards of up to 112: a prompt's two rows are one
group, a forward holds up to three rows, and the processes run 10 forwards against 9. Evaluation runs every
example on every process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from spinlm.io import read_jsonl

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "spinlm"]
COMMON = ["--data.max_prompt_length=64", "--data.max_length=128", "--run.progress=false", "--eval.batch_size=4"]
SHARDED = ["--train.strategy=fsdp", "--train.fsdp_inference=true"]


def _spinlm(args: list[str], two: bool) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("SPINLM_FAULT", None)
    launcher = TORCHRUN if two else [sys.executable, "-m", "spinlm"]
    return subprocess.run(launcher + args, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_sharded_scoring_equals_the_whole_model(tiny_model, pairs, tmp_path):
    rows = read_jsonl(pairs.parent / "gens.jsonl")[:41]
    later = [{**r, "iteration": 1, "generated_ids": r["generated_ids"] if k % 5 == 0 else r["generated_ids"][::-1]}
             for k, r in enumerate(rows)]  # iteration t's samples beside t-1's, a few sampled again
    gens = [tmp_path / "it0.jsonl", tmp_path / "it1.jsonl"]
    for path, part in zip(gens, (rows, later)):
        path.write_text("".join(json.dumps(r) + "\n" for r in part))
    args = ["score", "--model", str(tiny_model), "--generations", *map(str, gens), *COMMON,
            "--packing.max_tokens=56", "--packing.score_max_tokens=112"]
    whole = _spinlm([*args, "--out", str(tmp_path / "whole.jsonl")], two=False)
    assert whole.returncode == 0, whole.stderr[-3000:]
    sharded = _spinlm([*args, "--out", str(tmp_path / "sharded.jsonl"), *SHARDED], two=True)
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    assert "sharded over 2 processes for scoring" in sharded.stderr
    a, b = read_jsonl(tmp_path / "whole.jsonl"), read_jsonl(tmp_path / "sharded.jsonl")
    assert [r["id"] for r in a] == [r["id"] for r in b] and len(a) == 82
    worst = max(abs(x[k] - y[k]) for x, y in zip(a, b) for k in ("ref_real_logp", "ref_generated_logp"))
    print(f"measured sharded vs whole scoring: max |log-prob difference| {worst:.3g}")
    assert worst < 1e-4
    assert [r["ref_real_logp"] for r in b[:41]] == [r["ref_real_logp"] for r in b[41:]]  # one group a prompt
    assert all(x["real_tokens"] == y["real_tokens"] and x["generated_tokens_scored"] == y["generated_tokens_scored"]
               for x, y in zip(a, b))
    assert not list(tmp_path.glob("sharded.jsonl.partial*"))


@pytest.mark.slow
def test_sharded_evaluation_equals_the_whole_model(tiny_model, task_data, pairs, tmp_path):
    args = ["evaluate", "--model", str(tiny_model), "--data", str(task_data["test"]), "--pairs", str(pairs),
            "--eval.checker=spinlm.demo.task:check_example", "--eval.max_new_tokens=8", *COMMON]
    whole = _spinlm([*args, "--out", str(tmp_path / "whole.json")], two=False)
    assert whole.returncode == 0, whole.stderr[-3000:]
    sharded = _spinlm([*args, "--out", str(tmp_path / "sharded.json"), *SHARDED], two=True)
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    assert "sharded over 2 processes for scoring" in sharded.stderr
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("whole.json", "sharded.json"))
    assert a["examples"] == b["examples"] == 16
    for key in ("nll_per_token", "reward_margin", "rewards_real"):
        assert abs(a[key] - b[key]) < 1e-5, (key, a[key], b[key])
    for key in ("accuracy", "greedy_mean_tokens", "greedy_hit_max_new_tokens", "reward_accuracy", "dead_pair_share"):
        assert a[key] == b[key], (key, a[key], b[key])


def test_fsdp_inference_needs_fsdp(tiny_model, pairs, tmp_path, capsys):
    from spinlm.cli import main

    code = main(["score", "--model", str(tiny_model), "--generations", str(pairs.parent / "gens.jsonl"), "--out",
                 str(tmp_path / "p.jsonl"), "--train.fsdp_inference=true", *COMMON])
    assert code == 2 and "train.fsdp_inference applies to train.strategy fsdp only" in capsys.readouterr().err


@pytest.mark.slow
def test_a_sharded_iteration_scores_and_evaluates_sharded(tiny_model, task_data, tmp_path):
    """`spinlm run` under fsdp with train.fsdp_inference: the iteration's pairs and held-out metrics
    equal those of the same run scoring and evaluating with the whole model."""
    import yaml

    def config(name: str, sharded: bool):
        cfg = {"run": {"dir": str(tmp_path / name), "progress": False, "seed": 3},
               "model": {"name_or_path": str(tiny_model)},
               "data": {"train": str(task_data["train"]), "eval": str(task_data["test"]), "max_train_rows": 24,
                        "val_size": 0, "max_prompt_length": 64, "max_length": 128},
               "generation": {"max_new_tokens": 8, "batch_size": 4},
               "spin": {"iterations": 1, "mix_window": 1},
               "train": {"learning_rate": 1e-3, "epochs": 1, "batch_size": 4, "strategy": "fsdp",
                         "fsdp_inference": sharded},
               "eval": {"checker": "spinlm.demo.task:check_example", "batch_size": 4}}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        return str(tmp_path / f"{name}.yaml")

    for name, sharded in (("whole", False), ("sharded", True)):
        done = _spinlm(["run", config(name, sharded)], two=True)
        assert done.returncode == 0, done.stderr[-3000:]
        assert ("sharded over 2 processes for scoring" in done.stderr) == sharded
    a, b = (read_jsonl(tmp_path / d / "iteration-0" / "pairs.jsonl") for d in ("whole", "sharded"))
    assert len(a) == len(b) == 24
    assert max(abs(x[k] - y[k]) for x, y in zip(a, b) for k in ("ref_real_logp", "ref_generated_logp")) < 1e-4
    ma, mb = (json.loads((tmp_path / d / "iteration-0" / "metrics.json").read_text())["eval"]
              for d in ("whole", "sharded"))
    for key in ("nll_per_token", "reward_margin"):
        assert abs(ma[key] - mb[key]) < 1e-5, (key, ma[key], mb[key])
    assert (ma["accuracy"], ma["greedy_mean_tokens"]) == (mb["accuracy"], mb["greedy_mean_tokens"])
