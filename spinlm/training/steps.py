"""Pieces shared by the SFT and SPIN training loops: model, optimizer, schedule, batch order
(how the model is spread over processes: spinlm.training.strategy)."""

from __future__ import annotations

import logging

import torch

from spinlm.modeling import load_model
from spinlm.packing import Layout, pack
from spinlm.training.lora import add_adapter


def load_trainable(model_path: str, model_cfg, dev: torch.device, checkpointing: bool, peft_cfg=None):
    """fp32 weights on `dev`: updates of lr ~1e-7 vanish in bf16 weights, so autocast (or FSDP's
    bf16 compute) carries the speed. With `peft_cfg.enabled`, a LoRA adapter is added and only its
    weights train."""
    return trainable(load_model(model_path, model_cfg, dtype=torch.float32, dev=dev), checkpointing, peft_cfg)


def trainable(model, checkpointing: bool, peft_cfg=None):
    """`model` (fp32) set up for training: gradient checkpointing, a LoRA adapter, train mode."""
    if checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if peft_cfg is not None and peft_cfg.enabled:
        model = add_adapter(model, peft_cfg, checkpointing)
    return model.train()


def disable_dropout(model) -> int:
    """Zero the model's dropout (nn.Dropout modules, and the attention-dropout rates that Llama-style
    attention applies functionally in training mode), as TRL's DPO trainer does by default: the stored
    reference log-probs were computed in eval mode, so with dropout on the policy differs from its
    reference at step 0 (loss != log 2, rewards != 0) and every step trains against noise. A LoRA
    adapter's own dropout (peft.dropout, set explicitly) is kept. Returns how many were zeroed."""
    zeroed = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout) and module.p > 0 and "lora_dropout" not in name:
            module.p, zeroed = 0.0, zeroed + 1
        rate = getattr(module, "attention_dropout", None)
        if isinstance(rate, float) and rate > 0:
            module.attention_dropout, zeroed = 0.0, zeroed + 1
    if zeroed:
        logging.getLogger("spinlm").info("train.disable_dropout: %d dropout layers of the policy set to 0", zeroed)
    return zeroed


def make_optimizer(name: str, model, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def epoch_steps(n: int, batch_size: int, accumulation: int, world: int, rank: int, seed: int,
                epoch: int) -> list[tuple[list[list[int]], int]]:
    """One epoch's optimizer steps: (this process's micro-batches of item indices, pairs in the
    step over all processes). The order depends only on (seed, epoch), so a resumed run
    replays it exactly; a last step too small to give every micro-batch a pair is dropped."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
    parts, per_step, steps = world * accumulation, batch_size * accumulation * world, []
    for start in range(0, n, per_step):
        chunk = order[start:start + per_step]
        if len(chunk) < parts:
            logging.getLogger("spinlm").warning("epoch %d: %d pairs left over after the last full step are skipped",
                                                epoch, len(chunk))
            break
        size, extra = divmod(len(chunk), parts)
        bounds = [k * size + min(k, extra) for k in range(parts + 1)]
        micro = [chunk[bounds[k]:bounds[k + 1]] for k in range(parts)]
        steps.append((micro[rank * accumulation:(rank + 1) * accumulation], len(chunk)))
    return steps


def linear_schedule(optimizer, steps: int, warmup_ratio: float, factor: int = 1):
    """Linear warm-up then linear decay to 0, counted in optimizer steps of this process.

    `factor`: scheduler steps per optimizer step (an accelerate-prepared scheduler steps once per
    process: the strategy's schedule_factor).
    """
    from transformers import get_linear_schedule_with_warmup

    return get_linear_schedule_with_warmup(optimizer, int(warmup_ratio * steps) * factor, steps * factor)


def step_forwards(strategy, micro: list[list], groups_of, layout: Layout | None, per_row: bool):
    """One optimizer step's forwards as (part, weight, last): each micro-batch whole, or with
    `per_row` (packing.backward_per_row) split into the packed rows it forms, so one row's
    activations are held at a time. fsdp and zero3 run as many forwards on every process
    (strategy.forwards): the extra ones repeat the last part with weight 0. `last` marks the forward
    after which gradients sync. `groups_of(batch)`: the batch's (prompt, responses) groups."""
    def rows(batch: list) -> list[list]:
        if not (per_row and layout):
            return [batch]
        return [[batch[i] for i in row] for row in pack(groups_of(batch), layout.budget)]

    parts = [part for batch in micro for part in rows(batch)]
    n = strategy.forwards(len(parts))
    return [(parts[j], 1.0, j == n - 1) if j < len(parts) else (parts[-1], 0.0, j == n - 1) for j in range(n)]
