"""Stage: supervised fine-tuning on (prompt, real response) pairs, to a held-out plateau.

    spinlm sft --model BASE --data train.jsonl --eval-data val.jsonl --out SFT_DIR

Loss: mean next-token NLL over response tokens (EOS included). With `sft.patience`, the
held-out NLL of the real responses is checked every `sft.eval_every` steps and at each
epoch end; the best model is kept, and training stops after `patience` checks without
improvement: SPIN then starts where more SFT no longer helps, as in the paper.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file, save_file

from .config import Config
from .data import Example
from . import checkpoint
from .io import fault_point, write_json
from .lora import is_adapted, restore, trainable_state
from .packing import Group, prepare, response_logps, score_groups
from .modeling import load_tokenizer
from .tokens import Limits, encode_example
from .tracking import Log
from .strategy import make_strategy
from .training import epoch_steps, linear_schedule, load_trainable, make_optimizer, step_forwards

log = logging.getLogger("spinlm")


def encode_real(tokenizer, examples: list[Example], lim: Limits) -> list[Group]:
    """(prompt, [real]) token-id groups."""
    out = []
    for ex in examples:
        prompt, (real,) = encode_example(tokenizer, ex.prompt, [(ex.real, True)], lim)
        out.append((prompt, [real]))
    return out


@torch.no_grad()
def heldout_nll(model, groups: list[Group], pad_id: int, budget: int | None, batch_size: int) -> float:
    """Per-token NLL of the real responses: sum of -log p over all tokens / token count."""
    was_training = model.training
    model.eval()
    scores = [s for per_group in score_groups(model, groups, pad_id, budget, batch_size) for s in per_group]
    model.train(was_training)
    return -sum(s for s, _ in scores) / max(sum(n for _, n in scores), 1)


def sft(model_path: str, train_examples: list[Example], eval_examples: list[Example], out: Path,
        cfg: Config, max_steps: int | None = None, track: Log | None = None) -> dict:
    """Fine-tune on the real responses; save the best (or last) model to `out`. Checkpoints
    (every train.checkpoint_every steps) and the best model so far live in `out`.checkpoints,
    so a killed SFT resumes where it stopped. `track(stream, step, values)` gets the logged loss
    ("sft") and each held-out check ("sft/check")."""
    sc = cfg.sft
    strategy = make_strategy(cfg.train)
    set_seed(cfg.run.seed, deterministic=cfg.run.deterministic)
    tokenizer = load_tokenizer(model_path, cfg.model)
    model = load_trainable(model_path, cfg.model, strategy.load_device, cfg.train.gradient_checkpointing, cfg.peft)
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

    ckpt_dir, best_dir = out.with_name(out.name + ".checkpoints"), out.with_name(out.name + ".checkpoints") / "best"
    model, optimizer, scheduler, state = strategy.setup(model, build, checkpoint.latest(ckpt_dir))
    state = state or {"step": 0, "best": None, "stale": 0, "history": [], "examples": 0}
    budget = prepare(strategy.unwrap(model), train_seqs, pad, cfg.packing)
    log.info("sft: %d examples, up to %d steps, lr %g", len(train_seqs), steps, sc.learning_rate)
    start, plans = time.time(), {}

    def check() -> bool:
        """Evaluate held-out NLL; keep the model if best; True when patience ran out."""
        if eval_seqs and not (state["history"] and state["history"][-1]["step"] == state["step"]):
            nll = heldout_nll(model, eval_seqs, pad, budget, cfg.eval.batch_size)
            state["history"].append({"step": state["step"], "heldout_nll": nll,
                                     "elapsed_s": round(time.time() - start, 2)})
            log.info("sft step %d/%d: held-out NLL per token %.4f", state["step"], steps, nll)
            if track:
                track("sft/check", state["step"], {"heldout_nll": nll})
            if state["best"] is None or nll < state["best"] - 1e-4:
                state["best"], state["stale"] = nll, 0
                _keep_best(strategy, model, tokenizer, best_dir)
            else:
                state["stale"] += 1
        return sc.patience > 0 and state["stale"] >= sc.patience

    stopped, window = False, {"tokens": 0, "since": time.time()}
    while state["step"] < steps and not stopped:
        epoch, k = divmod(state["step"], per_epoch)
        micro, n_examples = plans.setdefault(epoch, plan(epoch))[k]
        loss = _sft_step(strategy, model, [[train_seqs[i] for i in ids] for ids in micro], pad, budget,
                         cfg.packing.backward_per_row)
        state["examples"] = state.get("examples", 0) + n_examples
        window["tokens"] += world * sum(len(train_seqs[i][0]) + len(train_seqs[i][1][0]) for ids in micro for i in ids)
        if cfg.train.max_grad_norm > 0:
            strategy.clip_grad_norm(model, cfg.train.max_grad_norm)
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
        if (sc.eval_every and state["step"] % sc.eval_every == 0) or k == per_epoch - 1:
            stopped = check()
        fault_point("sft-step")
        if cfg.train.checkpoint_every and state["step"] % cfg.train.checkpoint_every == 0 and not stopped \
                and state["step"] < steps:
            strategy.save_checkpoint(ckpt_dir, state["step"], model, optimizer, scheduler, state)
    result = {"steps": state["step"], "examples": state.get("examples"), "best_heldout_nll": state["best"],
              "history": state["history"]}
    best = best_dir if best_dir.exists() else best_dir.with_name("best.tmp")  # a kill between two renames
    plain = strategy.unwrap(model)
    if eval_seqs and is_adapted(plain):  # the best adapter, merged into the weights (ddp: every process has it)
        restore(plain, load_file(str(best / "adapter.safetensors")))
    if eval_seqs and not is_adapted(plain):
        if strategy.is_main:
            shutil.copytree(best, out)
    else:
        strategy.save_model(model, tokenizer, out)
    if strategy.is_main:
        write_json(out / "spinlm_sft.json", result)
    strategy.barrier()
    return result


def _sft_step(strategy, model, micro: list[list[Group]], pad: int, budget: int | None,
              per_row: bool = True) -> torch.Tensor:
    """Forward and backward of one optimizer step's micro-batches, one packed row at a time with
    `per_row` (packing.backward_per_row: one row's activations held, as in SPIN training), else a
    micro-batch at a time. The loss is the mean NLL over all response tokens of the step (this
    process's), whatever the accumulation; DDP syncs once, after the last forward (fsdp after each:
    spinlm.strategy; fsdp and zero3 run as many forwards on every process, the extra ones weighted
    0). Returns the step's loss (detached)."""
    total_tokens = sum(len(r) for batch in micro for _, responses in batch for r in responses)
    loss = torch.zeros(())
    for part, weight, last in step_forwards(strategy, micro, lambda batch: batch, budget, per_row):
        with strategy.sync(model, last=last):
            nll = -torch.stack([s for group in response_logps(model, part, pad, budget) for s, _ in group]).sum()
            strategy.backward(nll * (weight / total_tokens))
        if weight:
            loss += nll.detach().cpu() / total_tokens
    return loss


def _keep_best(strategy, model, tokenizer, best_dir: Path) -> None:
    """Save the best model so far (with LoRA: its adapter weights only) to best.tmp, then swap it
    in: a kill leaves one complete copy. Every process takes part; rank 0 writes."""
    tmp = best_dir.with_name("best.tmp")
    if strategy.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    plain = strategy.unwrap(model)
    if is_adapted(plain):
        if strategy.is_main:
            tmp.mkdir(parents=True)
            save_file({k: v.contiguous() for k, v in trainable_state(plain).items()}, str(tmp / "adapter.safetensors"))
    else:
        strategy.save_model(model, tokenizer, tmp)
    if strategy.is_main:
        shutil.rmtree(best_dir, ignore_errors=True)
        os.replace(tmp, best_dir)
