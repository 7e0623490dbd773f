"""docs/reproducing.md's commands and the shipped recipes, run for real on the offline Hub (tests/offline_hub.py:
tiny stand-ins under the recipes' real model and dataset ids, at their pinned commits), scaled down.

The commands are read from the page (doc_commands) and from the recipes' header comments (recipe_commands),
never retyped; each is run as written, in a directory where `configs/` is the repository's, with the
scale-down of SCALE appended (and `--nproc_per_node 8` -> 2). `torchrun` is started as
`python -m torch.distributed.run`, the module its console script runs, so the test does not depend on PATH.
Every run is a real process: torchrun with 2 processes joining one gloo group on the CPU, DeepSpeed ZeRO-3
as the zephyr recipes say (`train.strategy: zero3`; the documented `--train.strategy=fsdp` where DeepSpeed is
not installed), the Hub's model and datasets resolved by huggingface_hub from its cache with HF_HUB_OFFLINE=1.

Not run (the block's step 4): `spinlm lm-eval` needs the leaderboard tasks' datasets from the Hub, which the
offline Hub does not hold (tests/test_lmeval.py runs the command on a local task), and `spinlm judge` a GPT-4
judge at api.openai.com (tests/test_judge.py and tests/test_mt_bench.py run it against judges on loopback).
The recipe header's alternative launch, `accelerate launch --config_file configs/accelerate/zero3.yaml`, is
the same run under accelerate's launcher: tests/test_accelerate_launch.py launches with that file.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from doc_blocks import doc_commands, recipe_commands

from spinlm import config
from spinlm.rundir import RunLayout

import offline_hub as oh

REPO = Path(__file__).resolve().parents[1]
PAGE = "docs/reproducing.md"
TEST = "test_reproduce_commands_run_on_the_offline_hub"

# The scale-down, in one place. Each value only makes a command smaller (this machine: 2 CPU cores, no GPU,
# no network); none changes what the command runs: every stage of a SPIN iteration (evaluation of the start
# model, generation, scoring, the held-out pairs, training with its final validation check, evaluation,
# summary and RUN/best) and every step of `spinlm dpo` (scoring, training, held-out metrics) still runs.
PROCESSES = "2"  # --nproc_per_node 8 (8 GPUs) -> 2 processes on the CPU (gloo): the fewest that shard
STEPS = "--train.max_steps=2"  # a few optimizer steps, whatever the stand-in data's size (epochs as written)
SCALE = {
    "configs/zephyr-7b-ultrachat.yaml": [
        "--spin.iterations=1",  # one self-play iteration of the recipe's 4 (each one runs the same stages)
        "--generation.max_new_tokens=8",  # 256 sampled tokens per row from a 2-layer model: minutes on CPU
        STEPS,
    ],
    "configs/zephyr-7b-dpo.yaml": [
        STEPS,
        "--eval.max_new_tokens=8",  # the held-out greedy-length report: 256 tokens per row on CPU
    ],
    "configs/zephyr-7b-spin-then-dpo.yaml": [
        STEPS,
        "--eval.max_new_tokens=8",
        # the start model: the recipe names iteration 3's model of the SPIN run; the SPIN command above ran one
        # iteration (scale), so its last model, iteration 0's, stands in. That the recipe's path is where the
        # SPIN recipe puts its last model is checked below without running 4 iterations.
        "--model.name_or_path=runs/zephyr-7b-spin/iteration-0/model",
    ],
    "configs/qwen2.5-0.5b-ultrachat.yaml": [
        "--spin.iterations=1",
        "--generation.max_new_tokens=8",
        STEPS,
    ],
}
# Where DeepSpeed is not installed, the recipes' documented alternative (their header and docs/reproducing.md).
NO_DEEPSPEED = [] if importlib.util.find_spec("deepspeed") else ["--train.strategy=fsdp"]

# The block's commands that are not run, and why (see the module docstring); a command added to the block must
# be run here or named here.
NOT_RUN = {
    ("M=runs/zephyr-7b-spin/iteration-3/model",): "sets $M for the evaluation lines",
    ("spinlm", "lm-eval"): "needs the leaderboard tasks' datasets from the Hub",
    ("spinlm", "judge"): "needs a GPT-4 judge at api.openai.com",
}


def _scaled(argv: list[str]) -> tuple[list[str], str]:
    """The documented command as this test starts it, and the recipe it runs."""
    args = argv[argv.index("spinlm") + 1:]
    recipe = args[args.index("--config") + 1] if args[0] == "dpo" else args[1]
    if argv[0] == "torchrun":
        launch = argv[1:argv.index("-m")]
        launch[launch.index("--nproc_per_node") + 1] = PROCESSES
        prefix = [sys.executable, "-m", "torch.distributed.run", *launch, "-m", "spinlm"]
    else:
        assert argv[0] == "spinlm", argv
        prefix = [sys.executable, "-m", "spinlm"]
    return [*prefix, *args, *SCALE[recipe], *NO_DEEPSPEED], recipe


def _run(argv: list[str], hub: oh.OfflineHub, cwd: Path) -> None:
    env = hub.env()
    env["OMP_NUM_THREADS"] = "1"  # 2 processes on 2 cores
    env.pop("SPINLM_FAULT", None)
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (argv, proc.stderr[-4000:])


def _workdir(tmp_path: Path) -> Path:
    """A directory to run the commands in, as from the repository's root: `configs/` is the repository's; the
    runs' relative paths (runs/...) land here."""
    (tmp_path / "configs").symlink_to(REPO / "configs", target_is_directory=True)
    return tmp_path


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.mark.slow
def test_reproduce_commands_run_on_the_offline_hub(offline_hub, tmp_path):
    """docs/reproducing.md steps 1-3 (SPIN, the DPO baseline, SPIN then DPO) as written, under torchrun with 2
    processes, on the Hub ids of the recipes; each leaves what the docs promise."""
    commands = doc_commands(PAGE, TEST)
    launched = [c for c in commands if c[0] == "torchrun"]
    others = [c for c in commands if c[0] != "torchrun"]
    assert [next((k for k in NOT_RUN if tuple(c[:len(k)]) == k), c) for c in others] == [
        ("M=runs/zephyr-7b-spin/iteration-3/model",), ("spinlm", "lm-eval"), ("spinlm", "lm-eval"),
        ("spinlm", "judge")], others
    runs = [_scaled(c) for c in launched]
    assert [r for _, r in runs] == ["configs/zephyr-7b-ultrachat.yaml", "configs/zephyr-7b-dpo.yaml",
                                    "configs/zephyr-7b-spin-then-dpo.yaml"]
    for recipe in ("zephyr-7b-ultrachat", "zephyr-7b-dpo", "zephyr-7b-spin-then-dpo"):  # the headers say the same
        assert [c for c in recipe_commands(f"configs/{recipe}.yaml") if c[0] == "torchrun"] == \
            [c for c in launched if f"configs/{recipe}.yaml" in c], recipe
    # The recipe's start model is the SPIN recipe's last model, and $M of the evaluation lines is that model.
    spin = config.build(REPO / "configs/zephyr-7b-ultrachat.yaml")
    last = RunLayout(Path(spin.run.dir)).iteration(spin.spin.iterations - 1) / "model"
    assert config.build(REPO / "configs/zephyr-7b-spin-then-dpo.yaml").model.name_or_path == str(last)
    assert others[0] == [f"M={last}"]

    cwd = _workdir(tmp_path)
    for argv, _ in runs:
        _run(argv, offline_hub, cwd)

    # 1. SPIN: the run directory of docs/run-directory.md
    run = cwd / "runs" / "zephyr-7b-spin"
    model = run / "iteration-0" / "model"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "spinlm_train.json"):
        assert (model / name).is_file(), name
    assert _json(model / "spinlm_train.json")["steps"] == 2
    summary = _json(run / "summary.json")
    assert [m["name"] for m in summary] == ["sft", "iteration-0"]
    assert all(m["metrics"]["examples"] == 8 and m["val_metrics"]["examples"] == 8 for m in summary)
    assert (run / "best").is_symlink() and (run / "best").resolve() == model.resolve()
    info = _json(run / "run_info.json")
    assert info["model"]["commit"] == oh.ZEPHYR_REVISION  # the recipe's pinned commit, not main
    assert info["data"]["train"]["commit"] == info["data"]["val"]["commit"] == oh.SPIN_ITER0_REVISION
    assert (info["data"]["val"]["split"], info["data"]["eval"]["id"]) == ("test", oh.ULTRACHAT)

    # 2. the DPO baseline from the pinned SFT model on UltraFeedback's train_prefs, held-out test_prefs
    for out, start, commit in [("zephyr-7b-dpo", oh.ZEPHYR, oh.ZEPHYR_REVISION),
                               ("zephyr-7b-spin-then-dpo", "runs/zephyr-7b-spin/iteration-0/model", None)]:
        model = cwd / "runs" / out / "model"
        assert (model / "model.safetensors").is_file() and (model / "spinlm_train.json").is_file(), out
        record = _json(model / "spinlm_dpo.json")
        assert (record["start_model"], record["start_model_commit"]) == (start, commit), out
        assert record["train_rows"] == offline_hub.splits[oh.ULTRAFEEDBACK]["train_prefs"]
        assert record["train"]["steps"] == 2 and record["config"]["data"]["format"] == "trl"
        read = record["data"]  # the dataset commits read (the recipes do not pin them)
        assert [(r, read[r]["split"], read[r]["commit"]) for r in ("train", "eval")] == [
            ("train", "train_prefs", oh.ULTRAFEEDBACK_REVISION), ("eval", "test_prefs", oh.ULTRAFEEDBACK_REVISION)]
        ev = record["eval"]
        assert ev["examples"] == offline_hub.splits[oh.ULTRAFEEDBACK]["test_prefs"]
        assert ev["model"] == f"runs/{out}/model" and ev["reward_accuracy"] is not None, ev


@pytest.mark.slow
def test_qwen_recipe_runs_on_the_offline_hub(offline_hub, tmp_path):
    """configs/qwen2.5-0.5b-ultrachat.yaml's own command (its header), one process, one iteration."""
    (command,) = recipe_commands("configs/qwen2.5-0.5b-ultrachat.yaml")
    argv, recipe = _scaled(command)
    assert recipe == "configs/qwen2.5-0.5b-ultrachat.yaml"
    cwd = _workdir(tmp_path)
    _run(argv, offline_hub, cwd)
    run = cwd / "runs" / "qwen2.5-0.5b-spin"
    model = run / "iteration-0" / "model"
    assert (model / "model.safetensors").is_file() and _json(model / "spinlm_train.json")["steps"] >= 1
    assert [m["name"] for m in _json(run / "summary.json")] == ["sft", "iteration-0"]
    assert (run / "best").is_symlink()
    info = _json(run / "run_info.json")
    assert info["model"]["commit"] == oh.QWEN_REVISION
    assert info["data"]["train"]["commit"] == oh.ULTRACHAT_REVISION and info["data"]["eval"]["split"] == "test_sft"
