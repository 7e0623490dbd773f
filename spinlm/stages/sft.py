"""Stage: supervised fine-tuning on (prompt, real response) pairs, to a held-out plateau.

    spinlm sft --model BASE --data train.jsonl --eval-data val.jsonl --out SFT_DIR

Loss: mean next-token NLL over response tokens (EOS included). With `sft.patience`, the
held-out NLL of the real responses is checked every `sft.eval_every` steps and at each
epoch end; the best model is kept, and training stops after `patience` checks without
improvement: SPIN then starts where more SFT no longer helps, as in the paper.

The continued-SFT baseline (spinlm.loop.sft_for_steps) instead passes `check_at`: the steps where
SPIN's iterations checked, and the metric SPIN's checks and RUN/best use
(spinlm.metrics.heldout_metric), so it is selected on validation exactly as SPIN is.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
from accelerate.utils import set_seed

from spinlm.config import Config
from spinlm.data import Example
from spinlm.io import fault_point, write_json
from spinlm.metrics import heldout_metric, heldout_nll
from spinlm.modeling import load_tokenizer
from spinlm.packing import Group, Layout, prepare, response_logps
from spinlm.tokens import Limits, encode_real
from spinlm.tracking import Log
from spinlm.training import checkpoint
from spinlm.training.guards import best_weights, keep_best, stop_if_not_finite, stop_if_preempted
from spinlm.training.steps import epoch_steps, linear_schedule, make_optimizer, step_forwards
from spinlm.training.strategy import make_strategy

log = logging.getLogger("spinlm")


def sft(model_path: str, train_examples: list[Example], eval_examples: list[Example], out: Path,
        cfg: Config, max_steps: int | None = None, track: Log | None = None,
        check_at: list[int] | None = None) -> dict:
    """Fine-tune on the real responses; save the best (or last) model to `out`. Checkpoints
    (every train.checkpoint_every steps) and the best model so far live in `out`.checkpoints,
    so a killed SFT resumes where it stopped. `track(stream, step, values)` gets the logged loss
    ("sft") and each held-out check ("sft/check"). With `check_at` (optimizer steps), the checks
    on `eval_examples` are at those steps only and measure SPIN's selection metric
    (spinlm.metrics.heldout_metric: task accuracy with eval.checker, else NLL per token), a strict
    improvement keeping the weights, as SPIN training's checks do; no check, the last weights."""
    sc = cfg.sft
    strategy = make_strategy(cfg.train)
    set_seed(cfg.run.seed, deterministic=cfg.run.deterministic)
    tokenizer = load_tokenizer(model_path, cfg.model)
    model = strategy.load(model_path, cfg.model, cfg.train.gradient_checkpointing, cfg.peft)
    lim = Limits.of(cfg)
    train_seqs, eval_seqs = encode_real(tokenizer, train_examples, lim), encode_real(tokenizer, eval_examples, lim)
    world, rank, pad = strategy.world, strategy.rank, tokenizer.pad_token_id
    accumulation = sc.gradient_accumulation_steps
    plan = lambda epoch: epoch_steps(len(train_seqs), sc.batch_size, accumulation, world, rank, cfg.run.seed, epoch)
    per_epoch = len(plan(0))
    steps = min(per_epoch * sc.epochs, max_steps or per_epoch * sc.epochs)

    def build(wrapped):
        optimizer = make_optimizer("adamw", wrapped, sc.learning_rate, sc.weight_decay)
        return optimizer, linear_schedule(optimizer, steps, sc.warmup_ratio, strategy.schedule_factor)

    ckpt_dir = out.with_name(out.name + ".checkpoints")
    model, optimizer, scheduler, state = strategy.setup(model, build, checkpoint.latest(ckpt_dir))
    state = state or {"step": 0, "best": None, "stale": 0, "history": [], "examples": 0}
    layout = prepare(strategy.unwrap(model), train_seqs, pad, cfg.packing)
    log.info("sft: %d examples, up to %d steps, lr %g", len(train_seqs), steps, sc.learning_rate)
    start, plans = time.time(), {}

    checking = bool(eval_seqs) and (check_at is None or bool(check_at))
    due = set(check_at or ())

    def check_due(step: int, epoch_end: bool) -> bool:
        if check_at is not None:
            return step in due
        return bool(sc.eval_every and step % sc.eval_every == 0) or epoch_end

    def measure() -> tuple[str, float]:
        if check_at is None:
            return "heldout_nll", heldout_nll(model, eval_seqs, pad, layout, cfg.eval.batch_size)
        return heldout_metric(strategy.unwrap(model), tokenizer, eval_examples, cfg, sharded=strategy.sharded)

    def check() -> bool:
        """Evaluate on the held-out (validation) data; keep the model if best; True when patience ran out."""
        if checking and not (state["history"] and state["history"][-1]["step"] == state["step"]):
            name, value = measure()
            elapsed = round(time.time() - start, 2)
            if check_at is None:
                state["history"].append({"step": state["step"], name: value, "elapsed_s": elapsed})
                log.info("sft step %d/%d: held-out NLL per token %.4f", state["step"], steps, value)
            else:
                state["history"].append({"step": state["step"], "metric": name, "value": value, "elapsed_s": elapsed})
                log.info("sft step %d/%d: validation %s %.4f", state["step"], steps, name, value)
            if track:
                track("sft/check", state["step"], {name: value})
            if _better(name, value, state["best"], strict=check_at is not None):
                state["best"], state["stale"] = value, 0
                keep_best(strategy, model, ckpt_dir)
            else:
                state["stale"] += 1
        return sc.patience > 0 and state["stale"] >= sc.patience

    window = {"tokens": 0, "since": time.time()}
    save = lambda: strategy.save_checkpoint(ckpt_dir, state["step"], model, optimizer, scheduler, state)  # noqa: E731
    while state["step"] < steps and not state.get("stopped"):  # stopped: patience ran out (kept in checkpoints)
        epoch, k = divmod(state["step"], per_epoch)
        micro, n_examples = plans.setdefault(epoch, plan(epoch))[k]
        loss = _sft_step(strategy, model, [[train_seqs[i] for i in ids] for ids in micro], pad, layout,
                         cfg.packing.backward_per_row)
        state["examples"] = state.get("examples", 0) + n_examples
        window["tokens"] += world * sum(len(train_seqs[i][0]) + len(train_seqs[i][1][0]) for ids in micro for i in ids)
        _guard_and_clip(strategy, model, loss, state["step"] + 1, ckpt_dir, cfg.train.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        state["step"] += 1
        if state["step"] % cfg.run.log_every == 0:
            log.info("sft step %d/%d  loss %.4f", state["step"], steps, loss.item())
            if track:
                track("sft", state["step"], {"loss": loss.item(), "lr": scheduler.get_last_lr()[0], "tokens_per_s":
                                             window["tokens"] / max(time.time() - window["since"], 1e-9)})
            window.update(tokens=0, since=time.time())
        if check_due(state["step"], k == per_epoch - 1):
            state["stopped"] = check()
        fault_point("sft-step")
        stop_if_preempted(save, ckpt_dir, state["step"], steps, "sft")
        if cfg.train.checkpoint_every and state["step"] % cfg.train.checkpoint_every == 0 \
                and not state.get("stopped") and state["step"] < steps:
            save()
    result = {"steps": state["step"], "examples": state.get("examples"), "history": state["history"]}
    if check_at is None:
        result["best_heldout_nll"] = state["best"]
    else:  # as SPIN training's spinlm_train.json: the checks and the one whose weights are saved
        checks = [{"step": h["step"], "metric": h["metric"], "value": h["value"]} for h in state["history"]]
        result.update(check_at=sorted(due), checks=checks,
                      best_check=next((c for c in checks if c["value"] == state["best"]), None))
    strategy.save_model(model, tokenizer, out, weights=best_weights(ckpt_dir) if checking else None)
    if strategy.is_main:
        write_json(out / "spinlm_sft.json", result)
    strategy.barrier()
    return result


def _better(metric: str, value: float, best: float | None, strict: bool) -> bool:
    """Whether a check beats the best so far: task accuracy higher, an NLL lower; by any margin with
    `strict` (SPIN training's rule, ties to the earlier check), else by more than 1e-4 (SFT's)."""
    if best is None:
        return True
    gain = value - best if metric == "accuracy" else best - value
    return gain > (0 if strict else 1e-4)


def _guard_and_clip(strategy, model, loss: torch.Tensor, step: int, ckpt_dir: Path, max_grad_norm: float) -> None:
    """Stop on a non-finite loss (summed over the processes, so every one stops) or gradient norm,
    as SPIN training does; clip the gradients to `max_grad_norm` (0: no clipping)."""
    remedy = "Lower sft.learning_rate, or set train.max_grad_norm"
    total = strategy.sum(loss.reshape(1)) if strategy.world > 1 else loss
    stop_if_not_finite(total, "loss", step, "sft", ckpt_dir, remedy)
    norm = strategy.clip_grad_norm(model, max_grad_norm if max_grad_norm > 0 else math.inf)
    stop_if_not_finite(norm, "gradient norm", step, "sft", ckpt_dir, remedy)


def _sft_step(strategy, model, micro: list[list[Group]], pad: int, layout: Layout | None,
              per_row: bool = True) -> torch.Tensor:
    """Forward and backward of one optimizer step's micro-batches, one packed row at a time with
    `per_row` (packing.backward_per_row: one row's activations held, as in SPIN training), else a
    micro-batch at a time. The loss is the mean NLL over all response tokens of the step (this
    process's), whatever the accumulation; DDP syncs once, after the last forward (fsdp after each:
    spinlm.training.strategy; fsdp and zero3 run as many forwards on every process, the extra ones weighted
    0). Returns the step's loss (detached)."""
    total_tokens = sum(len(r) for batch in micro for _, responses in batch for r in responses)
    loss = torch.zeros(())
    for part, weight, last in step_forwards(strategy, micro, lambda batch: batch, layout, per_row):
        with strategy.sync(model, last=last):
            nll = -torch.stack([s for group in response_logps(model, part, pad, layout) for s, _ in group]).sum()
            strategy.backward(nll * (weight / total_tokens))
        if weight:
            loss += nll.detach().cpu() / total_tokens
    return loss
