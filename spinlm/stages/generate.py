"""Stage: the current model answers every prompt, through the configured generation backend.

    spinlm generate --model MODEL --data DATA.jsonl --out generations.jsonl

`generation.backend` picks who samples (spinlm.generation.backend_for): local (transformers
`generate` in this process), server (an OpenAI-compatible server) or vllm (a vLLM engine in this
process); the stage does the same with each.
Every backend samples each row from its own seed, so a row's response does not depend on which
other rows share its batch, and records whether it ended at a stop token or hit max_new_tokens.
Finished rows are appended to `OUT.partial` as they come; a killed stage resumes there, and a
preemption signal (spinlm.preempt) stops every backend between rows or batches, the stage with it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from spinlm import dist, preempt
from spinlm.config import Config
from spinlm.data import Example
from spinlm.generation import backend_for
from spinlm.generation.local import gather_rows, row_seed
from spinlm.hub import model_key
from spinlm.io import RowLog, fingerprint, scratch, write_jsonl
from spinlm.modeling import load_tokenizer
from spinlm.tokens import Limits, encode_pair, encode_prompt, is_dead

log = logging.getLogger("spinlm")


def generate_file(model_path: str, examples: list[Example], out: Path, cfg: Config, iteration: int,
                  desc: str = "generate") -> dict:
    """The stage: sample one response per example with `model_path`, write JSON lines to `out`."""
    tokenizer = load_tokenizer(model_path, cfg.model)
    prompts = [encode_prompt(tokenizer, ex.prompt, cfg.data.max_prompt_length) for ex in examples]
    seeds = [row_seed(cfg.run.seed, iteration, ex.id) for ex in examples]
    g = cfg.generation
    key = fingerprint("generate", model_key(model_path, cfg.model.revision), prompts, seeds,
                      g.backend, g.max_new_tokens, g.temperature, g.top_p,
                      g.top_k, g.batch_size, g.batch_tokens, cfg.model.dtype, cfg.model.attn_implementation)
    backend = backend_for(cfg)
    with RowLog(scratch(out, dist.partial_name()), key, also=scratch(out, "partial*")) as rowlog:
        results = backend.generate(model_path, tokenizer, prompts, seeds, rowlog, desc=desc)
        preempt.stop_here(f"{desc}: {len(rowlog.done)} of {len(prompts)} rows are finished and kept in "
                          f"{rowlog.path}: a re-run generates only the others")
    results = gather_rows(results)
    rows = [{"id": ex.id, "prompt": ex.prompt, "real": ex.real, "generated": r["text"], "finish": r["finish"],
             "generated_tokens": r["tokens"], "generated_ids": r.get("ids"), "iteration": iteration, "extra": ex.extra}
            for ex, r in zip(examples, results)]
    if dist.is_main():
        write_jsonl(out, rows)
    stats = generation_stats(rows, tokenizer, Limits.of(cfg))
    log.info("%s: %d responses, %.1f tokens on average, %d hit max_new_tokens, %d empty, %d equal to the real "
             "response", desc, len(rows), stats["mean_tokens"], stats["hit_max_new_tokens"], stats["empty"],
             stats["equal_to_real"])
    if stats["text_only"]:
        log.warning("%s: %d of %d responses came back as text without their token ids (the server does not return "
                    "them); they are re-encoded from the text for scoring and training, which need not give the "
                    "sampled ids back", desc, stats["text_only"], len(rows))
    return stats


def generation_stats(rows: list[dict], tokenizer, limits: Limits) -> dict:
    """Lengths, finishes, empty responses and dead pairs (`spinlm.tokens.is_dead`, as training counts them)."""
    n = max(len(rows), 1)
    return {"rows": len(rows), "mean_tokens": sum(r["generated_tokens"] for r in rows) / n,
            "hit_max_new_tokens": sum(r["finish"] == "length" for r in rows),
            "empty": sum(not r["generated"].strip() for r in rows),
            "equal_to_real": sum(is_dead(*encode_pair(tokenizer, r, limits)[1:]) for r in rows),
            "text_only": sum(r["generated_ids"] is None for r in rows)}
