"""The whole loop on a real tiny model: layout, mix window, resume, CLI exit codes."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from spinlm.cli import main
from spinlm.io import read_json, read_jsonl


def _write_config(path: Path, tiny_model: Path, task_data: dict, run_dir: Path) -> Path:
    cfg = {
        "run": {"dir": str(run_dir), "progress": False, "seed": 3},
        "model": {"name_or_path": str(tiny_model)},
        "data": {"train": str(task_data["train"]), "val": str(task_data["val"]), "eval": str(task_data["test"]),
                 "max_train_rows": 24, "max_prompt_length": 64, "max_length": 128},
        "sft": {"enabled": True, "epochs": 1, "learning_rate": 1e-3, "batch_size": 8},
        "generation": {"max_new_tokens": 12, "batch_size": 8},
        "spin": {"iterations": 2, "mix_window": 2, "beta": [0.1, 0.5]},
        "train": {"learning_rate": [1e-4, 5e-5], "epochs": 1, "batch_size": 8},
        "eval": {"checker": "spinlm.demo.task:check_example", "batch_size": 16},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def _markers(run_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(run_dir)): p.read_text() for p in sorted(run_dir.rglob("*.done"))}


@pytest.mark.slow
def test_two_iterations_layout_and_resume(tiny_model, task_data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    cfg_path = _write_config(tmp_path / "cfg.yaml", tiny_model, task_data, run_dir)
    assert main(["run", str(cfg_path)]) == 0
    out = capsys.readouterr().out
    assert "| iteration-1 |" in out and f"run directory: {run_dir}" in out

    assert yaml.safe_load((run_dir / "config.yaml").read_text())["spin"]["beta"] == [0.1, 0.5]
    for t in (0, 1):
        it = run_dir / f"iteration-{t}"
        for name in ("generations.jsonl", "pairs.jsonl", "model", "metrics.json"):
            assert (it / name).exists() and (it / f"{name}.done").exists(), (t, name)
        assert (it / "model" / "model.safetensors").exists()
        assert not list(it.glob("*.tmp"))
    gens0 = read_jsonl(run_dir / "iteration-0" / "generations.jsonl")
    assert len(gens0) == 24 and {r["iteration"] for r in gens0} == {0}
    # mix window 2: iteration 1 trains on iteration 0's and its own generations, all scored under p_1
    pairs1 = read_jsonl(run_dir / "iteration-1" / "pairs.jsonl")
    assert len(pairs1) == 48 and sorted({r["iteration"] for r in pairs1}) == [0, 1]
    pairs0 = read_jsonl(run_dir / "iteration-0" / "pairs.jsonl")
    same = [(a, b) for a in pairs0 for b in pairs1 if b["iteration"] == 0 and a["id"] == b["id"]]
    assert same and all(a["generated"] == b["generated"] for a, b in same)
    assert any(abs(a["ref_real_logp"] - b["ref_real_logp"]) > 1e-6 for a, b in same)  # new reference

    train1 = read_json(run_dir / "iteration-1" / "model" / "spinlm_train.json")
    assert train1["beta"] == 0.5 and train1["learning_rate"] == 5e-5
    summary = read_json(run_dir / "summary.json")
    assert [e["name"] for e in summary] == ["sft", "iteration-0", "iteration-1"]
    for e in summary:
        assert 0.0 <= e["metrics"]["accuracy"] <= 1.0 and e["metrics"]["nll_per_token"] > 0
    assert "reward_accuracy" in summary[1]["metrics"] and "reward_accuracy" not in summary[0]["metrics"]

    # Delete one iteration's model: a re-run redoes that stage only.
    before = _markers(run_dir)
    import shutil

    shutil.rmtree(run_dir / "iteration-1" / "model")
    assert main(["run", str(cfg_path)]) == 0
    after = _markers(run_dir)
    changed = {k for k in before if before[k] != after.get(k)}
    assert changed == {"iteration-1/model.done"}
    assert (run_dir / "iteration-1" / "model" / "model.safetensors").exists()


def test_resume_refuses_changed_config(tiny_model, task_data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg_path = _write_config(tmp_path / "cfg.yaml", tiny_model, task_data, run_dir)
    from spinlm import config

    (run_dir / "config.yaml").write_text(config.to_yaml(config.build(cfg_path)))
    assert main(["run", str(cfg_path), "--spin.loss_type=hinge", "--run.progress=true"]) == 2
    err = capsys.readouterr().err
    assert "spin.loss_type: 'sigmoid' -> 'hinge'" in err and "run.progress" not in err
    assert not (run_dir / "sft").exists()


def test_user_errors_exit_2_without_traceback(tmp_path, tiny_model):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "response": "ok"}\n{"prompt": "x", "response": 3}\n')
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"name_or_path": str(tiny_model)}, "data": {"train": str(bad)},
                                   "run": {"dir": str(tmp_path / "r")}}))
    proc = subprocess.run([sys.executable, "-m", "spinlm", "run", str(cfg)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "bad.jsonl, row 2, field 'response'" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "spinlm", "run", str(cfg), "--train.learning_rat=1"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "did you mean 'train.learning_rate'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_every_subcommand_has_help(capsys):
    for cmd in ("run", "demo", "sft", "generate", "score", "train", "evaluate"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        assert "train:" in text and "learning_rate" in text and "mix_window" in text, cmd


@pytest.mark.slow
def test_stage_subcommands_chain(tiny_model, task_data, tmp_path):
    """generate -> score -> train -> evaluate as separate commands with explicit files."""
    common = ["--run.progress=false", "--generation.max_new_tokens=8", "--data.max_length=128",
              "--data.max_prompt_length=64", "--train.epochs=1", "--train.learning_rate=1e-4",
              "--eval.checker=spinlm.demo.task:check_example"]
    g, p, m, e = tmp_path / "g.jsonl", tmp_path / "p.jsonl", tmp_path / "m", tmp_path / "e.json"
    assert main(["generate", "--model", str(tiny_model), "--data", str(task_data["val"]), "--out", str(g),
                 *common]) == 0
    assert main(["score", "--model", str(tiny_model), "--generations", str(g), "--out", str(p), *common]) == 0
    assert main(["train", "--model", str(tiny_model), "--pairs", str(p), "--out", str(m), *common]) == 0
    assert main(["evaluate", "--model", str(m), "--data", str(task_data["test"]), "--pairs", str(p),
                 "--out", str(e), *common]) == 0
    metrics = json.loads(e.read_text())
    assert len(read_jsonl(p)) == 16 and {"ref_real_logp", "ref_generated_logp"} <= set(read_jsonl(p)[0])
    assert metrics["examples"] == 16 and "reward_margin" in metrics and "accuracy" in metrics
    assert (m / "model.safetensors").exists() and not (tmp_path / "m.tmp").exists()


def test_shipped_recipes_are_valid_configs():
    from spinlm import config

    root = Path(__file__).resolve().parents[1] / "configs"
    recipes = sorted(root.glob("*.yaml"))
    assert len(recipes) >= 2
    # the zephyr recipes' zero3 needs DeepSpeed; without it, the documented alternative
    no_deepspeed = [] if importlib.util.find_spec("deepspeed") else ["--train.strategy=fsdp"]
    for path in recipes:
        cfg = config.build(path, no_deepspeed)
        config.validate(cfg)
        assert cfg.model.name_or_path and cfg.data.train, path
    zephyr = config.build(root / "zephyr-7b-ultrachat.yaml")
    assert [zephyr.per_iteration("learning_rate", t) for t in range(4)] == [5e-7, 5e-7, 1e-7, 1e-7]
    assert [zephyr.per_iteration("beta", t) for t in range(4)] == [0.1, 0.1, 0.1, 5.0]
    assert zephyr.train.optimizer == "rmsprop" and zephyr.spin.mix_window == 2
    # full fine-tuning as the paper ran it: ZeRO-3 (no whole fp32 copy per GPU), transformers generating
    # (uclaml/SPIN #36); tests/test_recipes.py checks every value against the authors'
    assert zephyr.train.strategy == "zero3" and not zephyr.peft.enabled and zephyr.generation.backend == "local"


@pytest.mark.slow
def test_demo_command_small(tmp_path, capsys):
    """`spinlm demo` with overrides for size: builds its own data and model, prints the table."""
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--data.max_train_rows=32", "--data.max_eval_rows=8", "--sft.epochs=1",
            "--spin.iterations=1", "--train.epochs=1", "--generation.max_new_tokens=8", "--run.progress=false"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "| model | accuracy | NLL/token | reward acc | margin |" in text and "| iteration-0 |" in text
    assert f"run directory: {out / 'run'}" in text
    assert (out / "data" / "train.jsonl").exists() and (out / "base" / "model.safetensors").exists()
    summary = read_json(out / "run" / "summary.json")
    assert [e["name"] for e in summary] == ["sft", "iteration-0", "continued-sft"]  # the demo runs the baseline
    assert all(0 <= e["metrics"]["accuracy"] <= 1 for e in summary)
    assert "Continued SFT at equal steps" in text and (out / "run" / "best.json").exists()


def test_run_lock_refuses_a_live_owner_and_clears_a_dead_one(tmp_path, caplog):
    import logging
    import os
    import socket

    from spinlm.errors import UserError
    from spinlm.rundir import acquire_lock, release_lock

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lock = run_dir / ".lock"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": live.pid}))
        with pytest.raises(UserError, match=f"in use by process {live.pid}"):
            acquire_lock(run_dir)
    finally:
        live.kill()
        live.wait()
    # the owner is gone now: its lock is stale
    with caplog.at_level(logging.WARNING, logger="spinlm"):
        assert acquire_lock(run_dir) == lock
    assert "stale lock" in caplog.text
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    release_lock(lock)
    assert not lock.exists()
