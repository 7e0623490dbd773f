"""Stage: train the next iterate p_{t+1} on scored pairs; no reference model is loaded.

    spinlm train --model MODEL --pairs pairs.jsonl --out MODEL_DIR [--spin.beta=0.1]

The loop below is the whole algorithm: one forward over the real and generated responses
of a micro-batch, the SPIN loss against the stored reference log-probs, backward, guard,
clip, step. Every `train.checkpoint_every` optimizer steps the weights, optimizer,
scheduler, data position and RNG states are saved; a re-run resumes from the newest
checkpoint and (on CPU with `run.deterministic`) ends with the same weights bit for bit.
With `peft.enabled` only a LoRA adapter trains, and it is merged into the saved model.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
from accelerate.utils import set_seed

from spinlm.config import Config
from spinlm.data import Example
from spinlm.errors import UserError
from spinlm.io import fault_point, read_jsonl, write_json
from spinlm.loss import Objective, objective, real_nll_per_token
from spinlm.metrics import heldout_metric, over_live_pairs
from spinlm.modeling import load_tokenizer
from spinlm.packing import Layout, prepare, response_logps
from spinlm.tokens import Limits, encode_pair, is_dead
from spinlm.tracking import Log
from spinlm.training import checkpoint
from spinlm.training.guards import best_weights, keep_best, stop_if_not_finite, stop_if_preempted
from spinlm.training.steps import (
    disable_dropout,
    epoch_steps,
    linear_schedule,
    make_optimizer,
    step_forwards,
)
from spinlm.training.strategy import make_strategy

log = logging.getLogger("spinlm")
REMEDY = "Lower train.learning_rate or spin.beta, or set train.max_grad_norm / train.skip_grad_norm_above"
# the log line's metrics (every one is in the training log); then the objective's own terms/*. rewards/* are
# over the live pairs (generated != real), dead_pairs the share of the others: spinlm.metrics.over_live_pairs
METRICS = ("loss", "rewards/real", "rewards/generated", "rewards/margin", "rewards/accuracy",
           "logp/real_per_token", "logp/generated_per_token", "logp/historical_per_token",
           "logratio/real_per_token", "logratio/generated_per_token", "dead_pairs", "grad_norm")


def pair_items(tokenizer, rows: list[dict], cfg: Config) -> list[dict]:
    """Token ids of each scored row: the responses spin.objective trains on (for T-SPIN also the
    row's `historical` response, the starting model's, kept from iteration 0), where the objective
    needs them the stored reference log-probs, and the objective's per-row `scales` of its params
    (T-SPIN: the history weight only where y' != y0), counted over the rows that train (without dead
    pairs where spin.drop_dead_pairs leaves them out)."""
    goal, lim = objective(cfg.spin.objective), Limits.of(cfg)
    items = []
    for n, row in enumerate(rows, 1):
        prompt, real, generated = encode_pair(tokenizer, row, lim)
        item = {"prompt": prompt, "real": real, "generated": generated, "dead": is_dead(real, generated)}
        for name in goal.responses[2:]:  # beyond the pair: another response of the same prompt
            if name not in row:
                raise UserError(f"pairs row {n} (id {row.get('id')}): spin.objective {goal.name} trains on triplets, "
                                f"and this row has no `{name}` response (the starting model's, which `spinlm run` "
                                "keeps from iteration 0)")
            item[name] = encode_pair(tokenizer, {**row, "generated": row[name], "generated_ids": row.get(f"{name}_ids"),
                                                 "finish": row[f"{name}_finish"]}, lim)[2]
        if goal.needs_reference:
            item.update(ref_real=row["ref_real_logp"], ref_generated=row["ref_generated_logp"])
        items.append(item)
    trained = [i for i in items if not (cfg.spin.drop_dead_pairs and i["dead"])]
    for item, scales in zip(trained, goal.scales(trained)):
        item["scales"] = scales
    return items


def responses(item: dict) -> list[list[int]]:
    """The responses one item packs after its prompt: [real, generated] (+ historical for T-SPIN)."""
    return [item["real"], item["generated"]] + ([item["historical"]] if "historical" in item else [])


def batch_losses(model, batch: list[dict], pad_id: int, layout: Layout | None, goal: Objective, params: dict,
                 sft_weight: float = 0.0):
    """Per-row losses (batch,) of the objective `goal` with its `params` (spinlm.loss.OBJECTIVES), plus
    `sft_weight` x the real response's NLL per token, and detached per-row metrics, from one forward over
    the micro-batch (packed [prompt | real | generated (| historical)] rows, or padded sequences when
    packing is off)."""
    scores = response_logps(model, [(b["prompt"], responses(b)) for b in batch], pad_id, layout)
    policy = {name: torch.stack([s[k][0] for s in scores]) for k, name in enumerate(goal.responses)}
    dev = policy["real"].device
    tokens = {name: torch.tensor([float(s[k][1]) for s in scores], device=dev) for k, name in enumerate(goal.responses)}
    ref = {name: torch.tensor([b[f"ref_{name}"] for b in batch], device=dev)
           for name in ("real", "generated")} if goal.needs_reference else None
    params = {**params, **{k: params[k] * torch.tensor([b["scales"][k] for b in batch], device=dev)
                           for k in batch[0].get("scales", {})}}  # per row where the objective says so
    terms = goal.terms(policy, ref, **params)
    losses = sum(terms.values())
    nll = real_nll_per_token(policy["real"], tokens["real"])
    shown = {k: v.detach() for k, v in terms.items()} if len(terms) > 1 else {}  # a one-term loss is `loss`
    if sft_weight:
        losses = losses + sft_weight * nll
        shown["nll"] = sft_weight * nll.detach()
    logps = {name: v.detach() for name, v in policy.items()}
    metrics = {"loss": losses.detach(), "dead_pairs": torch.tensor([float(b["dead"]) for b in batch]),
               "nll/real_per_token": nll.detach(),
               **{f"rewards/{k}": v for k, v in goal.rewards(logps, ref, **params).items()},
               **{f"terms/{k}": v for k, v in shown.items()}}
    for name, logp in logps.items():
        metrics[f"logps/{name}"] = logp
        metrics[f"logp/{name}_per_token"] = logp / tokens[name].clamp(min=1)
        if ref is not None and name in ref:  # policy minus reference, per token: how far each side moved from p_t
            metrics[f"logratio/{name}_per_token"] = (logp - ref[name]) / tokens[name].clamp(min=1)
    return losses, {k: v.float().cpu() for k, v in metrics.items()}


def train(model_path: str, pairs_path: Path, out: Path, cfg: Config, iteration: int,
          heldout: list[Example] | None = None, track: Log | None = None) -> dict:
    """Train from `model_path` on the scored pairs; save the model to `out`; return metrics.
    Checkpoints go to `out`.checkpoints (kept until the stage is marked done). With
    train.eval_every and `heldout` examples, the best checked weights are the ones saved.
    `track(stream, step, values)` gets every logged row ("train") and check ("train/check")."""
    lr, beta, tc = cfg.per_iteration("learning_rate", iteration), cfg.per_iteration("beta", iteration), cfg.train
    goal = objective(cfg.spin.objective)
    params = goal.params(cfg.spin, beta, iteration)
    strategy = make_strategy(tc)
    seed = cfg.run.seed + iteration
    set_seed(seed, deterministic=cfg.run.deterministic)
    tokenizer = load_tokenizer(model_path, cfg.model)
    model = strategy.load(model_path, cfg.model, tc.gradient_checkpointing, cfg.peft)
    if tc.disable_dropout:
        disable_dropout(model)
    items = pair_items(tokenizer, read_jsonl(pairs_path), cfg)
    dead = sum(i["dead"] for i in items)
    log.info("train iteration %d: %d of %d pairs are dead (generated == real)%s", iteration, dead, len(items),
             ": left out (spin.drop_dead_pairs)" if cfg.spin.drop_dead_pairs else "")
    if cfg.spin.drop_dead_pairs:
        items = [i for i in items if not i["dead"]]
    pad = tokenizer.pad_token_id
    world, rank = strategy.world, strategy.rank
    plan = lambda epoch: epoch_steps(len(items), tc.batch_size, tc.gradient_accumulation_steps, world, rank, seed,
                                     epoch)
    per_epoch = len(plan(0))
    steps = min(per_epoch * tc.epochs, tc.max_steps or math.inf)
    # the schedule's length may exceed the steps run (train.schedule_epochs): training stops partway down it
    horizon = per_epoch * tc.schedule_epochs if tc.schedule_epochs else steps

    def build(wrapped):
        optimizer = make_optimizer(tc.optimizer, wrapped, lr, tc.weight_decay)
        return optimizer, linear_schedule(optimizer, horizon, tc.warmup_ratio, strategy.schedule_factor)

    ckpt_dir = out.with_name(out.name + ".checkpoints")
    model, optimizer, scheduler, state = strategy.setup(model, build, checkpoint.latest(ckpt_dir))
    state = state or {"step": 0, "history": [], "window": [], "skipped": 0, "checks": [], "warnings": 0}
    # after wrapping: under fsdp every process checks on the sharded model (no whole copy on one device)
    layout = prepare(strategy.unwrap(model), [(i["prompt"], responses(i)) for i in items[:4]], pad,
                     cfg.packing) if items else None
    described = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in params.items())
    log.info("train iteration %d: %d pairs, %d optimizer steps (schedule of %d), lr %g, objective %s (%s), "
             "sft_weight %g", iteration, len(items), steps, horizon, lr, goal.name, described, cfg.spin.sft_weight)
    checking = bool(tc.eval_every and heldout)
    start, epoch_plan = time.time(), {}
    window = {"tokens": 0, "since": time.time()}  # tokens/s of this process's logging window
    save = lambda: strategy.save_checkpoint(ckpt_dir, state["step"], model, optimizer, scheduler, state)  # noqa: E731
    while state["step"] < steps and not state.get("stopped"):  # stopped: patience ran out (kept in checkpoints)
        epoch, k = divmod(state["step"], per_epoch)
        micro, n_pairs = epoch_plan.setdefault(epoch, plan(epoch))[k]
        metrics = train_step(strategy, model, optimizer, scheduler, [[items[i] for i in ids] for ids in micro],
                             n_pairs, pad, layout, goal, params, cfg, state, iteration, ckpt_dir)
        state["examples"] = state.get("examples", 0) + n_pairs
        state["window"].append(metrics)
        window["tokens"] += world * sum(len(items[i]["prompt"]) + len(items[i]["real"]) + len(items[i]["generated"])
                                        for ids in micro for i in ids)
        if state["step"] % cfg.run.log_every == 0 or state["step"] == steps:
            row = _log_step(state["window"], state["step"], steps, scheduler.get_last_lr()[0], start,
                            strategy.is_main)
            row["tokens_per_s"] = round(window["tokens"] / max(time.time() - window["since"], 1e-9), 1)
            window.update(tokens=0, since=time.time())
            state["history"].append(row)
            state["window"] = []
            _warn_if_unlearning(row, tc.warn_real_logp_drop, iteration, state, strategy.is_main)
            if track:
                track("train", row["step"], {**row, "iteration": iteration})
        if checking and (state["step"] % tc.eval_every == 0 or state["step"] == steps):
            state["stopped"] = heldout_check(strategy, model, tokenizer, heldout, cfg, state, ckpt_dir)
            if track:
                track("train/check", state["step"], {c["metric"]: c["value"] for c in state["checks"][-1:]})
        fault_point("train-step")
        stop_if_preempted(save, ckpt_dir, state["step"], steps, f"iteration {iteration}'s training")
        if tc.checkpoint_every and state["step"] % tc.checkpoint_every == 0 and state["step"] < steps \
                and not state.get("stopped"):
            save()
    strategy.barrier()
    history = state["history"]
    result = {"steps": state["step"], "planned_steps": steps, "schedule_steps": horizon,
              "examples": state.get("examples"), "pairs": len(items),
              "dead_pairs": dead,
              "objective": goal.name, "objective_params": params, "learning_rate": lr, "beta": beta,
              "skipped_steps": state["skipped"], "checks": state["checks"],
              "best_check": _best(state["checks"]), "unlearning_warnings": state["warnings"], "history": history,
              "final": history[-1] if history else {}}
    strategy.save_model(model, tokenizer, out, weights=best_weights(ckpt_dir) if checking else None)
    if strategy.is_main:
        write_json(out / "spinlm_train.json", {"iteration": iteration, **result})
    return result


def train_step(strategy, model, optimizer, scheduler, micro: list[list[dict]], n_pairs: int, pad: int,
               layout: Layout | None, goal: Objective, params: dict, cfg: Config, state: dict, iteration: int,
               ckpt_dir: Path) -> dict:
    """One optimizer step over this process's micro-batches; the loss is the mean over the step's
    `n_pairs` pairs of all processes. Guards non-finite values; applies the grad-norm skip policy."""
    tc, world = cfg.train, strategy.world
    metrics, count = {}, 0
    groups_of = lambda batch: [(b["prompt"], responses(b)) for b in batch]
    for part, weight, last in step_forwards(strategy, micro, groups_of, layout, cfg.packing.backward_per_row):
        with strategy.sync(model, last=last):  # gradients of all parts add up, synced after the last
            losses, per_pair = batch_losses(model, part, pad, layout, goal, params, cfg.spin.sft_weight)
            strategy.backward(losses.sum() * (weight * world / n_pairs))
        if weight:
            for key, value in per_pair.items():
                metrics.setdefault(key, []).append(value)
            count += len(part)
    metrics = _mean_over_processes(strategy, metrics, count)
    guard = lambda value, what: stop_if_not_finite(value, what, state["step"] + 1, f"iteration {iteration}",  # noqa: E731
                                                   ckpt_dir, REMEDY)
    guard(torch.tensor(metrics["loss"]), "loss")
    norm = strategy.clip_grad_norm(model, tc.max_grad_norm if tc.max_grad_norm > 0 else math.inf)
    metrics["grad_norm"] = float(norm)
    guard(norm, "gradient norm")
    if tc.skip_grad_norm_above and metrics["grad_norm"] > tc.skip_grad_norm_above:
        state["skipped"] += 1
        log.warning("step %d: gradient norm %.4g > train.skip_grad_norm_above=%g: update skipped (%d so far)",
                    state["step"] + 1, metrics["grad_norm"], tc.skip_grad_norm_above, state["skipped"])
    else:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    state["step"] += 1
    return metrics


def heldout_check(strategy, model, tokenizer, heldout: list[Example], cfg: Config, state: dict,
                  ckpt_dir: Path) -> bool:
    """Score the held-out metric now; keep the weights if they are the best of the iteration.
    Returns True when train.patience checks in a row brought no improvement."""
    name, value = heldout_metric(strategy.unwrap(model), tokenizer, heldout, cfg,
                                 sharded=strategy.sharded)
    checks = state["checks"]
    checks.append({"step": state["step"], "metric": name, "value": value})
    best = _best(checks)  # ties go to the earlier check: only a strict improvement is better
    if best is checks[-1]:
        keep_best(strategy, model, ckpt_dir)
    log.info("step %d: held-out %s %.4f%s", state["step"], name, value, " (best so far)" if best is checks[-1] else "")
    stale = len(checks) - 1 - checks.index(best)  # checks since the best one
    return bool(cfg.train.patience) and stale >= cfg.train.patience


def _best(checks: list[dict]) -> dict | None:
    if not checks:
        return None
    higher = checks[0]["metric"] == "accuracy"
    return (max if higher else min)(checks, key=lambda c: c["value"])


def _warn_if_unlearning(row: dict, margin: float, iteration: int, state: dict, show: bool) -> None:
    """The failure mode of small-scale SPIN: margins grow because the real responses lose probability."""
    drop = row.get("logratio/real_per_token")
    if drop is not None and margin > 0 and drop < -margin:
        state["warnings"] += 1
        if show:
            log.warning("iteration %d, step %d: the real responses' log-prob per token is %.3f nats below the "
                        "reference's (threshold train.warn_real_logp_drop=%g): the model is unlearning the data "
                        "while the margin grows; consider a lower learning rate or beta, spin.sft_weight > 0, or "
                        "train.eval_every to keep the best weights", iteration, row["step"], -drop, margin)


def _mean_over_processes(strategy, metrics: dict[str, list[torch.Tensor]], count: int) -> dict[str, float]:
    """Per-pair metrics of this step averaged over every pair of every process; the rewards/* over the
    live pairs only (spinlm.metrics.over_live_pairs: a dead pair's margin is 0 whatever the model),
    absent when the step has none. `_live`: the step's live pairs, which weigh them in the log row."""
    keys = sorted(metrics)
    live = torch.cat(metrics["dead_pairs"]) == 0
    parts = [torch.cat(metrics[k]) for k in keys]
    sums = torch.stack([torch.where(live, v, 0.0).sum() if over_live_pairs(k) else v.sum() for k, v in zip(keys, parts)]
                       + [torch.tensor(float(count)), live.sum().float()])
    if strategy.world > 1:
        sums = strategy.sum(sums)
    pairs, n_live = sums[-2], sums[-1]
    out = {k: (sums[j] / (n_live if over_live_pairs(k) else pairs)).item() for j, k in enumerate(keys)
           if n_live > 0 or not over_live_pairs(k)}
    return {**out, "_live": n_live.item()}


def _log_step(window: list[dict], step: int, steps: int, lr: float, start: float, show: bool) -> dict:
    """The log row of the steps since the last: the mean of their values; the rewards/* weighted by
    each step's live pairs (so the row's reward accuracy is the share over the window's live pairs)."""
    keys = [k for k in window[0] if all(k in w for w in window) and not over_live_pairs(k) and k != "_live"]
    row = {"step": step, "lr": lr, **{k: sum(w[k] for w in window) / len(window) for k in keys}}
    for k in dict.fromkeys(k for w in window for k in w if over_live_pairs(k)):
        had = [w for w in window if k in w]
        weight = sum(w.get("_live", 1.0) for w in had)  # `_live` is missing in a window saved by older code
        row[k] = sum(w[k] * w.get("_live", 1.0) for w in had) / weight
    row["elapsed_s"] = round(time.time() - start, 2)
    if show:
        shown = [k for k in METRICS if k in row] + sorted(k for k in row if k.startswith("terms/"))
        log.info("step %d/%d  " + "  ".join(f"{k} {row[k]:.4g}" for k in shown), step, steps)
    return row
