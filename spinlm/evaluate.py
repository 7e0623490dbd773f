"""Stage: held-out metrics of one model.

    spinlm evaluate --model MODEL --data test.jsonl [--pairs eval-pairs.jsonl --beta 0.1] --out eval.json

- nll_per_token: mean NLL of the real held-out responses (EOS included);
- accuracy: greedy generation checked by a task checker ('module:function'), if given;
- reward_accuracy / reward_margin: on held-out pairs whose generated side came from the
  reference model p_t and whose reference log-probs are stored (the score stage's output),
  the share of pairs where this model's implicit reward prefers the real response, and
  the mean margin beta * (r_real - r_gen);
- greedy length statistics and the share that hit max_new_tokens.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Callable

import torch

from . import dist
from .config import Config
from .data import Example
from .errors import UserError
from .generate import gather_rows, generate
from .io import write_jsonl
from .packing import prepare, score_groups
from .loss import spin_rewards
from .modeling import load_tokenizer
from .score import limits, pair_groups
from .strategy import inference_model
from .sft import encode_real, heldout_nll
from .tokens import encode_prompt, is_dead

log = logging.getLogger("spinlm")


def load_checker(spec: str | None) -> Callable | None:
    """'package.module:function' -> the function (example, generated_text) -> bool."""
    if not spec:
        return None
    module_name, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise UserError(f"eval.checker: cannot import '{spec}' (expected 'module:function'): {e}") from None
    if not callable(fn):
        raise UserError(f"eval.checker: '{spec}' is not a function")
    return fn


@torch.no_grad()
def reward_metrics(model, tokenizer, pairs: list[dict], cfg: Config, beta: float) -> dict:
    groups = pair_groups(tokenizer, pairs, cfg)  # (prompt, [real, generated]) token ids
    scores = score_groups(model, groups, tokenizer.pad_token_id, prepare(model, groups, tokenizer.pad_token_id,
                                                                            cfg.packing), cfg.eval.batch_size)
    rewards = spin_rewards(torch.tensor([real for (real, _), _ in scores]),
                           torch.tensor([gen for _, (gen, _) in scores]),
                           torch.tensor([r["ref_real_logp"] for r in pairs]),
                           torch.tensor([r["ref_generated_logp"] for r in pairs]), beta)
    # A pair whose generated response equals the real one has margin 0 whatever the model: it
    # is counted apart, and reward accuracy is measured on the other ("live") pairs.
    live = torch.tensor([not is_dead(real, generated) for _, (real, generated) in groups])
    return {"reward_accuracy": rewards["accuracy"][live].mean().item() if live.any() else None,
            "reward_margin": rewards["margin"].mean().item(), "dead_pair_share": 1 - live.float().mean().item(),
            "rewards_real": rewards["real"].mean().item(), "rewards_generated": rewards["generated"].mean().item()}


def greedy_metrics(model, tokenizer, examples: list[Example], cfg: Config, checker, outputs: Path | None,
                   sharded: bool = False) -> dict:
    """Greedy-generation metrics; the processes split the batches, or, with a `sharded` (FSDP) model,
    all generate all of them together."""
    max_new = cfg.eval.max_new_tokens or cfg.generation.max_new_tokens
    prompts = [encode_prompt(tokenizer, ex.prompt, cfg.data.max_prompt_length) for ex in examples]
    results = gather_rows(generate(model, tokenizer, prompts, max_new_tokens=max_new, batch_size=cfg.eval.batch_size,
                                   batch_tokens=cfg.generation.batch_tokens, progress=cfg.run.progress and dist.is_main(),
                                   desc="evaluate", shard=(0, 1) if sharded else (dist.rank(), dist.world()),
                                   synced=sharded))
    correct = [bool(checker(ex, r["text"])) if checker else None for ex, r in zip(examples, results)]
    if outputs is not None and dist.is_main():
        write_jsonl(outputs, [{"id": ex.id, "greedy": r["text"], "finish": r["finish"], "correct": c}
                              for ex, r, c in zip(examples, results, correct)])
    n = max(len(results), 1)
    metrics = {"greedy_mean_tokens": sum(r["tokens"] for r in results) / n,
               "greedy_hit_max_new_tokens": sum(r["finish"] == "length" for r in results) / n}
    if checker:
        metrics["accuracy"] = sum(correct) / n
    return metrics


def evaluate(model_path: str, examples: list[Example], cfg: Config, pairs: list[dict] | None = None,
             beta: float | None = None, outputs: Path | None = None) -> dict:
    """All held-out metrics of `model_path` as a flat dict."""
    checker = load_checker(cfg.eval.checker)
    tokenizer = load_tokenizer(model_path, cfg.model)
    model, fsdp = inference_model(model_path, cfg)  # sharded with train.fsdp_inference: all take every example
    groups = encode_real(tokenizer, examples, limits(cfg))
    budget = prepare(model, groups, tokenizer.pad_token_id, cfg.packing)
    metrics = {"model": str(model_path), "examples": len(examples),
               "nll_per_token": heldout_nll(model, groups, tokenizer.pad_token_id, budget, cfg.eval.batch_size)}
    metrics.update(greedy_metrics(model, tokenizer, examples, cfg, checker, outputs, sharded=fsdp is not None))
    if pairs:
        metrics.update(reward_metrics(model, tokenizer, pairs, cfg, beta if beta is not None else cfg.per_iteration("beta", 0)))
    log.info("evaluate %s: %s", model_path, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                                                      if isinstance(v, float)))
    return metrics
