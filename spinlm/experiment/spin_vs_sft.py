"""SPIN vs continued SFT at equal steps (the paper's Table 5 claim: more SFT on the same data
stalls, SPIN keeps improving), on the demo task, several seeds.

    spinlm experiment spin-vs-sft [--out runs/experiment-spin-vs-sft] [--seeds 0 1 2] [--iterations 3]

One SFT start (the demo's: early stopping on validation NLL). Per seed, the demo's SPIN run
from it, and the baseline: the same start fine-tuned further on the same real responses for as
many optimizer steps (of train.batch_size examples) as SPIN iterations 0..t took together, for
every t, checked on validation where SPIN's iterations 0..t checked, its best checked weights kept
(the selection SPIN's in-iteration checks make). Each point is evaluated on the test and
validation splits.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

from spinlm.experiment.common import (
    Setup,
    band,
    base_config,
    build_inputs,
    fine_tune,
    fmt,
    mean_sd,
    resolved,
    run_all,
    spin_config,
    summary,
    write_results,
)
from spinlm.io import read_json
from spinlm.loop import iteration_steps, sft_for_steps
from spinlm.rundir import CONTINUED_SFT, Stage, iteration_name
from spinlm.summary import model_entry
from spinlm.validate import check

log = logging.getLogger("spinlm")


def experiment(setup: Setup) -> dict:
    out = setup.out
    base = base_config(setup)
    build_inputs(setup)
    start = fine_tune(base, base["model"]["name_or_path"], out / "sft")
    jobs = {f"seed{s}": spin_config(base, start, out / "runs" / f"seed{s}", s, setup.overrides,
                                    eval={"continued_sft": True}) for s in setup.seeds}
    failed = run_all(out / "runs", jobs, setup.workers)
    for name in jobs:
        if name not in failed:
            baselines(Path(jobs[name]["run"]["dir"]), start, jobs[name])
    results = collect(jobs, failed)
    write_results(out, results, table(results))
    plot(results, out / "spin-vs-sft.png")
    return results


def baselines(run_dir: Path, start: Path, cfg_dict: dict) -> None:
    """RUN/continued-sft-{t}: continued SFT for the steps of iterations 0..t, checked on validation
    where SPIN's iterations 0..t checked (spinlm.loop.sft_for_steps); the last one is
    RUN/continued-sft, which a run with eval.continued_sft trained already."""
    cfg = resolved(cfg_dict)
    per_iteration = iteration_steps(run_dir, cfg.spin.iterations)
    data = check(cfg)
    for t in range(len(per_iteration)):
        sft_for_steps(Stage(run_dir), run_dir / baseline_name(t, len(per_iteration)), str(start), data, cfg,
                      per_iteration[:t + 1])


def baseline_name(t: int, iterations: int) -> str:
    return CONTINUED_SFT if t == iterations - 1 else f"{CONTINUED_SFT}-{t}"


def _point(entry: dict, seconds: float) -> dict:
    m, v = entry["metrics"], entry["val_metrics"]
    return {"test_accuracy": m.get("accuracy"), "test_nll": m.get("nll_per_token"), "val_accuracy": v.get("accuracy"),
            "seconds": seconds}


def collect(jobs: dict[str, dict], failed: list[str], baseline_dirs: dict[str, Path] | None = None) -> dict:
    """Per seed: the start, then per iteration t the SPIN model and the equal-steps baseline (in
    the run's own directory, or `baseline_dirs[name]`'s where runs share their baselines)."""
    seeds = {}
    for name, cfg in jobs.items():
        if name in failed:
            continue
        run_dir = Path(cfg["run"]["dir"])
        baseline_dir = (baseline_dirs or {}).get(name, run_dir)
        entries = summary(run_dir)
        iterations = cfg["spin"]["iterations"]
        steps = list(itertools.accumulate(iteration_steps(run_dir, iterations)))
        spin_s = list(itertools.accumulate(sum(v for k, v in entries[iteration_name(t)]["seconds"].items()
                                               if k != "evaluate") for t in range(iterations)))
        rows = []
        for t in range(iterations):
            base_entry = model_entry(baseline_dir, baseline_name(t, iterations), cfg["model"]["name_or_path"])
            rows.append({"iteration": t, "steps": steps[t], "spin": _point(entries[iteration_name(t)], spin_s[t]),
                         "continued_sft": _point(base_entry, base_entry["seconds"].get("train", 0.0))})
        seeds[name] = {"seed": cfg["run"]["seed"], "start": _point(entries["sft"], 0.0), "iterations": rows,
                       "best": summary_best(run_dir)}
    return {"seeds": seeds, "failed": failed}


def summary_best(run_dir: Path) -> str | None:
    return (read_json(run_dir / "best.json") or {}).get("name")


def _column(results: dict, t: int | None, side: str, key: str) -> list[float]:
    out = []
    for r in results["seeds"].values():
        point = r["start"] if t is None else r["iterations"][t][side]
        if point[key] is not None:
            out.append(point[key])
    return out


def table(results: dict) -> str:
    seeds = list(results["seeds"].values())
    if not seeds:
        return "No run finished; see the logs in runs/.\n"
    iterations = len(seeds[0]["iterations"])
    lines = [f"SPIN vs continued SFT at equal optimizer steps: {len(seeds)} seeds "
             f"({', '.join(str(s['seed']) for s in seeds)}), "
             f"{iterations} SPIN iterations; mean ± sd over seeds. *Steps*: optimizer steps of SPIN iterations 0..t "
             "together, which the continued-SFT model also took (32 examples a step; a SPIN step also runs the 32 "
             "generated responses). Both are selected on validation alike: with train.eval_every, each SPIN iteration "
             "keeps its best checked weights, and continued SFT is checked at the same steps and keeps its best. "
             "*Seconds*: SPIN's generate + score + train time of iterations 0..t; continued SFT's training time.", "",
             f"Start (SFT): test accuracy {fmt(_column(results, None, '', 'test_accuracy'))}, "
             f"NLL/token {fmt(_column(results, None, '', 'test_nll'), 4)}.", "",
             "| after iteration | steps | SPIN test acc | continued SFT test acc | SPIN - SFT (paired) | "
             "SPIN val acc | SFT val acc | SPIN NLL/token | SFT NLL/token | SPIN s | SFT s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in range(iterations):
        steps = [r["iterations"][t]["steps"] for r in seeds]
        diff = [r["iterations"][t]["spin"]["test_accuracy"] - r["iterations"][t]["continued_sft"]["test_accuracy"]
                for r in seeds if r["iterations"][t]["spin"]["test_accuracy"] is not None]
        c = lambda side, key, d=3: fmt(_column(results, t, side, key), d)  # noqa: E731
        lines.append(f"| {t} | {steps[0] if len(set(steps)) == 1 else fmt(steps, 0)} | {c('spin', 'test_accuracy')} | "
                     f"{c('continued_sft', 'test_accuracy')} | "
                     f"{fmt(diff)} | {c('spin', 'val_accuracy')} | {c('continued_sft', 'val_accuracy')} | "
                     f"{c('spin', 'test_nll', 4)} | {c('continued_sft', 'test_nll', 4)} | {c('spin', 'seconds', 0)} | "
                     f"{c('continued_sft', 'seconds', 0)} |")
    lines += ["", "Chosen on validation by each run (RUN/best, the start included): "
              + ", ".join(f"seed {r['seed']}: {r['best']}" for r in seeds) + "."]
    if results["failed"]:
        lines += ["", f"Failed runs (see their logs): {', '.join(results['failed'])}"]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    from spinlm.report.plots import figure

    seeds = list(results["seeds"].values())
    if not seeds:
        return
    iterations = range(len(seeds[0]["iterations"]))
    xs = [0] + [mean_sd([r["iterations"][t]["steps"] for r in seeds])[0] for t in iterations]
    fig, (acc, nll) = figure(1, 2)
    for side, label in (("spin", "SPIN (after iteration t)"), ("continued_sft", "continued SFT, equal steps")):
        for ax, key in ((acc, "test_accuracy"), (nll, "test_nll")):
            per = [_column(results, None, "", key)] + [_column(results, t, side, key) for t in iterations]
            band(ax, xs, per, label)
    for ax, title in ((acc, "test accuracy (greedy, exact answer)"), (nll, "test NLL per token (real responses)")):
        ax.set_xlabel("optimizer steps from the SFT start")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)
