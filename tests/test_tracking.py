"""run.report_to: real TensorBoard, W&B (offline), MLflow (file store) and trackio (local) runs of a
real `python -m spinlm run` subprocess, killed with SIGKILL in iteration 1 and resumed: the metrics
read back with each library's own reader have the expected names and one global step axis that
never goes back or repeats. The subprocess's stderr is not a terminal: no carriage returns in it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import SUBPROCESS_THREADS

TRAIN_TAGS = {"train/loss", "train/rewards/real", "train/rewards/generated", "train/rewards/margin",
              "train/rewards/accuracy", "train/dead_pairs", "train/logratio/real_per_token",
              "train/logratio/generated_per_token", "train/lr", "train/grad_norm", "train/tokens_per_s",
              "train/iteration"}
STAGE_TAGS = {"sft/loss", "sft/lr", "sft/tokens_per_s", "sft/check/heldout_nll", "eval/nll_per_token",
              "eval/accuracy", "eval/reward_accuracy", "eval/reward_margin", "val/nll_per_token",
              "generate/mean_tokens", "generate/hit_max_new_tokens_share", "generate/tokens_per_s",
              "generate_eval/mean_tokens"}


def _config(path: Path, tiny_model: Path, task_data: dict, run_dir: Path, report_to: list[str]) -> Path:
    cfg = {
        "run": {"dir": str(run_dir), "seed": 5, "log_every": 2, "report_to": report_to, "progress_every_s": 0},
        "model": {"name_or_path": str(tiny_model)},
        "data": {"train": str(task_data["train"]), "val": str(task_data["val"]), "eval": str(task_data["test"]),
                 "max_train_rows": 24, "max_eval_rows": 8, "max_prompt_length": 64, "max_length": 128},
        "generation": {"max_new_tokens": 10, "batch_size": 4},
        "spin": {"iterations": 2, "mix_window": 1, "beta": 0.1},
        "sft": {"enabled": True, "epochs": 1, "batch_size": 8, "learning_rate": 1e-3},
        "train": {"learning_rate": 1e-3, "epochs": 1, "batch_size": 4, "checkpoint_every": 2, "warmup_ratio": 0.2},
        "eval": {"checker": "spinlm.demo.task:check_example", "batch_size": 4},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(cfg: Path, env: dict, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": SUBPROCESS_THREADS, **env}
    env.pop("SPINLM_FAULT", None)
    if fault:
        env["SPINLM_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "spinlm", "run", str(cfg)], env=env, capture_output=True,
                          text=True, timeout=900)


def _tensorboard_scalars(logdir: Path) -> dict[str, list[int]]:
    """tag -> steps of every scalar event, as TensorBoard's own reader loads them (nothing purged)."""
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={event_accumulator.SCALARS: 0},
                                             purge_orphaned_data=False)
    acc.Reload()
    return {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _wandb_records(path: Path) -> dict:
    """The run id, config and per-key history steps in a .wandb file: wandb's records (protobuf, from
    wandb.proto) in the LevelDB log format it writes (32 KiB blocks of [crc32 | length | type] chunks)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, out = path.read_bytes(), {"run": None, "config": {}, "steps": {}}
    assert data[:4] == b":W&B", data[:7]
    pos, block, chunks = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length, kind) == (0, 0):  # block padding
            pos += left
            continue
        chunks, pos = chunks + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = pb.Record()
            record.ParseFromString(chunks)
            chunks, what = b"", record.WhichOneof("record_type")
            if what == "run":
                out["run"] = record.run.run_id
            elif what == "config":
                out["config"].update({u.key: json.loads(u.value_json) for u in record.config.update})
            elif what == "history":
                for item in record.history.item:  # "train/loss" comes as the nested key [train, loss]
                    out["steps"].setdefault(item.key or "/".join(item.nested_key), []).append(record.history.step.num)
    return out


def _increasing(steps: list[int]) -> bool:
    return all(a < b for a, b in zip(steps, steps[1:]))


@pytest.mark.slow
def test_trackers_across_kill_and_resume(tiny_model, task_data, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    cfg = _config(tmp_path / "cfg.yaml", tiny_model, task_data, run_dir, ["tensorboard", "wandb", "mlflow", "trackio"])
    (tmp_path / "wandb").mkdir()  # W&B before 0.2x writes to the temp folder when WANDB_DIR does not exist
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb"), "WANDB_SILENT": "true",
           "TRACKIO_DIR": str(tmp_path / "trackio"), "MLFLOW_TRACKING_URI": "", "WANDB_PROJECT": "spinlm-test"}
    # 3 SFT steps, then 6 per iteration; the 10th training step is step 4 of iteration 1: it is logged,
    # then the process is killed before its checkpoint, so the resumed run trains steps 3 and 4 again.
    killed = _run(cfg, env, "train-step:10")
    assert killed.returncode == -9, killed.stderr[-3000:]
    ids = json.loads((run_dir / "tracking.json").read_text())["ids"]
    resumed = _run(cfg, env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((run_dir / "tracking.json").read_text())["ids"] == ids  # the same tracker runs

    for result in (killed, resumed):  # stderr is a pipe: progress as lines, never carriage-return bars
        assert "\r" not in result.stderr
    assert "generate: 24/24 in " in killed.stderr and "score held-out: 8/8 in " in killed.stderr
    assert "ETA" in killed.stderr  # progress_every_s 0: a line per update, with done/total, rate and time left

    sft = json.loads((run_dir / "sft" / "model" / "spinlm_sft.json").read_text())["steps"]
    per_it = [json.loads((run_dir / f"iteration-{t}" / "model" / "spinlm_train.json").read_text())["steps"]
              for t in range(2)]
    assert sft == 3 and per_it == [6, 6]
    train_steps = [sft + 2, sft + 4, sft + 6, sft + 8, sft + 10, sft + 12]  # log_every 2, one axis
    model_steps = [sft, sft + 6, sft + 12]  # the SFT model, then each iteration's, where its training ended

    scalars = _tensorboard_scalars(run_dir / "tensorboard")
    assert TRAIN_TAGS | STAGE_TAGS <= set(scalars), sorted(TRAIN_TAGS | STAGE_TAGS - set(scalars))
    for tag, steps in scalars.items():
        assert _increasing(steps), (tag, steps)  # never back, never a step twice (the kill repeated 3 and 4)
    for tag in TRAIN_TAGS:
        assert scalars[tag] == train_steps, tag
    assert scalars["sft/loss"] == [2] and scalars["sft/check/heldout_nll"] == [3]
    assert scalars["eval/nll_per_token"] == model_steps == scalars["val/nll_per_token"]
    assert scalars["generate/mean_tokens"] == [sft, sft + 6]

    # W&B offline: one directory per process, both of the same run id, with the resolved config
    # (offline, wandb keeps everything in the run's .wandb record log; it writes in the background, so
    # a kill -9 loses what it had not written yet: those points are gone, never logged twice)
    runs = sorted((tmp_path / "wandb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(ids["wandb"]) for r in runs), runs
    before, after = (_wandb_records(r / f"run-{ids['wandb']}.wandb") for r in runs)
    # the resumed run exits cleanly, so its log is complete; the killed one may have lost even its config
    # record (written in the background: seen once under load), so it is checked where it got written
    for got in (before, after) if before["config"] else (after,):
        assert got["config"]["train.learning_rate"] == 1e-3 and got["config"]["spin.iterations"] == 2
    assert after["run"] == ids["wandb"] and before["run"] in (ids["wandb"], None)
    # what the killed process had not flushed is lost (all of it, once under load); never a step twice
    loss_steps = before["steps"].get("train/loss", []) + after["steps"]["train/loss"]
    assert _increasing(loss_steps) and set(loss_steps) <= set(train_steps) and sft + 12 in loss_steps
    assert after["steps"]["eval/accuracy"][-1] == sft + 12

    # MLflow file store in RUN/mlruns: the metrics of one run, read back with its client
    import mlflow

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for it to read a file store
    client = mlflow.tracking.MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    history = lambda key: [m.step for m in sorted(client.get_metric_history(ids["mlflow"], key),
                                                  key=lambda m: (m.timestamp, m.step))]
    assert history("train/loss") == train_steps and history("eval/accuracy") == model_steps
    assert client.get_run(ids["mlflow"]).data.params["spin.beta"] == "0.1"

    # trackio (local SQLite under TRACKIO_DIR), read back with trackio's storage in a fresh process
    # (TRACKIO_DIR is read at import)
    read = subprocess.run([sys.executable, "-c", "import json, sys; from trackio.sqlite_storage import SQLiteStorage "
                           "as S; print(json.dumps({'runs': S.get_runs('spinlm'), 'logs': S.get_logs('spinlm', "
                           f"{ids['trackio']!r}), 'config': S.get_run_config('spinlm', {ids['trackio']!r})}}))"],
                          env={**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio")}, capture_output=True, text=True,
                          timeout=120)
    assert read.returncode == 0, read.stderr
    got = json.loads(read.stdout.strip().splitlines()[-1])
    assert got["runs"] == [ids["trackio"]] and got["config"]["train.learning_rate"] == 1e-3
    loss_steps = [row["step"] for row in got["logs"] if "train/loss" in row]
    # trackio writes from a background thread every 0.5 s: a point the kill caught unwritten is lost, never
    # repeated; the killed process's earlier points and the resumed one's are in the same run
    assert _increasing(loss_steps) and set(loss_steps) <= set(train_steps), loss_steps
    # (under load the kill has caught the killed process's step-7 point unwritten too: seen 2026-12-07 with
    # the machine at load 5; so, as for W&B, only the resumed run's points are certain to be there)
    assert sft + 12 in loss_steps, loss_steps


def test_unknown_or_missing_tracker_is_a_user_error(tiny_model, task_data, tmp_path):
    from spinlm.config import build, trackers, validate
    from spinlm.errors import UserError

    required = ["--model.name_or_path=m", "--data.train=t"]
    assert trackers(build(overrides=[*required, "--run.report_to=tensorboard"]).run) == ["tensorboard"]
    assert trackers(build(overrides=[*required, "--run.report_to=none"]).run) == []
    assert trackers(build(overrides=[*required, "--run.report_to=[wandb,mlflow,wandb]"]).run) == ["wandb", "mlflow"]
    with pytest.raises(UserError, match="run.report_to: unknown tracker 'tensorbord'; did you mean 'tensorboard'"):
        validate(build(overrides=[*required, "--run.report_to=[tensorbord]"]))
    # a package that cannot be imported (sys.modules[name] = None makes every import of it fail)
    cfg = _config(tmp_path / "cfg.yaml", tiny_model, task_data, tmp_path / "run", ["tensorboard", "mlflow"])
    script = ("import sys; sys.modules['mlflow'] = None; from spinlm.cli import main; "
              f"sys.exit(main([sys.argv[1], {str(cfg)!r}]))")
    for command in ("validate", "run"):
        result = subprocess.run([sys.executable, "-c", script, command], capture_output=True, text=True,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
        assert result.returncode == 2, result.stderr
        assert ("spinlm: error: run.report_to: mlflow needs the mlflow package, which is not installed: "
                "pip install 'spinlm[mlflow]'") in result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()  # refused before the run directory was made


def test_trackers_need_accelerate_1_9():
    """accelerate's trackers have start() from 1.8 and TrackioTracker from 1.9 (spinlm's core runs on 1.0); W&B
    offline runs started twice per process up to 1.12; TrackioTracker dropped the step up to 1.13."""
    from spinlm.tracking import accelerate_too_old

    assert accelerate_too_old("1.9.0", ["tensorboard", "mlflow"]) is None
    assert accelerate_too_old("1.16.0", ["wandb", "trackio"]) is None
    assert accelerate_too_old("2.0.0.dev0", ["trackio"]) is None and accelerate_too_old("1.13.0", ["wandb"]) is None
    for old in ("1.0.0", "1.8.1", "0.34.2"):
        problem = accelerate_too_old(old, ["tensorboard", "mlflow"])
        assert problem.startswith(f"run.report_to tensorboard, mlflow needs accelerate>=1.9 (its trackers), "
                                  f"found {old}:"), problem
    assert accelerate_too_old("1.12.0", ["tensorboard", "wandb"]).startswith(
        "run.report_to wandb needs accelerate>=1.13 (its trackers), found 1.12.0:")
    assert accelerate_too_old("1.13.0", ["wandb", "trackio"]).startswith(
        "run.report_to trackio needs accelerate>=1.14 (its trackers), found 1.13.0:")
