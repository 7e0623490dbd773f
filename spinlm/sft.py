"""Stage: supervised fine-tuning on (prompt, real response) pairs, to a held-out plateau.

    spinlm sft --model BASE --data train.jsonl --eval-data val.jsonl --out SFT_DIR

Loss: mean next-token NLL over response tokens (EOS included). With `sft.patience`, the
held-out NLL of the real responses is checked every `sft.eval_every` steps and at each
epoch end; the best model is kept, and training stops after `patience` checks without
improvement: SPIN then starts where more SFT no longer helps, as in the paper.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from accelerate.utils import set_seed

from .config import Config
from .data import Example
from .io import write_json
from .lora import is_adapted, merged, restore, trainable_state
from .packing import Group, prepare, response_logps, score_groups
from .modeling import load_tokenizer, save
from .tokens import Limits, encode_example
from .training import linear_schedule, load_trainable, loader, make_accelerator, make_optimizer, optimizer_steps

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
        cfg: Config) -> dict:
    """Fine-tune on the real responses; save the best (or last) model to `out`."""
    sc = cfg.sft
    accelerator = make_accelerator(cfg.train.mixed_precision, 1)
    set_seed(cfg.run.seed)
    tokenizer = load_tokenizer(model_path, cfg.model)
    model = load_trainable(model_path, cfg.model, accelerator, cfg.train.gradient_checkpointing, cfg.peft)
    best_adapter: dict = {}  # with LoRA the best adapter is kept in memory and merged once, at the end
    lim = Limits.of(cfg)
    train_seqs, eval_seqs = encode_real(tokenizer, train_examples, lim), encode_real(tokenizer, eval_examples, lim)
    optimizer = make_optimizer("adamw", model, sc.learning_rate, sc.weight_decay)
    model, optimizer, batches = accelerator.prepare(model, optimizer, loader(train_seqs, sc.batch_size, cfg.run.seed))
    steps = optimizer_steps(len(batches), sc.epochs, 1, None)
    scheduler = accelerator.prepare(linear_schedule(optimizer, accelerator, steps, sc.warmup_ratio))
    pad = tokenizer.pad_token_id
    budget = prepare(model, train_seqs, pad, cfg.packing)
    best, stale, history, step, start = float("inf"), 0, [], 0, time.time()
    log.info("sft: %d examples, up to %d steps, lr %g", len(train_seqs), steps, sc.learning_rate)

    def check() -> bool:
        """Evaluate held-out NLL; keep the model if best; True when patience ran out."""
        nonlocal best, stale
        if not eval_seqs or (history and history[-1]["step"] == step):
            return sc.patience > 0 and stale >= sc.patience
        nll = heldout_nll(model, eval_seqs, pad, budget, cfg.eval.batch_size)
        history.append({"step": step, "heldout_nll": nll, "elapsed_s": round(time.time() - start, 2)})
        log.info("sft step %d/%d: held-out NLL per token %.4f", step, steps, nll)
        if nll < best - 1e-4:
            best, stale = nll, 0
            if is_adapted(accelerator.unwrap_model(model)):
                best_adapter.update(trainable_state(accelerator.unwrap_model(model)))
            else:
                save(accelerator.unwrap_model(model), tokenizer, out)
        else:
            stale += 1
        return sc.patience > 0 and stale >= sc.patience

    stop = False
    for _epoch in range(sc.epochs):
        for batch in batches:
            scores = [s for per_group in response_logps(model, batch, pad, budget) for s in per_group]
            loss = -torch.stack([s for s, _ in scores]).sum() / sum(n for _, n in scores)
            accelerator.backward(loss)
            if cfg.train.max_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            if step % cfg.run.log_every == 0:
                log.info("sft step %d/%d  loss %.4f", step, steps, loss.item())
            if sc.eval_every and step % sc.eval_every == 0 and (stop := check()):
                break
        if stop or check():
            break
    if not eval_seqs or best_adapter:
        restore(accelerator.unwrap_model(model), best_adapter)
        save(merged(accelerator.unwrap_model(model)), tokenizer, out)
    result = {"steps": step, "best_heldout_nll": None if best == float("inf") else best, "history": history}
    write_json(out / "spinlm_sft.json", result)
    return result
