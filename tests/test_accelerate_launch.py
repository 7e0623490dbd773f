"""configs/accelerate/: the launch files a user passes to `accelerate launch`, run for real.

On this CPU machine `accelerate launch --config_file F --num_processes 2` starts the processes with
torch.distributed.run, as on GPUs (distributed_type MULTI_GPU and FSDP both go through accelerate's
multi-GPU launcher); spinlm's strategies then join one gloo group. Each launch here trains the
tiny model with 4 pairs per process per step and is compared with one process taking 8; the
FSDP2 launch is killed once and resumed from its sharded checkpoint on the way. All runs use
gradient checkpointing, as configs/zephyr-7b-ultrachat.yaml trains (sharded + checkpointing).
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from spinlm.errors import UserError
from spinlm.training.strategy import check_launch

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
COMMON = ["--data.max_prompt_length=64", "--data.max_length=128", "--run.progress=false"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(config: str | None, args: list[str], fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("SPINLM_FAULT", None)
    if fault:
        env["SPINLM_FAULT"] = fault
    for var in [v for v in env if v.startswith(("ACCELERATE_", "FSDP_"))]:
        env.pop(var)
    if config is None:
        launcher = [sys.executable, "-m", "spinlm"]
    else:
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config),
                    "--num_processes", "2", "--main_process_port", str(_port()), "-m", "spinlm"]
    return subprocess.run(launcher + args, env=env, capture_output=True, text=True, timeout=600)


def _max_diff(a: Path, b: Path) -> float:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert sorted(wa) == sorted(wb)
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def test_launch_files_are_accelerate_configs():
    """Every file loads with accelerate's own config loader, names a launch spinlm runs, and its
    usage line passes the train.strategy that its distributed_type needs."""
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    files = sorted(CONFIGS.glob("*.yaml"))
    assert {f.name for f in files} >= {"ddp.yaml", "fsdp2.yaml", "ddp-multinode.yaml", "fsdp2-multinode.yaml",
                                       "zero3.yaml"}
    for f in files:
        cfg = load_config_from_file(str(f))
        assert isinstance(cfg, ClusterConfig), f
        kind = str(cfg.distributed_type).rsplit(".", 1)[-1]
        usage = next(line for line in f.read_text().splitlines() if "accelerate launch" in line)
        assert f"configs/accelerate/{f.name}" in usage, f
        raw = yaml.safe_load(f.read_text())
        if kind == "FSDP":
            assert raw["fsdp_config"]["fsdp_version"] == 2, f
            assert "--train.strategy=fsdp" in f.read_text(), f
        elif f.name.startswith("zero3"):
            assert kind == "MULTI_GPU" and "--train.strategy=zero3" in usage, f
        else:
            assert kind == "MULTI_GPU" and "--train.strategy" not in usage, f
        assert cfg.num_processes == 8 * cfg.num_machines and cfg.mixed_precision == "no", f


@pytest.mark.parametrize("env, strategy, offload, message", [
    ({"ACCELERATE_USE_FSDP": "true"}, "ddp", False, "but train.strategy is ddp"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "fsdp", False, "fsdp_version 1"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_OFFLOAD_PARAMS": "true"}, "fsdp", False, "fsdp_offload_params true"),
    ({"ACCELERATE_USE_FSDP": "true"}, "fsdp", True, "fsdp_offload_params false"),
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, "zero3", False, "spinlm drives DeepSpeed itself"),
])
def test_launch_that_disagrees_with_the_config_is_refused(env, strategy, offload, message):
    from spinlm.config import build

    cfg = build(overrides=[f"--train.strategy={strategy}", f"--train.fsdp_cpu_offload={str(offload).lower()}"])
    with pytest.raises(UserError, match=message):
        check_launch(cfg.train, env)
    check_launch(cfg.train, {})  # a plain torchrun launch sets none of these
    agreeing = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_OFFLOAD_PARAMS": "false"}
    check_launch(build(overrides=["--train.strategy=fsdp"]).train, agreeing)


@pytest.mark.slow
def test_accelerate_launch_ddp_and_fsdp2_match_one_process(tiny_model, pairs, tmp_path):
    args = ["train", "--model", str(tiny_model), "--pairs", str(pairs), "--train.learning_rate=1e-3",
            "--train.epochs=1", "--train.checkpoint_every=2", "--train.gradient_checkpointing=true", *COMMON]
    single = _launch(None, [*args, "--out", str(tmp_path / "one"), "--train.batch_size=8"])
    assert single.returncode == 0, single.stderr[-3000:]
    assert _max_diff(tiny_model, tmp_path / "one") > 1e-3, "training moved the weights"
    launches = [("ddp.yaml", "ddp"), ("fsdp2.yaml", "fsdp")]
    if importlib.util.find_spec("deepspeed") is not None:  # make test installs it
        launches.append(("zero3.yaml", "zero3"))
    for config, strategy in launches:
        launch = [*args, "--out", str(tmp_path / strategy), "--train.batch_size=4", f"--train.strategy={strategy}"]
        if strategy == "fsdp":  # killed after step 3: its step-2 checkpoint is sharded, one file per process
            killed = _launch(config, launch, fault="train-step:3")
            step2 = tmp_path / "fsdp.tmp.checkpoints" / "step-000002"
            assert killed.returncode != 0 and (step2 / "complete").exists(), killed.stderr[-3000:]
            assert sorted(p.name for p in (step2 / "sharded").iterdir()) == [".metadata", "__0_0.distcp",
                                                                              "__1_0.distcp"]
        done = _launch(config, launch)  # fsdp: resumed from that checkpoint
        assert done.returncode == 0, done.stderr[-3000:]
        diff = _max_diff(tmp_path / "one", tmp_path / strategy)
        print(f"measured accelerate launch {config} x2 vs 1 process: max |diff| {diff:.3g}")
        assert diff < 1e-5, (config, diff)
    # the same launch with a config that does not ask for fsdp stops every process with the reason
    wrong = _launch("fsdp2.yaml", [*args, "--out", str(tmp_path / "wrong"), "--train.batch_size=4"])
    assert wrong.returncode != 0 and "but train.strategy is ddp" in wrong.stderr
    assert not (tmp_path / "wrong" / "model.safetensors").exists()
