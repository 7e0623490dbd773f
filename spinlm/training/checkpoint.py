"""Training checkpoints a kill cannot corrupt: safetensors and JSON only, no pickle.

    DIR/step-000040/model.safetensors      trainable weights (fp32): all of them, or a LoRA adapter's only
                    optimizer.safetensors  optimizer state tensors and the RNG states
                    state.json             optimizer hyper-parameters, scheduler, data position, logs
                    complete               written last: a directory without it is ignored

    DIR/step-000040/sharded/               train.strategy fsdp: weights and optimizer state, one file
                                           per process (torch.distributed.checkpoint), instead of the
                                           two files above
                    rng-rank{r}.safetensors  each process's RNG states

    DIR/step-000040/deepspeed/             train.strategy zero3: DeepSpeed's own checkpoint
                                           (`engine.save_checkpoint`: each process writes its
                                           partition of the fp32 weights and optimizer state,
                                           `zero_pp_rank_{r}_mp_rank_00_optim_states.pt`), plus
                                           rng-rank{r}.safetensors, state.json and complete as above

A new checkpoint is written to `step-N.tmp`, fsynced, renamed, and only then are older
ones removed, so at every moment the newest complete checkpoint is intact. (accelerate's
`save_state` pickles the optimizer and RNG states; these files hold nothing executable.)
When some weights are frozen (peft.enabled), only the trainable ones are saved: the frozen
ones are reloaded from the model the stage starts from.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model

from spinlm.errors import UserError
from spinlm.io import fault_point

log = logging.getLogger("spinlm")


def _fsync_dir(path: Path) -> None:
    for f in sorted(path.rglob("*")):
        if f.is_file():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())


def _rng_tensors() -> dict[str, torch.Tensor]:
    out = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        out.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return out


def _set_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _split_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """optimizer.state_dict() -> (tensors, JSON-able rest)."""
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt.{index}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("opt."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for name, value in meta["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _trainable_only(model) -> dict[str, torch.Tensor] | None:
    """The trainable weights by name when some weights are frozen, else None (save them all)."""
    params = dict(model.named_parameters())
    if all(p.requires_grad for p in params.values()):
        return None
    return {name: p.detach().contiguous().cpu() for name, p in params.items() if p.requires_grad}


def _save_weights(model, path: Path) -> None:
    trainable = _trainable_only(model)
    if trainable is None:
        save_model(model, str(path))
    else:
        save_file(trainable, str(path), metadata={"spinlm.weights": "trainable"})


def _load_weights(model, path: Path) -> None:
    with safe_open(str(path), "pt") as f:
        partial = (f.metadata() or {}).get("spinlm.weights") == "trainable"
    expected = _trainable_only(model)
    if partial != (expected is not None):
        raise UserError(f"{path}: this checkpoint holds {'adapter' if partial else 'full'} weights but the model now "
                        f"trains {'an adapter' if expected is not None else 'every weight'} (peft.enabled changed?); "
                        f"delete {path.parent.parent} to start this iteration's training over")
    if not partial:
        load_model(model, str(path))
        return
    tensors = load_file(str(path))
    if set(tensors) != set(expected):
        raise UserError(f"{path}: the checkpoint's adapter weights do not match this adapter's (peft settings "
                        f"changed?); delete {path.parent.parent} to start this iteration's training over")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)


def step_dir(directory: Path, step: int) -> Path:
    """Where checkpoint `step` lives once complete."""
    return directory / f"step-{step:06d}"


def save(directory: Path, step: int, model, optimizer, scheduler, trainer_state: dict) -> Path:
    """Write checkpoint `step`; remove older ones once it is complete. Returns its path."""
    final = step_dir(directory, step)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _save_weights(model, tmp / "model.safetensors")
    opt_tensors, opt_meta = _split_optimizer(optimizer.state_dict())
    save_file({**opt_tensors, **_rng_tensors()}, str(tmp / "optimizer.safetensors"))
    fault_point("checkpoint-write")
    state = {"step": step, "optimizer": opt_meta, "scheduler": scheduler.state_dict(), "trainer": trainer_state}
    return _complete(tmp, final, state)


def _complete(tmp: Path, final: Path, state: dict) -> Path:
    """Write state.json, fsync, mark `tmp` complete, rename it to `final`, drop older checkpoints."""
    (tmp / "state.json").write_text(json.dumps(state), encoding="utf-8")
    _fsync_dir(tmp)
    (tmp / "complete").write_text("ok\n", encoding="utf-8")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in final.parent.glob("step-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest(directory: Path) -> Path | None:
    """The newest complete checkpoint in `directory`, or None."""
    done = sorted(p for p in directory.glob("step-*") if not p.name.endswith(".tmp") and (p / "complete").exists())
    return done[-1] if done else None


def _written_by(path: Path) -> str:
    """The train.strategy that wrote checkpoint `path`."""
    return "fsdp" if (path / "sharded").exists() else "zero3" if (path / "deepspeed").exists() else "ddp"


def _check_strategy(path: Path, now: str) -> None:
    then = _written_by(path)
    if then != now:
        raise UserError(f"{path}: this checkpoint was written under train.strategy {then} and the run now uses "
                        f"{now}; set train.strategy back to {then}, or delete {path.parent} to start this training "
                        "over")


def load(path: Path, model, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and RNG states; return the trainer state."""
    _check_strategy(path, "ddp")
    _load_weights(model, path / "model.safetensors")
    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    tensors = load_file(str(path / "optimizer.safetensors"))
    optimizer.load_state_dict(_join_optimizer(tensors, state["optimizer"]))
    scheduler.load_state_dict(state["scheduler"])
    _set_rng(tensors)
    log.info("resumed training from %s (optimizer step %d)", path, state["step"])
    return state["trainer"]


def save_sharded(directory: Path, step: int, model, optimizer, scheduler, trainer_state: dict, strategy) -> Path:
    """`save` for an FSDP2 model, on every process together: each writes its own shard of the
    weights and optimizer state (torch.distributed.checkpoint) and its RNG states; rank 0 writes
    the rest and completes the checkpoint. The whole model is never gathered on one rank."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    def write(tmp: Path) -> None:
        model_state, optimizer_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(tmp / "sharded"))

    return _save_together(directory, step, scheduler, trainer_state, strategy, write)


def _save_together(directory: Path, step: int, scheduler, trainer_state: dict, strategy, write) -> Path:
    """The skeleton of a checkpoint every process writes a part of: `write(tmp)` (each process its
    part) into `step-N.tmp`, then each process's RNG states; rank 0 completes it as `save` does."""
    final = step_dir(directory, step)
    tmp = final.with_name(final.name + ".tmp")
    if strategy.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    strategy.barrier()
    write(tmp)
    save_file(_rng_tensors(), str(tmp / f"rng-rank{strategy.rank}.safetensors"))
    fault_point("checkpoint-write")
    strategy.barrier()
    if strategy.is_main:
        _complete(tmp, final, {"step": step, "strategy": strategy.name, "world": strategy.world,
                               "scheduler": scheduler.state_dict(), "trainer": trainer_state})
    strategy.barrier()
    return final


def load_sharded(path: Path, model, optimizer, scheduler) -> dict:
    """`load` for a checkpoint written by save_sharded (on every process together)."""
    import torch.distributed as torch_dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    _check_strategy(path, "fsdp")
    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    model_state, optimizer_state = get_state_dict(model, optimizer)  # the shapes to read into
    loaded = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(loaded, checkpoint_id=str(path / "sharded"))
    set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng = path / f"rng-rank{torch_dist.get_rank()}.safetensors"
    if rng.exists():  # not when the run resumes with more processes than wrote the checkpoint
        _set_rng(load_file(str(rng)))
    log.info("resumed sharded training from %s (optimizer step %d, written by %d processes)", path, state["step"],
             state["world"])
    return state["trainer"]


def save_zero3(directory: Path, step: int, engine, scheduler, trainer_state: dict, strategy) -> Path:
    """`save` for a DeepSpeed ZeRO-3 engine, on every process together: DeepSpeed's own
    `save_checkpoint` (each process writes its partition of the fp32 weights and optimizer state;
    the whole model is never gathered on one rank) into `step-N.tmp`, then each process's RNG
    states; rank 0 completes the checkpoint (state.json, fsync, rename) as `save` does."""
    write = lambda tmp: engine.save_checkpoint(str(tmp), tag="deepspeed", save_latest=False)  # noqa: E731
    return _save_together(directory, step, scheduler, trainer_state, strategy, write)


def load_zero3(path: Path, engine, optimizer, scheduler) -> dict:
    """`load` for a checkpoint written by save_zero3 (on every process together; the same number
    of processes: DeepSpeed does not re-partition a ZeRO checkpoint)."""
    import torch.distributed as torch_dist

    _check_strategy(path, "zero3")
    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    world = torch_dist.get_world_size()
    if state["world"] != world:
        raise UserError(f"{path}: this zero3 checkpoint was written by {state['world']} processes and the run now "
                        f"has {world}; DeepSpeed resumes a ZeRO checkpoint with the same number of processes only: "
                        f"run with --nproc_per_node {state['world']}, or delete {path.parent} to start this "
                        "training over")
    loaded, _ = engine.load_checkpoint(str(path), tag="deepspeed", load_optimizer_states=True,
                                       load_lr_scheduler_states=False)
    if loaded is None:
        raise UserError(f"{path}: DeepSpeed could not load this checkpoint; delete {path.parent} to start this "
                        "training over")
    scheduler.load_state_dict(state["scheduler"])
    _set_rng(load_file(str(path / f"rng-rank{torch_dist.get_rank()}.safetensors")))
    log.info("resumed zero3 training from %s (optimizer step %d, written by %d processes)", path, state["step"],
             state["world"])
    return state["trainer"]
