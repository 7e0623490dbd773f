"""What every training loop (SFT, SPIN, DPO, continued SFT) does the same way around its steps:
stop on a non-finite value, stop on a preemption signal with a checkpoint of the step just done,
and keep the best weights seen by the held-out checks.

All are written for a run that can be killed at any moment: a stopped stage is never marked
done, and the best weights are swapped into place with one rename.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from spinlm import preempt
from spinlm.errors import Preempted, TrainingStopped
from spinlm.training import checkpoint

BEST_WEIGHTS = Path("best") / "model.safetensors"  # under the stage's checkpoint directory


def stop_if_not_finite(value: torch.Tensor, what: str, step: int, where: str, ckpt_dir: Path, remedy: str) -> None:
    """Stop the stage on a non-finite loss or gradient norm, pointing at the checkpoint a re-run
    resumes from. `where`: "iteration 3" or "sft"; `remedy`: the settings that would help."""
    if bool(torch.isfinite(value)):
        return
    last = checkpoint.latest(ckpt_dir)
    unit = "iteration" if where.startswith("iteration") else "stage"
    kept = (f"the last good checkpoint, {last}, is kept and a re-run resumes from it" if last else
            f"no checkpoint was written yet, so a re-run starts this {unit} over")
    raise TrainingStopped(
        f"{where}, optimizer step {step}: the {what} is {float(value)} (not finite); training stopped and this "
        f"{unit} is not marked done; {kept}. {remedy}, then re-run with --force")


def stop_if_preempted(save: Callable[[], None], ckpt_dir: Path, step: int, steps: int, where: str) -> None:
    """Called by every process after each optimizer step: when any process got a preemption signal
    (spinlm.preempt.agreed, so all stop at this same step), `save()` checkpoints this step (every
    process takes part) and Preempted is raised. A re-run resumes after this step: none is redone."""
    name = preempt.agreed()
    if not name:
        return
    save()
    raise Preempted(f"{name}: {where} stopped after optimizer step {step} of {steps}; checkpoint "
                    f"{checkpoint.step_dir(ckpt_dir, step)} written: a re-run resumes from it, no step redone")


def keep_best(strategy, model, ckpt_dir: Path) -> None:
    """Save the current weights (LoRA: the adapted model's) as the best so far, under
    `ckpt_dir`/best: written to a temporary file, then renamed over the last one, so a kill
    leaves one complete copy. Every process takes part (sharded models gather); rank 0 writes."""
    keep = ckpt_dir / BEST_WEIGHTS.parent
    if strategy.is_main:
        keep.mkdir(parents=True, exist_ok=True)
    strategy.save_weights(model, keep / "model.tmp")
    if strategy.is_main:
        os.replace(keep / "model.tmp", keep / BEST_WEIGHTS.name)
    strategy.barrier()


def best_weights(ckpt_dir: Path) -> Path | None:
    """The weights keep_best saved last, if any: what the stage saves as its model."""
    path = ckpt_dir / BEST_WEIGHTS
    return path if path.exists() else None
