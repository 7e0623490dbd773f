"""The demo task's SPIN settings sweep, selected on validation, reported on test.

    python -m spinlm.demo.sweep [--out runs/sweep] [--workers 2] [--iterations 2] [--seeds 0 1]

Grid: spin.beta in {0.1, 1, 5} x train.learning_rate in {1e-5, 5e-5} x spin.sft_weight in
{0, 1} x spin.drop_dead_pairs in {false, true} x run.seed in the seeds: every configuration
runs `iterations` SPIN iterations from the same plateaued SFT model (built once, as the demo
builds it). Continued SFT at equal steps is the baseline (one run per seed). A configuration
is chosen by its mean validation accuracy only (each run's iteration chosen on validation);
the table reports every configuration on the test split, at that same iteration. Results: OUT/results.md and
OUT/results.json. Each run is an ordinary run directory, so an interrupted sweep resumes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from spinlm import config
from spinlm.demo.run import _build_inputs, defaults
from spinlm.experiment.common import run_one
from spinlm.io import read_json

GRID = {"beta": [0.1, 1.0, 5.0], "learning_rate": [1e-5, 5e-5], "sft_weight": [0.0, 1.0],
        "drop_dead_pairs": [False, True]}


def _config(base: dict, sft_model: Path, run_dir: Path, iterations: int, seed: int, **knobs) -> dict:
    cfg = json.loads(json.dumps(base))
    cfg["run"].update({"dir": str(run_dir), "seed": seed, "progress": False})
    cfg["model"]["name_or_path"] = str(sft_model)
    cfg["sft"]["enabled"] = False
    cfg["spin"].update({"iterations": iterations, "beta": knobs["beta"], "sft_weight": knobs["sft_weight"],
                        "drop_dead_pairs": knobs["drop_dead_pairs"]})
    cfg["train"]["learning_rate"] = knobs["learning_rate"]
    cfg["eval"]["continued_sft"] = knobs.get("continued_sft", False)
    return cfg


def _name(k: dict) -> str:
    return (f"beta{k['beta']:g}-lr{k['learning_rate']:g}-sftw{k['sft_weight']:g}-"
            f"{'drop' if k['drop_dead_pairs'] else 'keep'}")


def sweep(out: Path, workers: int, iterations: int, seeds: list[int]) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    base = defaults(out / "demo")
    _build_inputs(out / "demo")
    # the plateaued SFT model, built by the demo's own settings (one SPIN iteration comes with it)
    sft_cfg = json.loads(json.dumps(base))
    sft_cfg["run"].update({"dir": str(out / "sft-run"), "progress": False})
    sft_cfg["spin"]["iterations"] = 1
    sft_cfg["eval"]["continued_sft"] = False
    config.validate(config.build(None, None, base=sft_cfg))
    assert run_one(sft_cfg, out / "sft-run.yaml",
                   threads=os.cpu_count() or 1) == 0, f"SFT run failed: see {out / 'sft-run.log'}"
    sft_model = out / "sft-run" / "sft" / "model"
    jobs = []
    for seed, values in itertools.product(seeds, itertools.product(*GRID.values())):
        knobs = dict(zip(GRID, values))
        paper = knobs == {"beta": 0.1, "learning_rate": 1e-5, "sft_weight": 0.0, "drop_dead_pairs": False}
        name = f"{_name(knobs)}-seed{seed}"
        cfg = _config(base, sft_model, out / "runs" / name, iterations, seed, continued_sft=paper, **knobs)
        jobs.append((name, knobs, seed, cfg))
    (out / "runs").mkdir(exist_ok=True)
    with ThreadPoolExecutor(workers) as pool:
        codes = list(pool.map(lambda j: run_one(j[3], out / "runs" / f"{j[0]}.yaml", threads=1), jobs))
    failed = [j[0] for j, c in zip(jobs, codes) if c != 0]
    results = collect(out, jobs, failed)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(table(results, iterations, seeds))
    print(table(results, iterations, seeds))
    return results


def collect(out: Path, jobs: list, failed: list[str]) -> dict:
    runs = {}
    for name, knobs, seed, _ in jobs:
        if name in failed:
            continue
        summary = read_json(out / "runs" / name / "summary.json")
        entries = {e["name"]: e for e in summary}
        spin = [e for e in summary if e["name"].startswith("iteration-")]
        chosen = max(spin, key=lambda e: (e["val_metrics"]["accuracy"], -spin.index(e)))  # on validation only
        runs[name] = {"knobs": knobs, "seed": seed, "sft_val": entries["sft"]["val_metrics"]["accuracy"],
                      "sft_test": entries["sft"]["metrics"]["accuracy"],
                      "chosen_iteration": chosen["name"], "chosen_val": chosen["val_metrics"]["accuracy"],
                      "chosen_test": chosen["metrics"]["accuracy"], "last_val": spin[-1]["val_metrics"]["accuracy"],
                      "last_test": spin[-1]["metrics"]["accuracy"],
                      "continued_sft": ({"val": entries["continued-sft"]["val_metrics"]["accuracy"],
                                         "test": entries["continued-sft"]["metrics"]["accuracy"]}
                                        if "continued-sft" in entries else None)}
    return {"runs": runs, "failed": failed}


def _mean_spread(values: list[float]) -> str:
    if not values:
        return "-"
    spread = (max(values) - min(values)) / 2 if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {spread:.3f}"


def table(results: dict, iterations: int, seeds: list[int]) -> str:
    runs = results["runs"]
    configs: dict[str, list[dict]] = {}
    for name, r in runs.items():
        configs.setdefault(_name(r["knobs"]), []).append(r)
    ranked = sorted(configs.items(), key=lambda kv: -statistics.mean(r["chosen_val"] for r in kv[1]))
    sft = [r["sft_test"] for r in runs.values()][:1]
    cont = [r["continued_sft"] for r in runs.values() if r["continued_sft"]]
    lines = [f"{len(runs)} runs ({len(configs)} configurations x seeds {seeds}), {iterations} SPIN iterations each; "
             f"mean ± half-range over seeds. Ranked by validation accuracy at each run's iteration chosen on "
             f"validation (the selection criterion); test columns are reported, not used to choose.", "",
             f"Start (SFT, plateaued): test accuracy {sft[0] if sft else '-'}; continued SFT at equal steps: test "
             f"{_mean_spread([c['test'] for c in cont])}, validation {_mean_spread([c['val'] for c in cont])}.", "",
             "| rank | beta | lr | sft_weight | dead pairs | val acc (chosen it.) | test acc (chosen it.) | "
             "test acc (last it.) | iteration chosen on val |", "|---|---|---|---|---|---|---|---|---|"]
    for rank, (name, rs) in enumerate(ranked, 1):
        k = rs[0]["knobs"]
        lines.append(f"| {rank} | {k['beta']:g} | {k['learning_rate']:g} | {k['sft_weight']:g} | "
                     f"{'drop' if k['drop_dead_pairs'] else 'keep'} | {_mean_spread([r['chosen_val'] for r in rs])} | "
                     f"{_mean_spread([r['chosen_test'] for r in rs])} | {_mean_spread([r['last_test'] for r in rs])} | "
                     f"{', '.join(r['chosen_iteration'] for r in rs)} |")
    if results["failed"]:
        lines += ["", f"Failed runs (see their logs): {', '.join(results['failed'])}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m spinlm.demo.sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/sweep")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--iterations", type=int, default=2)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    a = p.parse_args(argv)
    sweep(Path(a.out), a.workers, a.iterations, a.seeds)


if __name__ == "__main__":
    main()
