"""Stage: reference log-probs of every pair an iteration trains on, computed once.

    spinlm score --model MODEL --generations it0.jsonl [it1.jsonl ...] --out pairs.jsonl

Under the reference model p_t (the model that generated iteration t's responses) this sums
the log-probs of the real and of the generated response of each pair and stores them with
the pair. Training then needs no reference model in memory. Scored chunks are kept as they finish;
a preemption signal (spinlm.preempt) stops the stage between chunks.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from spinlm import dist, preempt
from spinlm.config import Config
from spinlm.hub import model_key
from spinlm.io import RowLog, fault_point, fingerprint, read_jsonl, scratch, write_jsonl
from spinlm.modeling import load_tokenizer
from spinlm.packing import Layout, prepare, response_logps, score_groups, score_plan, shared_prompts
from spinlm.progress import bar as progress_bar
from spinlm.tokens import Limits, pair_groups
from spinlm.training.strategy import inference_model

log = logging.getLogger("spinlm")


def score_files(model_path: str, generation_files: list[Path], out: Path, cfg: Config, desc: str = "score",
                historical: Path | None = None) -> dict:
    """The stage: read pairs from generation files, score under `model_path`, write `out`. With
    `historical` (T-SPIN: the starting model's generations, kept from iteration 0), triplets instead:
    each row gets that prompt's historical response, and nothing is scored (T-SPIN needs no
    reference log-probs, so the reference model's forward pass is skipped)."""
    rows = [row for path in generation_files for row in read_jsonl(path)]
    if historical is not None:
        return triplet_rows(rows, historical, out, [str(p) for p in generation_files])
    return score_rows(model_path, rows, out, cfg, desc, [str(p) for p in generation_files])


def triplet_rows(rows: list[dict], historical: Path, out: Path, sources: list[str]) -> dict:
    """`out`: the rows with `historical`, `historical_ids`, `historical_finish` from the row of the
    same id in `historical`. Rows with an empty generated or historical response, or none, are
    dropped (counted and logged). Rows whose generated response is the historical one (iteration 0's
    own rows in a later mix window) are kept for the current term; training gives their history term
    no weight (spinlm.loss.tspin_history_scales), and they are counted here."""
    kept = {r["id"]: r for r in read_jsonl(historical) if r["generated"].strip()}
    empty = [r for r in rows if not r["generated"].strip()]
    missing = [r for r in rows if r["generated"].strip() and r["id"] not in kept]
    if empty or missing:
        log.warning("score (T-SPIN triplets): %d empty generated responses and %d prompts without a historical "
                    "response of the starting model are not trained on", len(empty), len(missing))
    triplets = []
    for row in rows:
        h = kept.get(row["id"])
        if row["generated"].strip() and h is not None:
            triplets.append({**row, "historical": h["generated"], "historical_ids": h.get("generated_ids"),
                             "historical_finish": h["finish"]})
    if dist.is_main():
        write_jsonl(out, triplets)
    same = sum(_same_response(r) for r in triplets)
    log.info("score: %d triplets from %s, historical responses from %s (reference-free: no forward pass); in %d "
             "of them the generated response is the historical one: no history term there", len(triplets),
             ", ".join(sources), historical, same)
    return {"pairs": len(triplets), "dropped_empty": len(empty), "no_historical": len(missing), "from": sources,
            "historical_from": str(historical), "reference_pass": False, "generated_is_historical": same}


def _same_response(row: dict) -> bool:
    """Whether a triplet's y' is its y0: the same sampled ids (the same text where ids are not stored)."""
    if row.get("generated_ids") is not None and row.get("historical_ids") is not None:
        return list(row["generated_ids"]) == list(row["historical_ids"])
    return row["generated"] == row["historical"]


@torch.no_grad()
def synced_scores(model, fsdp, groups: list, filler, pad_id: int, layout: Layout | None, batch_size: int) -> list:
    """score_groups on a sharded model: this process's `groups`, then forwards of `filler` (results
    dropped) until it has run as many forwards as the process with the most."""
    planned = score_plan(groups, layout, batch_size)
    mine = len(planned[2])  # score_groups' forwards
    most = fsdp.forwards(mine)  # agreed before any forward: a collective between two gathers would hang
    scores = score_groups(model, groups, pad_id, layout, batch_size, planned=planned)
    for _ in range(most - mine):
        response_logps(model, [filler], pad_id, layout)
    return scores


def score_rows(model_path: str, rows: list[dict], out: Path, cfg: Config, desc: str = "score",
               sources: list[str] | None = None) -> dict:
    """Score generation-format rows (id, prompt, real, generated, finish) under `model_path`; write `out`.

    Pairs whose generated response is empty are dropped (counted and logged). Rows of one prompt (a mix
    window's files hold each prompt and its real response once per iteration) are scored together, each
    distinct response once. Rows are scored in fixed chunks appended to `out`.partial, so a killed stage
    resumes after the last chunk."""
    empty = [r for r in rows if not r["generated"].strip()]
    if empty:
        log.warning("%s: %d of %d generated responses are empty (the model stopped at once); they are reported "
                    "and not trained on (first: id %s)", desc, len(empty), len(rows), empty[0]["id"])
        rows = [r for r in rows if r["generated"].strip()]
    tokenizer = load_tokenizer(model_path, cfg.model)
    model, fsdp = inference_model(model_path, cfg)
    groups = pair_groups(tokenizer, rows, Limits.of(cfg))
    layout = prepare(model, groups, tokenizer.pad_token_id, cfg.packing)
    chunk = cfg.eval.batch_size * 16
    key = fingerprint("score", model_key(model_path, cfg.model.revision), groups, layout,
                      cfg.model.dtype, cfg.model.attn_implementation, chunk)
    # rows of one prompt, together in one chunk, so that score_groups computes them as one
    units = shared_prompts(groups, layout.budget if layout else 0)
    bar = progress_bar(len(groups), desc, cfg.run.progress and dist.is_main())
    with RowLog(scratch(out, dist.partial_name()), key, also=scratch(out, "partial*")) as rowlog:
        for c, start in enumerate(range(0, len(units), chunk)):
            part = range(start, min(start + chunk, len(units)))
            idx = [i for u in part for i in units[u]]
            if preempt.agreed() if fsdp is not None else preempt.requested():  # sharded: every chunk together
                break
            if fsdp is not None:  # every process scores its rows of every chunk, as many forwards as the others
                mine = [i for u in part if u % fsdp.world == fsdp.rank for i in units[u] if i not in rowlog.done]
                scores = synced_scores(model, fsdp, [groups[i] for i in mine], groups[idx[0]],
                                       tokenizer.pad_token_id, layout, cfg.eval.batch_size)
                if mine:
                    rowlog.add([(i, {"real": real, "generated": gen}) for i, (real, gen) in zip(mine, scores)])
                    fault_point("score-chunk")
            elif c % dist.world() == dist.rank() and not all(i in rowlog.done for i in idx):
                scores = score_groups(model, [groups[i] for i in idx], tokenizer.pad_token_id, layout,
                                      cfg.eval.batch_size)
                rowlog.add([(i, {"real": real, "generated": gen}) for i, (real, gen) in zip(idx, scores)])
                fault_point("score-chunk")
            bar.update(len(idx))
        preempt.stop_here(f"{desc}: {len(rowlog.done)} of {len(groups)} pairs are scored and kept in {rowlog.path}: "
                          "a re-run scores only the others")
        done = dict(dist.gather(list(rowlog.done.items()))) if dist.world() > 1 else rowlog.done
    bar.close()
    scored = [{**row, "ref_real_logp": done[i]["real"][0], "ref_generated_logp": done[i]["generated"][0],
               "real_tokens": done[i]["real"][1], "generated_tokens_scored": done[i]["generated"][1]}
              for i, row in enumerate(rows)]
    if dist.is_main():
        write_jsonl(out, scored)
    n = max(len(scored), 1)
    stats = {"pairs": len(scored), "dropped_empty": len(empty), "from": sources or [],
             "mean_ref_real_logp": sum(r["ref_real_logp"] for r in scored) / n,
             "mean_ref_generated_logp": sum(r["ref_generated_logp"] for r in scored) / n}
    log.info("%s: %d pairs from %s", desc, len(scored), ", ".join(sources or []) or "the given rows")
    return stats
