"""The embedded CPU demo: the whole method on a tiny model, with no network.

    spinlm demo [--out runs/demo] [--section.key=value ...]

Builds the verifiable task (spinlm.demo.task) and a tokenizer + tiny Llama
(spinlm.demo.build) under OUT, fine-tunes it to a held-out plateau, then runs the SPIN
loop with the same code as `spinlm run`. Re-running resumes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from spinlm import config
from spinlm.demo.build import build_tiny
from spinlm.demo.task import write_splits
from spinlm.io import finish, is_done, produce
from spinlm.loop import run

log = logging.getLogger("spinlm")

# Sized so that `make demo` finishes in under 5 minutes on a 2-core CPU, install included (issue 31): 2000
# training problems and a 0.45M-parameter Llama. SFT plateaus (early stopping) after ~50 s at ~0.7 greedy test
# accuracy, with 60-70% of SPIN's pairs dead (sample = real response). Until 2026-12-07 the demo had 5000
# problems and hidden 192 x 3 layers (1.4M): SFT took 200-260 s and plateaued at 0.87-0.97, with 88-98% dead pairs.
TASK = {"seed": 0, "n_train": 2000, "n_val": 200, "n_test": 300}
MODEL = {"hidden_size": 128, "num_layers": 2, "num_heads": 4, "max_position_embeddings": 128, "seed": 0}


def defaults(out: Path) -> dict:
    """The demo's settings; any of them can be overridden with --section.key=value."""
    data = out / "data"
    return {
        "run": {"dir": str(out / "run"), "seed": 0, "log_every": 25},
        "model": {"name_or_path": str(out / "base")},
        "data": {"train": str(data / "train.jsonl"), "val": str(data / "val.jsonl"),
                 "eval": str(data / "test.jsonl"), "max_prompt_length": 64, "max_length": 96},
        # SFT to a plateau (the paper's starting point): early stopping on validation NLL, patience 2
        "sft": {"enabled": True, "learning_rate": 1e-3, "epochs": 40, "batch_size": 32, "patience": 2,
                "warmup_ratio": 0.05},
        "generation": {"max_new_tokens": 16, "batch_size": 128},
        # a micro-batch of this 0.45M model holds a few MB of activations: one forward per micro-batch,
        # not per packed row (one per row was 1.2-1.6x slower in SFT here; it is for real models' memory)
        "packing": {"max_tokens": 256, "backward_per_row": False},
        # picked by `python -m spinlm.demo.sweep` on validation accuracy (RESULTS.md): the paper's beta and
        # optimizer, a 5x higher learning rate, and the real responses' NLL as a regulariser
        "spin": {"iterations": 3, "mix_window": 2, "beta": 0.1, "loss_type": "sigmoid", "sft_weight": 1.0},
        "train": {"learning_rate": 5e-5, "optimizer": "rmsprop", "epochs": 1, "batch_size": 32,
                  "warmup_ratio": 0.1, "eval_every": 50},
        "eval": {"checker": "spinlm.demo.task:check_example", "batch_size": 100, "continued_sft": True},
    }


def _build_inputs(out: Path, task: dict = TASK, model: dict = MODEL) -> None:
    """Task data and base model, each built once (temp dir, rename, marker)."""
    data, base = out / "data", out / "base"
    if not is_done(data):
        produce(data, lambda tmp: write_splits(tmp, **task))
        finish(data, {"task": task})
    if not is_done(base):
        texts = [v for line in (data / "train.jsonl").read_text(encoding="utf-8").splitlines()
                 for k, v in json.loads(line).items() if k in ("prompt", "response")]
        produce(base, lambda tmp: build_tiny(tmp, texts, **model))
        finish(base, {"model": model})
        log.info("built the demo tokenizer and model in %s", base)


def demo(out: str, overrides: list[str], force: bool = False) -> Path:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = config.build(None, overrides, base=defaults(out_dir))
    config.validate(cfg)
    _build_inputs(out_dir)
    run_dir = run(cfg, force=force)
    print(f"\nrun directory: {run_dir}  (summary: {run_dir / 'summary.json'}, log: {run_dir / 'log.txt'})")
    return run_dir
