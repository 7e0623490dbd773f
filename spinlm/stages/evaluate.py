"""Stage: held-out metrics of one model.

    spinlm evaluate --model MODEL --data test.jsonl [--pairs eval-pairs.jsonl --beta 0.1] --out eval.json

- nll_per_token: mean NLL of the real held-out responses (EOS included);
- accuracy: greedy generation checked by a task checker ('module:function'), if given;
- reward_accuracy / reward_margin: on held-out pairs whose generated side came from the
  reference model p_t and whose reference log-probs are stored (the score stage's output),
  over the live pairs (generated != real; spinlm.metrics.over_live_pairs): the share where this
  model's implicit reward prefers the real response, and the mean margin beta * (r_real - r_gen);
  dead_pair_share: the share of the others;
- greedy length statistics and the share that hit max_new_tokens.
"""

from __future__ import annotations

import logging
from pathlib import Path

from spinlm.config import Config
from spinlm.data import Example
from spinlm.metrics import greedy_metrics, heldout_nll, load_checker, reward_metrics
from spinlm.modeling import load_tokenizer
from spinlm.packing import prepare
from spinlm.tokens import Limits, encode_real
from spinlm.training.strategy import inference_model

log = logging.getLogger("spinlm")


def evaluate(model_path: str, examples: list[Example], cfg: Config, pairs: list[dict] | None = None,
             beta: float | None = None, outputs: Path | None = None) -> dict:
    """All held-out metrics of `model_path` as a flat dict."""
    checker = load_checker(cfg.eval.checker)
    tokenizer = load_tokenizer(model_path, cfg.model)
    model, fsdp = inference_model(model_path, cfg)  # sharded with train.fsdp_inference: all take every example
    groups = encode_real(tokenizer, examples, Limits.of(cfg))
    layout = prepare(model, groups, tokenizer.pad_token_id, cfg.packing)
    metrics = {"model": str(model_path), "examples": len(examples),
               "nll_per_token": heldout_nll(model, groups, tokenizer.pad_token_id, layout, cfg.eval.batch_size)}
    metrics.update(greedy_metrics(model, tokenizer, examples, cfg, checker, outputs, sharded=fsdp is not None))
    if pairs:
        metrics.update(reward_metrics(model, tokenizer, pairs, cfg,
                                      beta if beta is not None else cfg.per_iteration("beta", 0)))
    log.info("evaluate %s: %s", model_path, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                                                      if isinstance(v, float)))
    return metrics
