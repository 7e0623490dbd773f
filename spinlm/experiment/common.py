"""Parts every experiment shares: the demo's inputs, an SFT start, `spinlm run`s side by side,
mean and spread over seeds, and figures."""

from __future__ import annotations

import copy
import json
import logging
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from spinlm import config
from spinlm.data import load_examples
from spinlm.demo.run import MODEL, TASK, _build_inputs, defaults
from spinlm.errors import UserError
from spinlm.io import finish, is_done, produce, read_json
from spinlm.stages.sft import sft

log = logging.getLogger("spinlm")

# --quick: the same experiment on a task and model small enough for a test (about a minute each)
QUICK_TASK = {"seed": 0, "n_train": 240, "n_val": 40, "n_test": 40}
QUICK_MODEL = {"hidden_size": 48, "num_layers": 2, "num_heads": 4, "max_position_embeddings": 128, "seed": 0}


@dataclass
class Setup:
    """What the `spinlm experiment` command line says."""

    out: Path
    seeds: list[int]
    iterations: int
    workers: int = 2
    quick: bool = False
    overrides: list[str] = field(default_factory=list)  # --section.key=value for every SPIN run

    def demo_dir(self) -> Path:
        return self.out / "demo"


def base_config(setup: Setup) -> dict:
    """The demo's settings (docs/demo.md), shrunk with --quick."""
    cfg = defaults(setup.demo_dir())
    cfg["run"]["progress"] = False
    cfg["spin"]["iterations"] = setup.iterations
    if setup.quick:
        cfg["sft"].update({"epochs": 6, "patience": 0})
        cfg["train"]["eval_every"] = 4
        cfg["eval"]["batch_size"] = 40
    return cfg


def build_inputs(setup: Setup, task: dict | None = None) -> None:
    """The demo task's splits (`task`'s sizes, default the demo's) and its tokenizer + untrained
    Llama under OUT/demo (built once)."""
    _build_inputs(setup.demo_dir(), task or (QUICK_TASK if setup.quick else TASK),
                  QUICK_MODEL if setup.quick else MODEL)


def resolved(base: dict, overrides: list[str] | None = None) -> config.Config:
    cfg = config.build(None, overrides or [], base=base)
    config.validate(cfg)
    return cfg


def fine_tune(cfg_dict: dict, model: str | Path, out: Path, val: bool = True) -> Path:
    """`model` fine-tuned on cfg's training data with cfg's sft section, into `out` (once: temp dir,
    rename, marker; a killed one resumes from its checkpoints). With `val`, early stopping on the
    validation data keeps the best model; without, the last one is kept."""
    if is_done(out):
        return out
    cfg = resolved(cfg_dict)
    d = cfg.data
    train = load_examples(d.train, format=d.format, turn=d.turn)
    held = load_examples(d.val, format=d.format, turn=d.turn) if val else []
    info = produce(out, lambda tmp: sft(str(model), train, held, tmp, cfg))
    finish(out, {"stage": "sft", "info": info})
    return out


def spin_config(base: dict, start: Path, run_dir: Path, seed: int, overrides: list[str], **sections: dict) -> dict:
    """A `spinlm run` config from the SFT model `start` (no SFT of its own): base, then the
    experiment's `sections`, then the user's --section.key=value flags."""
    cfg = copy.deepcopy(base)
    cfg["run"].update({"dir": str(run_dir), "seed": seed, "progress": False})
    cfg["model"]["name_or_path"] = str(start)
    cfg["sft"]["enabled"] = False
    for section, values in sections.items():
        cfg[section].update(values)
    return resolved(cfg, overrides).to_dict()


def run_one(cfg: dict, path: Path, threads: int) -> int:
    """One `spinlm run` in its own process; its output goes to PATH.log."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    with open(path.with_suffix(".log"), "w") as out:
        return subprocess.run([sys.executable, "-m", "spinlm", "run", str(path)], env=env, stdout=out,
                              stderr=subprocess.STDOUT).returncode


def run_all(where: Path, jobs: dict[str, dict], workers: int) -> list[str]:
    """Run each named config as `spinlm run` (WHERE/NAME.yaml, log WHERE/NAME.log), `workers` at
    a time (one thread each when several); return the names that failed. A finished run is only
    re-checked: re-running an experiment resumes it."""
    threads = 1 if workers > 1 else (os.cpu_count() or 1)
    names = list(jobs)
    log.info("running %d spinlm runs, %d at a time: %s", len(names), workers, ", ".join(names))
    with ThreadPoolExecutor(max(workers, 1)) as pool:
        codes = list(pool.map(lambda n: run_one(jobs[n], where / f"{n}.yaml", threads), names))
    failed = [n for n, c in zip(names, codes) if c != 0]
    for name in failed:
        log.error("run %s failed: see %s", name, where / f"{name}.log")
    return failed


def summary(run_dir: Path) -> dict[str, dict]:
    """A finished run's summary.json entries by model name."""
    entries = read_json(run_dir / "summary.json")
    if entries is None:
        raise UserError(f"{run_dir / 'summary.json'}: missing: the run did not finish (see its log)")
    return {e["name"]: e for e in entries}


def train_log(model_dir: Path) -> dict:
    return read_json(model_dir / "spinlm_train.json") or {}


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def fmt(values: list[float], digits: int = 3) -> str:
    """'mean ± sd' over seeds; '-' when there is nothing."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    m, s = mean_sd(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}" if len(values) > 1 else f"{m:.{digits}f}"


def write_results(out: Path, results: dict, markdown: str) -> None:
    """OUT/results.json and OUT/results.md (printed too)."""
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown)
    print(markdown)
    print(f"wrote {out / 'results.md'}, {out / 'results.json'}")


def band(ax, xs: list, per_seed: list[list[float]], label: str, marker: str = "o") -> None:
    """Mean over seeds with a ±1 sd band."""
    means = [statistics.mean(v) for v in per_seed]
    sds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in per_seed]
    ax.plot(xs, means, marker=marker, label=label)
    ax.fill_between(xs, [m - s for m, s in zip(means, sds)], [m + s for m, s in zip(means, sds)], alpha=0.2)
