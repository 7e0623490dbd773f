"""LoRA training (the `peft` config section): wrap the fp32 model, merge at the end.

    spinlm run CONFIG.yaml --peft.enabled=true --peft.r=16

Only the adapter's A and B matrices train (Hu et al. 2021, arXiv 2106.09685). B starts at
zero, so the wrapped model computes exactly the model it wraps: iteration t's policy starts
equal to its reference p_t, as in full training. At the end of an iteration the adapter is
merged into the weights and a plain transformers model is saved, so the next iteration's
policy and reference is that merged iterate and no model directory ever needs peft to load.
peft is imported only when `peft.enabled` (extra: `pip install 'spinlm[lora]'`).
"""

from __future__ import annotations

import importlib.util
import logging

import torch

from spinlm.errors import UserError

log = logging.getLogger("spinlm")


def require_peft() -> None:
    """A UserError (exit 2) rather than an ImportError traceback when peft is missing."""
    if importlib.util.find_spec("peft") is None:
        raise UserError("peft.enabled is true but the peft package is not installed: "
                        "pip install 'spinlm[lora]' (or set peft.enabled=false)")


def add_adapter(model, peft_cfg, checkpointing: bool):
    """The model wrapped in a fresh LoRA adapter (a peft PeftModel): only adapter weights train."""
    require_peft()
    from peft import LoraConfig, TaskType, get_peft_model

    lora = LoraConfig(task_type=TaskType.CAUSAL_LM, r=peft_cfg.r, lora_alpha=peft_cfg.alpha,
                      lora_dropout=peft_cfg.dropout, target_modules=peft_cfg.target_modules,
                      use_rslora=peft_cfg.use_rslora)
    if checkpointing:
        # Frozen embeddings give activations without grad; reentrant checkpointing (the default
        # of older transformers) would then drop the adapters' gradients.
        model.enable_input_require_grads()
    try:
        model = get_peft_model(model, lora)
    except ValueError as e:  # e.g. a target module name that the model does not have
        raise UserError(f"peft: could not add a LoRA adapter to this model: {e}") from None
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("LoRA r=%d alpha=%d on %s: %d of %d parameters train (%.2f%%)", peft_cfg.r, peft_cfg.alpha,
             peft_cfg.target_modules, trainable, total, 100 * trainable / total)
    return model


def is_adapted(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")


def merged(model):
    """The plain transformers model with the adapter folded into its weights (in place: the
    adapter is gone afterwards). A model without an adapter is returned as it is."""
    if not is_adapted(model):
        return model
    return model.merge_and_unload()


def trainable_state(model) -> dict:
    """Copies of the trainable (adapter) weights, by name: small enough to keep in memory."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def restore(model, state: dict) -> None:
    """Load weights taken by `trainable_state` back into `model` (nothing if `state` is empty)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
