"""The self-play loop: generate -> score -> train -> evaluate, T times, resumable.

    spinlm run CONFIG.yaml [--section.key=value ...]

Iteration t starts from, and uses as reference, the model p_t of iteration t-1 (for t = 0:
the SFT model). It trains on the pairs generated in the last `spin.mix_window` iterations,
all scored under p_t. Every stage writes to a temporary path, renames it into place and
then writes a `.done` marker; a re-run skips what is done and redoes the rest.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .cards import write_run_cards
from .config import Config
from .data import Example
from .evaluate import evaluate
from .generate import generate_file
from .io import read_json, read_jsonl, write_main
from .modeling import use_deterministic
from .rundir import Stage, open_run, release_lock, summarize
from .score import score_files
from .sft import sft
from .train import train
from .validate import check, report

log = logging.getLogger("spinlm")


def run(cfg: Config, force: bool = False) -> Path:
    """Run (or resume) the whole loop; return the run directory."""
    data = check(cfg)  # everything `spinlm validate` checks, before the run directory is touched
    run_dir = open_run(cfg, force)
    log.info("validated:\n%s", report(data))
    use_deterministic(cfg.run.deterministic)
    train_ex, val_ex, eval_ex = data.train, data.val, data.held
    stage = Stage(run_dir)
    model = cfg.model.name_or_path
    if cfg.sft.enabled:
        stage("sft", run_dir / "sft" / "model", lambda out: sft(model, train_ex, val_ex or eval_ex, out, cfg))
        model = str(run_dir / "sft" / "model")
    evaluate_stage(stage, model, run_dir / "sft", eval_ex, cfg, pairs=None, beta=None)
    for t in range(cfg.spin.iterations):
        it = run_dir / f"iteration-{t}"
        stage("generate", it / "generations.jsonl", lambda out: generate_file(model, train_ex, out, cfg, t))
        window = [run_dir / f"iteration-{s}" / "generations.jsonl" for s in range(max(0, t - cfg.spin.mix_window + 1), t + 1)]
        stage("score", it / "pairs.jsonl", lambda out: score_files(model, window, out, cfg))
        if eval_ex and cfg.eval.enabled:
            stage("generate-eval", it / "eval-generations.jsonl",
                  lambda out: generate_file(model, eval_ex, out, cfg, t, desc="generate held-out"))
            stage("score-eval", it / "eval-pairs.jsonl",
                  lambda out: score_files(model, [it / "eval-generations.jsonl"], out, cfg, desc="score held-out"))
        stage("train", it / "model", lambda out: train(model, it / "pairs.jsonl", out, cfg, t))
        model = str(it / "model")
        pairs = read_jsonl(it / "eval-pairs.jsonl") if (it / "eval-pairs.jsonl").exists() else None
        evaluate_stage(stage, model, it, eval_ex, cfg, pairs, cfg.per_iteration("beta", t))
        write_run_cards(run_dir)  # README.md model cards of the models so far (`spinlm report` adds plots)
    summarize(run_dir, cfg)
    release_lock(run_dir / ".lock")
    return run_dir


def evaluate_stage(stage: Stage, model: str, where: Path, examples: list[Example], cfg: Config,
                   pairs: list[dict] | None, beta: float | None) -> None:
    """where/metrics.json: held-out metrics of `model`, plus its training log if it has one."""
    if not (examples and cfg.eval.enabled):
        return
    training = read_json(Path(model) / "spinlm_train.json") or read_json(Path(model) / "spinlm_sft.json")
    stage("evaluate", where / "metrics.json", lambda out: write_main(out, {
        "eval": evaluate(model, examples, cfg, pairs, beta, outputs=where / "eval-outputs.jsonl"),
        "train": training}))
