"""The self-play loop: generate -> score -> train -> evaluate, T times, resumable.

    spinlm run CONFIG.yaml [--section.key=value ...]

Iteration t starts from, and uses as reference, the model p_t of iteration t-1 (for t = 0:
the SFT model). It trains on the pairs generated in the last `spin.mix_window` iterations,
all scored under p_t. Every stage writes to a temporary path, renames it into place and
then writes a `.done` marker; a re-run skips what is done and redoes the rest. With
run.push_to_hub each model goes to the Hub once evaluated (spinlm.report.publish).
"""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path

from spinlm import dist, progress
from spinlm.config import Config
from spinlm.io import read_json, read_jsonl, write_main
from spinlm.loss import objective
from spinlm.modeling import use_deterministic
from spinlm.report.cards import write_run_cards
from spinlm.report.publish import check_access, push_evaluated
from spinlm.rundir import SFT, RunLayout, Stage, iteration_name, open_run, release_lock
from spinlm.stages.evaluate import evaluate
from spinlm.stages.generate import generate_file
from spinlm.stages.score import score_files
from spinlm.stages.sft import sft
from spinlm.stages.train import train
from spinlm.summary import summarize
from spinlm.tracking import Tracker
from spinlm.validate import Checked, check, report

log = logging.getLogger("spinlm")


def run(cfg: Config, force: bool = False) -> Path:
    """Run (or resume) the whole loop; return the run directory."""
    dist.configure(cfg.run)
    data = check(cfg)  # everything `spinlm validate` checks, before the run directory is touched
    if cfg.run.push_to_hub:
        check_access(cfg)  # HF_TOKEN set and accepted: fail now, not after the first iteration
    run_dir = open_run(cfg, force, data.provenance)
    log.info("validated:\n%s", report(data))
    use_deterministic(cfg.run.deterministic)
    progress.configure(cfg.run)
    train_ex, val_ex, eval_ex = data.train, data.val, data.held
    tracker = Tracker(run_dir, cfg)  # run.report_to (rank 0): each stage's metrics once it is done
    stage, layout = Stage(run_dir, on_done=tracker.stage_done), RunLayout(run_dir)
    model = cfg.model.name_or_path
    if cfg.sft.enabled:
        stage("sft", layout.sft() / "model",
              lambda out: sft(model, train_ex, val_ex, out, cfg, track=tracker.sft_log()))
        model = str(layout.sft() / "model")
    start = model
    evaluate_stage(stage, model, layout.sft(), data, cfg, pairs=None, beta=None)
    push_evaluated(run_dir, cfg, SFT)  # run.push_to_hub: to its branch, and to main while it is the best
    for t in range(cfg.spin.iterations):
        it = layout.iteration(t)
        stage("generate", it / "generations.jsonl", lambda out: generate_file(model, train_ex, out, cfg, t))
        window = [layout.generations(s) for s in range(max(0, t - cfg.spin.mix_window + 1), t + 1)]
        y0 = layout.generations(0) if objective(cfg.spin.objective).historical else None
        stage("score", it / "pairs.jsonl", lambda out: score_files(model, window, out, cfg, historical=y0))
        if eval_ex and cfg.eval.enabled:
            stage("generate-eval", it / "eval-generations.jsonl",
                  lambda out: generate_file(model, eval_ex, out, cfg, t, desc="generate held-out"))
            stage("score-eval", it / "eval-pairs.jsonl",
                  lambda out: score_files(model, [it / "eval-generations.jsonl"], out, cfg, desc="score held-out"))
        stage("train", it / "model",
              lambda out: train(model, it / "pairs.jsonl", out, cfg, t, val_ex, track=tracker.train_log(t)))
        model = str(it / "model")
        pairs = read_jsonl(it / "eval-pairs.jsonl") if (it / "eval-pairs.jsonl").exists() else None
        evaluate_stage(stage, model, it, data, cfg, pairs, cfg.per_iteration("beta", t))
        push_evaluated(run_dir, cfg, iteration_name(t))
    if cfg.eval.continued_sft:  # the baseline: as many SFT steps as SPIN took, from the same start
        continued_sft(stage, run_dir, start, data, cfg)
    summarize(run_dir, cfg)
    write_run_cards(run_dir)  # README.md model cards (`spinlm report RUN` adds plots)
    tracker.finish()
    release_lock(run_dir / ".lock")
    return run_dir


def evaluate_stage(stage: Stage, model: str, where: Path, data: Checked, cfg: Config,
                   pairs: list[dict] | None, beta: float | None) -> None:
    """where/metrics.json: held-out metrics of `model` ("eval"; "val" on the validation data, which
    best-model selection uses), plus its training log if it has one."""
    if not (data.held and cfg.eval.enabled):
        return
    training = read_json(Path(model) / "spinlm_train.json") or read_json(Path(model) / "spinlm_sft.json")
    stage("evaluate", where / "metrics.json", lambda out: write_main(out, {
        "eval": evaluate(model, data.held, cfg, pairs, beta, outputs=where / "eval-outputs.jsonl"),
        "val": evaluate(model, data.val, cfg) if data.val else None,
        "train": training}))


def continued_sft(stage: Stage, run_dir: Path, start: str, data: Checked, cfg: Config) -> None:
    """RUN/continued-sft: `start` fine-tuned on the real responses for as many optimizer steps of
    train.batch_size examples as the SPIN iterations took together (equal steps and examples;
    SPIN's steps also run the generated responses, so SPIN spends about twice the tokens), selected
    on validation as SPIN is (sft_for_steps)."""
    sft_for_steps(stage, RunLayout(run_dir).continued_sft(), start, data, cfg,
                  iteration_steps(run_dir, cfg.spin.iterations))


def iteration_steps(run_dir: Path, iterations: int) -> list[int]:
    """Optimizer steps each finished iteration of a run took (0 where none is recorded)."""
    return [(read_json(RunLayout(run_dir).train_log(t)) or {}).get("steps", 0) for t in range(iterations)]


def spin_check_steps(per_iteration: list[int], eval_every: int) -> list[int]:
    """The optimizer steps, counted from the start of iteration 0, at which SPIN's iterations checked
    on validation: every `eval_every` steps of each iteration and at its end (spinlm.stages.train);
    none without train.eval_every."""
    out, offset = [], 0
    for n in per_iteration if eval_every else []:
        out += [offset + k for k in range(1, n + 1) if k % eval_every == 0 or k == n]
        offset += n
    return out


def sft_for_steps(stage: Stage, where: Path, start: str, data: Checked, cfg: Config, per_iteration: list[int]) -> None:
    """where/model: `start` fine-tuned on the real responses for the steps of SPIN's iterations
    together (`per_iteration`), each of as many examples as a SPIN step has pairs (train.batch_size x
    train.gradient_accumulation_steps per process; sft.learning_rate, no early stopping);
    where/metrics.json: its metrics.

    Selected as SPIN is, so that SPIN's selection does not flatter it: with train.eval_every and
    validation data, checked on the validation data at the steps SPIN checked (every train.eval_every
    steps of each iteration and at its end), with the metric SPIN's checks and RUN/best use
    (spinlm.metrics.heldout_metric), the best checked weights kept (a strict improvement, as SPIN's);
    without, the last weights, as SPIN keeps. Like RUN/best, which may choose the start over every
    iteration, the report and the run's sentence set it beside the start on validation
    (spinlm.summary.select_baseline). train.patience is not applied: the baseline takes every step."""
    baseline = copy.deepcopy(cfg)
    baseline.sft.batch_size, baseline.sft.patience = cfg.train.batch_size, 0
    baseline.sft.gradient_accumulation_steps = accumulation = cfg.train.gradient_accumulation_steps
    steps = sum(per_iteration)
    per_step = cfg.train.batch_size * accumulation * dist.world()
    baseline.sft.epochs = max(1, math.ceil(steps * per_step / max(len(data.train), 1)))
    checks = spin_check_steps(per_iteration, cfg.train.eval_every) if data.val else []
    stage(where.name, where / "model",
          lambda out: sft(start, data.train, data.val, out, baseline, max_steps=steps, check_at=checks))
    evaluate_stage(stage, str(where / "model"), where, data, cfg, pairs=None, beta=None)
