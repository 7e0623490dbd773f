"""kill -9 at chosen moments, re-run the same command, compare with an uninterrupted run.

Each killed process is a real `spinlm run` subprocess that receives SIGKILL at a named point
(`SPINLM_FAULT=point[:k]`, see spinlm.io.fault_point): during generation, during scoring,
between two training checkpoints, while a checkpoint is being written, after a stage's
output was renamed but before its marker, and right after a marker. The runs resume one
another; the final weights must equal an uninterrupted run's bit for bit (CPU,
run.deterministic), and no stage may be marked done with partial output at any point.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import SUBPROCESS_THREADS


def _config(path: Path, tiny_model: Path, task_data: dict, run_dir: Path) -> Path:
    cfg = {
        "run": {"dir": str(run_dir), "progress": False, "seed": 5, "deterministic": True},
        "model": {"name_or_path": str(tiny_model)},
        "data": {"train": str(task_data["train"]), "eval": str(task_data["test"]), "max_train_rows": 24, "val_size": 0,
                 "max_eval_rows": 8, "max_prompt_length": 64, "max_length": 128},
        "generation": {"max_new_tokens": 10, "batch_size": 4},
        "spin": {"iterations": 1, "mix_window": 1, "beta": 0.1},
        "train": {"learning_rate": 1e-3, "epochs": 1, "batch_size": 4, "checkpoint_every": 2, "warmup_ratio": 0.2},
        "eval": {"checker": "spinlm.demo.task:check_example", "batch_size": 1},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(cfg: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": SUBPROCESS_THREADS}
    env.pop("SPINLM_FAULT", None)
    if fault:
        env["SPINLM_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "spinlm", "run", str(cfg)], env=env, capture_output=True,
                          text=True, timeout=600)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_markers(run_dir: Path) -> None:
    """Every marker's output is complete: generation/pair files have every row, models have weights."""
    for done in run_dir.rglob("*.done"):
        out = done.with_name(done.name[: -len(".done")])
        assert out.exists(), done
        if out.name in ("generations.jsonl", "pairs.jsonl"):
            assert len(out.read_text().splitlines()) == 24, out
        if out.name == "model":
            assert (out / "model.safetensors").exists() and (out / "spinlm_train.json").exists()


@pytest.mark.slow
def test_killed_anywhere_resumes_to_identical_weights(tiny_model, task_data, tmp_path):
    reference = _run(_config(tmp_path / "ref.yaml", tiny_model, task_data, tmp_path / "ref"))
    assert reference.returncode == 0, reference.stderr

    run_dir = tmp_path / "run"
    cfg = _config(tmp_path / "cfg.yaml", tiny_model, task_data, run_dir)
    it = run_dir / "iteration-0"
    kills = [
        ("generate-batch:3", lambda: len((it / "generations.jsonl.tmp.partial").read_text().splitlines()) == 1 + 12
         and not (it / "generations.jsonl.done").exists()),
        ("score-chunk:1", lambda: (it / "pairs.jsonl.tmp.partial").exists() and not (it / "pairs.jsonl").exists()),
        ("train-step:3", lambda: [p.name for p in (it / "model.tmp.checkpoints").iterdir()] == ["step-000002"]),
        ("checkpoint-write:1", lambda: sorted(p.name for p in (it / "model.tmp.checkpoints").iterdir())
         == ["step-000002", "step-000004.tmp"]),
        ("stage-output:1", lambda: (it / "model" / "model.safetensors").exists()
         and not (it / "model.done").exists()),
        ("stage-done:1", lambda: (it / "model.done").exists() and not (it / "metrics.json").exists()),
    ]
    for fault, state_after in kills:
        result = _run(cfg, fault)
        assert result.returncode == -9, (fault, result.returncode, result.stderr[-2000:])
        assert state_after(), fault
        _check_markers(run_dir)
    final = _run(cfg)
    assert final.returncode == 0, final.stderr
    assert "clearing a stale lock" in final.stderr

    ref_it = tmp_path / "ref" / "iteration-0"
    for name in ("generations.jsonl", "pairs.jsonl", "model/model.safetensors"):
        assert _digest(it / name) == _digest(ref_it / name), name
    assert not list(it.glob("*.tmp*")), "scratch files are removed once stages are done"
    resumed = json.loads((it / "model" / "spinlm_train.json").read_text())
    straight = json.loads((ref_it / "model" / "spinlm_train.json").read_text())
    strip = lambda h: [{k: v for k, v in row.items() if k not in ("elapsed_s", "tokens_per_s")} for row in h["history"]]
    assert strip(resumed) == strip(straight) and resumed["steps"] == 6


@pytest.mark.slow
def test_killed_sft_resumes_to_identical_weights(tiny_model, task_data, tmp_path):
    """`spinlm sft` killed after step 3 (a checkpoint at step 2, a best model saved at the epoch
    end), then killed again inside the next checkpoint write, then finished: same model as an
    uninterrupted SFT."""
    def sft(out: Path, fault: str | None = None) -> subprocess.CompletedProcess:
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        env.pop("SPINLM_FAULT", None)
        env.update({"SPINLM_FAULT": fault} if fault else {})
        return subprocess.run([sys.executable, "-m", "spinlm", "sft", "--model", str(tiny_model), "--data",
                               str(task_data["train"]), "--eval-data", str(task_data["val"]), "--out", str(out),
                               "--sft.epochs=3", "--sft.batch_size=16", "--sft.learning_rate=1e-3",
                               "--train.checkpoint_every=2", "--run.deterministic=true", "--run.progress=false",
                               "--data.max_prompt_length=64", "--data.max_length=128"],
                              env=env, capture_output=True, text=True, timeout=600)

    assert sft(tmp_path / "straight").returncode == 0
    out = tmp_path / "resumed"
    ckpts = tmp_path / "resumed.tmp.checkpoints"
    first = sft(out, "sft-step:4")
    assert first.returncode == -9 and (ckpts / "step-000002" / "complete").exists() and (ckpts / "best").exists()
    second = sft(out, "checkpoint-write:1")
    assert second.returncode == -9 and (ckpts / "step-000004.tmp").exists() and not out.exists()
    assert sft(out).returncode == 0
    assert _digest(out / "model.safetensors") == _digest(tmp_path / "straight" / "model.safetensors")
    resumed, straight = (json.loads((d / "spinlm_sft.json").read_text()) for d in (out, tmp_path / "straight"))
    strip = lambda h: [{k: v for k, v in row.items() if k not in ("elapsed_s", "tokens_per_s")} for row in h["history"]]
    assert strip(resumed) == strip(straight) and len(straight["history"]) == 3
    assert not ckpts.exists()


def test_torn_partial_line_is_cut_and_foreign_partial_ignored(tmp_path):
    from spinlm.io import RowLog

    path = tmp_path / "x.partial"
    with RowLog(path, "k1") as log:
        log.add([(0, {"a": 1}), (1, {"a": 2})])
    path.write_bytes(path.read_bytes() + b'{"i": 2, "row": {"a"')  # a kill in the middle of a write
    with RowLog(path, "k1") as log:
        assert log.done == {0: {"a": 1}, 1: {"a": 2}}
        log.add([(2, {"a": 3})])
    with RowLog(path, "k1") as log:
        assert sorted(log.done) == [0, 1, 2]
    with RowLog(path, "other inputs") as log:  # rows of other inputs are not resumed
        assert log.done == {}


def _run_limited(directory: Path, kib: int, command: str) -> dict:
    """Run `command` with `directory` on a disk that fills up: a `kib`-KiB tmpfs in a private
    mount namespace where the machine allows one (writes fail with ENOSPC), else a file-size
    limit of `kib` KiB (writes fail with EFBIG). stdout ends with rc=N and the directory's files."""
    directory.mkdir(parents=True, exist_ok=True)
    tail = f'{command}; echo "rc=$?"; find {directory} -mindepth 1 | sort'
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {directory}"],
                           capture_output=True)
    if probe.returncode == 0:
        argv = ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size={kib}k tmpfs {directory} && {{ {tail}; }}"]
    else:  # no user namespaces here: a file-size limit refuses the writes the same way
        argv = ["sh", "-c", f"trap '' XFSZ; ulimit -f {kib * 2}; {tail}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("SPINLM_FAULT", None)
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    return {"stdout": result.stdout, "stderr": result.stderr, "mode": "tmpfs" if probe.returncode == 0 else "ulimit"}


@pytest.mark.slow
def test_full_disk_during_writes_is_a_clear_error(tiny_model, task_data, tmp_path):
    """train (its checkpoint or model does not fit) and generate (its rows do not fit) on a full
    disk: exit 2, one message naming the output, no traceback, no output left looking complete."""
    from spinlm.cli import main

    gens, pairs = tmp_path / "gens.jsonl", tmp_path / "pairs.jsonl"
    common = ["--data.max_prompt_length=64", "--data.max_length=128", "--run.progress=false"]
    assert main(["generate", "--model", str(tiny_model), "--data", str(task_data["train"]), "--out", str(gens),
                 "--generation.max_new_tokens=8", *common]) == 0
    assert main(["score", "--model", str(tiny_model), "--generations", str(gens), "--out", str(pairs), *common]) == 0

    py = f"{sys.executable} -m spinlm"
    for kib, name, stage in (
            (96, "model", f"train --model {tiny_model} --pairs {pairs} --train.batch_size=8 "
                          "--train.checkpoint_every=2"),
            (8, "gens.jsonl", f"generate --model {tiny_model} --data {task_data['train']}")):
        disk = tmp_path / f"disk-{name}"
        out = _run_limited(disk, kib, f"{py} {stage} --out {disk}/{name} {' '.join(common)}")
        assert "rc=2" in out["stdout"], out
        err = out["stderr"]
        assert err.count("spinlm: error:") == 1 and "disk is full" in err and "Traceback" not in err, err
        assert f"{disk}/{name}" in err
        files = out["stdout"].split("rc=2", 1)[1].split()
        assert f"{disk}/{name}" not in files, files  # no output, so nothing that looks complete
