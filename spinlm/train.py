"""Stage: train the next iterate p_{t+1} on scored pairs; no reference model is loaded.

    spinlm train --model MODEL --pairs pairs.jsonl --out MODEL_DIR [--spin.beta=0.1]

The loop below is the whole algorithm: one forward over the real and generated responses
of a micro-batch, the SPIN loss against the stored reference log-probs, backward,
clip, step. Metrics are the usual DPO ones (rewards, margin, accuracy, policy log-probs).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from accelerate.utils import set_seed

from .config import Config
from .io import read_jsonl, write_json
from .packing import prepare, response_logps
from .loss import spin_loss, spin_rewards
from .modeling import load_tokenizer
from .score import encode_pair, limits
from .training import linear_schedule, load_trainable, loader, make_accelerator, make_optimizer, optimizer_steps

log = logging.getLogger("spinlm")
METRICS = ("loss", "rewards/real", "rewards/generated", "rewards/margin", "rewards/accuracy",
           "logps/real", "logps/generated", "dead_pairs")


def pair_items(tokenizer, rows: list[dict], cfg: Config) -> list[dict]:
    items = []
    for row in rows:
        prompt, real, generated = encode_pair(tokenizer, row, limits(cfg))
        items.append({"prompt": prompt, "real": real, "generated": generated, "dead": real == generated,
                      "ref_real": row["ref_real_logp"], "ref_generated": row["ref_generated_logp"]})
    return items


def batch_losses(model, batch: list[dict], pad_id: int, budget: int | None, beta: float, loss_type: str):
    """Per-pair losses (batch,) and detached metrics, from one forward over the micro-batch
    (packed [prompt | real | generated] rows, or padded sequences when packing is off)."""
    scores = response_logps(model, [(b["prompt"], [b["real"], b["generated"]]) for b in batch], pad_id, budget)
    policy_real = torch.stack([real for (real, _), _ in scores])
    policy_generated = torch.stack([gen for _, (gen, _) in scores])
    ref_real = torch.tensor([b["ref_real"] for b in batch], device=policy_real.device)
    ref_generated = torch.tensor([b["ref_generated"] for b in batch], device=policy_real.device)
    losses = spin_loss(policy_real, policy_generated, ref_real, ref_generated, beta, loss_type)
    rewards = spin_rewards(policy_real.detach(), policy_generated.detach(), ref_real, ref_generated, beta)
    metrics = {"loss": losses.detach(), "dead_pairs": torch.tensor([float(b["dead"]) for b in batch]),
               "logps/real": policy_real.detach(),
               "logps/generated": policy_generated.detach(), **{f"rewards/{k}": v for k, v in rewards.items()}}
    return losses, {k: v.float().mean().item() for k, v in metrics.items()}


def train(model_path: str, pairs_path: Path, out: Path, cfg: Config, iteration: int) -> dict:
    """Train from `model_path` on the scored pairs; save the model to `out`; return metrics."""
    lr, beta, tc = cfg.per_iteration("learning_rate", iteration), cfg.per_iteration("beta", iteration), cfg.train
    accelerator = make_accelerator(tc.mixed_precision, tc.gradient_accumulation_steps)
    set_seed(cfg.run.seed + iteration)
    tokenizer = load_tokenizer(model_path, cfg.model)
    model = load_trainable(model_path, cfg.model, accelerator, tc.gradient_checkpointing)
    items = pair_items(tokenizer, read_jsonl(pairs_path), cfg)
    budget = prepare(model, [(i["prompt"], [i["real"], i["generated"]]) for i in items[:4]], tokenizer.pad_token_id,
                     cfg.packing)
    optimizer = make_optimizer(tc.optimizer, model, lr, tc.weight_decay)
    model, optimizer, batches = accelerator.prepare(model, optimizer, loader(items, tc.batch_size, cfg.run.seed + iteration))
    steps = optimizer_steps(len(batches), tc.epochs, tc.gradient_accumulation_steps, tc.max_steps)
    scheduler = accelerator.prepare(linear_schedule(optimizer, accelerator, steps, tc.warmup_ratio))
    log.info("train iteration %d: %d pairs, %d optimizer steps, lr %g, beta %g, %s loss", iteration, len(items),
             steps, lr, beta, cfg.spin.loss_type)
    history, window, step, start = [], [], 0, time.time()
    while step < steps:
        for batch in batches:
            with accelerator.accumulate(model):
                losses, metrics = batch_losses(model, batch, tokenizer.pad_token_id, budget, beta,
                                               cfg.spin.loss_type)
                accelerator.backward(losses.mean())
                if accelerator.sync_gradients and tc.max_grad_norm > 0:
                    metrics["grad_norm"] = float(accelerator.clip_grad_norm_(model.parameters(), tc.max_grad_norm))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            window.append(metrics)
            if not accelerator.sync_gradients:
                continue
            step += 1
            if step % cfg.run.log_every == 0 or step == steps:
                history.append(_log_step(window, step, steps, scheduler.get_last_lr()[0], start))
                window = []
            if step >= steps:
                break
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        write_json(out / "spinlm_train.json", {"iteration": iteration, "learning_rate": lr, "beta": beta,
                                               "steps": steps, "pairs": len(items), "history": history})
    return {"steps": steps, "pairs": len(items), "learning_rate": lr, "beta": beta, "history": history,
            "final": history[-1] if history else {}}


def _log_step(window: list[dict], step: int, steps: int, lr: float, start: float) -> dict:
    keys = [k for k in window[0] if all(k in w for w in window)]
    row = {"step": step, "lr": lr, **{k: sum(w[k] for w in window) / len(window) for k in keys},
           "elapsed_s": round(time.time() - start, 2)}
    log.info("step %d/%d  " + "  ".join(f"{k} {row[k]:.4g}" for k in METRICS if k in row), step, steps)
    return row
