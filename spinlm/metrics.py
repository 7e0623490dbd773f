"""Held-out metrics, one definition each, shared by the stages that report them.

- heldout_nll: NLL per token of the real responses (EOS included);
- reward_metrics: on held-out pairs with stored reference log-probs, reward accuracy, margin and
  the two sides' rewards over the live pairs (over_live_pairs says why), the dead pairs as dead_pair_share;
- greedy_metrics: greedy generation, its lengths, and task accuracy with a checker (load_checker);
- heldout_metric: the one metric in-training checks and best-model selection use.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable

import torch

from spinlm import dist
from spinlm.config import Config
from spinlm.data import Example
from spinlm.errors import UserError
from spinlm.generation.local import gather_rows, generate
from spinlm.io import write_jsonl
from spinlm.loss import spin_rewards
from spinlm.packing import Group, Layout, prepare, score_groups
from spinlm.tokens import Limits, encode_prompt, encode_real, is_dead, pair_groups


def over_live_pairs(key: str) -> bool:
    """Whether a training-log metric is measured over the live pairs only: every `rewards/*` one.

    The one definition of the reward metrics, in training (spinlm.stages.train) and held out
    (reward_metrics) alike: reward accuracy (share of pairs with margin > 0), the mean margin and
    the mean rewards of the real and of the generated side are measured over the LIVE pairs only;
    the dead pairs (generated == real token for token, spinlm.tokens.is_dead) are reported on their
    own, as a share (training's `dead_pairs`, held out `dead_pair_share`).

    Why: a dead pair's two sides are one token sequence, so its margin is 0 and its accuracy 0 for
    every model, before training and after it. Counted as a failure (as the training log did before
    this definition), reward accuracy measured how often the sampler copied the real response
    (82-95% of the demo's pairs) more than what the model prefers; averaged into the margin (as the
    held-out margin was), it shrank the margin by that share. Over the live pairs, two iterations
    whose dead shares differ compare, and the dead share beside them says how many pairs the
    numbers rest on.
    """
    return key.startswith("rewards/")


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
def heldout_nll(model, groups: list[Group], pad_id: int, layout: Layout | None, batch_size: int) -> float:
    """Per-token NLL of the real responses: sum of -log p over all tokens / token count."""
    was_training = model.training
    model.eval()
    scores = [s for per_group in score_groups(model, groups, pad_id, layout, batch_size) for s in per_group]
    model.train(was_training)
    return -sum(s for s, _ in scores) / max(sum(n for _, n in scores), 1)


@torch.no_grad()
def reward_metrics(model, tokenizer, pairs: list[dict], cfg: Config, beta: float) -> dict:
    groups = pair_groups(tokenizer, pairs, Limits.of(cfg))  # (prompt, [real, generated]) token ids
    scores = score_groups(model, groups, tokenizer.pad_token_id, prepare(model, groups, tokenizer.pad_token_id,
                                                                            cfg.packing), cfg.eval.batch_size)
    rewards = spin_rewards(torch.tensor([real for (real, _), _ in scores]),
                           torch.tensor([gen for _, (gen, _) in scores]),
                           torch.tensor([r["ref_real_logp"] for r in pairs]),
                           torch.tensor([r["ref_generated_logp"] for r in pairs]), beta)
    # over the live pairs only (over_live_pairs says why); None where every pair is dead
    live = torch.tensor([not is_dead(real, generated) for _, (real, generated) in groups])
    mean = lambda key: rewards[key][live].mean().item() if live.any() else None  # noqa: E731
    return {"reward_accuracy": mean("accuracy"), "reward_margin": mean("margin"),
            "rewards_real": mean("real"), "rewards_generated": mean("generated"),
            "dead_pair_share": 1 - live.float().mean().item()}


def greedy_metrics(model, tokenizer, examples: list[Example], cfg: Config, checker, outputs: Path | None,
                   sharded: bool = False) -> dict:
    """Greedy-generation metrics; the processes split the batches, or, with a `sharded` (FSDP) model,
    all generate all of them together."""
    max_new = cfg.eval.max_new_tokens or cfg.generation.max_new_tokens
    prompts = [encode_prompt(tokenizer, ex.prompt, cfg.data.max_prompt_length) for ex in examples]
    results = gather_rows(generate(model, tokenizer, prompts, max_new_tokens=max_new, batch_size=cfg.eval.batch_size,
                                   batch_tokens=cfg.generation.batch_tokens,
                                   progress=cfg.run.progress and dist.is_main(),
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


def heldout_metric(model, tokenizer, examples: list[Example], cfg: Config, sharded: bool = False) -> tuple[str, float]:
    """Task accuracy (greedy, with eval.checker) if there is a checker, else NLL per token of the real
    responses: the metric in-iteration checks and best-model selection use. A `sharded` (fsdp, zero3) model
    is checked by every process on every example together (no whole copy on one device)."""
    was_training = model.training
    model.eval()
    checker = load_checker(cfg.eval.checker)
    if checker:
        result = ("accuracy", greedy_metrics(model, tokenizer, examples, cfg, checker, None, sharded)["accuracy"])
    else:
        groups = encode_real(tokenizer, examples, Limits.of(cfg))
        result = ("nll_per_token", heldout_nll(model, groups, tokenizer.pad_token_id, None, cfg.eval.batch_size))
    model.train(was_training)
    return result
