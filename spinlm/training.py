"""Pieces shared by the SFT and SPIN training loops: accelerator, optimizer, schedule, batches."""

from __future__ import annotations

import math

import torch
from accelerate import Accelerator

from .lora import add_adapter
from .modeling import load_model


def make_accelerator(mixed_precision: str, gradient_accumulation_steps: int) -> Accelerator:
    """auto: bf16 autocast on a GPU that supports it (fp32 master weights), fp32 elsewhere."""
    if mixed_precision == "auto":
        cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        mixed_precision = "bf16" if cuda_bf16 else "no"
    return Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=gradient_accumulation_steps)


def load_trainable(model_path: str, model_cfg, accelerator: Accelerator, checkpointing: bool, peft_cfg=None):
    """fp32 weights: updates of lr ~1e-7 vanish in bf16 weights, so autocast carries the speed.
    With `peft_cfg.enabled`, a LoRA adapter is added and only its weights train."""
    model = load_model(model_path, model_cfg, dtype=torch.float32, dev=accelerator.device)
    if checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if peft_cfg is not None and peft_cfg.enabled:
        model = add_adapter(model, peft_cfg, checkpointing)
    return model.train()


def make_optimizer(name: str, model, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def optimizer_steps(batches_per_epoch: int, epochs: int, accumulation: int, max_steps: int | None) -> int:
    steps = math.ceil(batches_per_epoch / accumulation) * epochs
    return min(steps, max_steps) if max_steps else steps


def linear_schedule(optimizer, accelerator: Accelerator, steps: int, warmup_ratio: float):
    """Linear warm-up then linear decay to 0, counted in optimizer steps of this process.

    A prepared scheduler steps once per process per optimizer step, hence the factor.
    """
    from transformers import get_linear_schedule_with_warmup

    n = accelerator.num_processes
    return get_linear_schedule_with_warmup(optimizer, int(warmup_ratio * steps) * n, steps * n)


def loader(items: list, batch_size: int, seed: int, shuffle: bool = True) -> torch.utils.data.DataLoader:
    """Batches of raw items (lists); the loops tokenize and pad them themselves."""
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(items, batch_size=batch_size, shuffle=shuffle, generator=generator,
                                       collate_fn=list)
