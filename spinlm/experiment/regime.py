"""The paper's regime at CPU scale: a data-limited SFT start where more SFT hurts, then SPIN
against continued SFT at equal steps (the paper's Table 5 setting: its SFT model had used its
data, and further SFT *lowered* its scores while SPIN raised them).

    spinlm experiment regime [--out runs/experiment-regime] [--seeds 0 1 2] [--iterations 3]

1. The demo task with far fewer training problems (REGIME_TASK: 400 instead of 2000), the demo's
   Llama. SFT for CURVE_EPOCHS epochs without stopping, validation NLL after every epoch: the
   curve that shows more SFT hurting (it falls, then rises). The start is that run's best
   epoch on validation NLL (SFT keeps the best weights).
2. From that start, per seed, SPIN with each of SETTINGS (the paper's loss at beta 0.1, 1 and 5;
   the demo's stabilizers), 2 epochs per iteration as in the paper, and, for every run and
   iteration t, continued SFT for as many optimizer steps as that run's iterations 0..t took
   (spin-vs-sft's baseline).
3. The setting is chosen on validation (mean validation accuracy over seeds after the last
   iteration); test numbers are reported for it, with paired SPIN - SFT differences per seed,
   and for every setting as well (marked), never chosen on test.
4. A same-capacity student for the teacher/KL test: the convergence experiment on the same
   data-limited task with the student the teacher's own shape (the theorem's assumption that
   the model class contains the data distribution), in OUT/same-capacity/.

Writes OUT/results.{md,json} and OUT/regime.png; re-running resumes.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
from pathlib import Path

from spinlm.demo.run import MODEL, _build_inputs
from spinlm.experiment import convergence, spin_vs_sft
from spinlm.experiment.common import (
    QUICK_MODEL,
    Setup,
    band,
    base_config,
    fine_tune,
    fmt,
    run_all,
    spin_config,
    write_results,
)
from spinlm.io import read_json

REGIME_TASK = {"seed": 0, "n_train": 400, "n_val": 200, "n_test": 300}
QUICK_REGIME_TASK = {"seed": 0, "n_train": 120, "n_val": 40, "n_test": 40}
CURVE_EPOCHS = 40
PAPER_LOSS = {"sft_weight": 0.0}
PAPER_EPOCHS = {"epochs": 2}
SETTINGS = {  # name -> config sections over the demo's (which are the "stabilized" ones)
    "beta0.1": {"spin": {"beta": 0.1, **PAPER_LOSS}, "train": {"eval_every": 0}},
    "beta1": {"spin": {"beta": 1.0, **PAPER_LOSS}, "train": {"eval_every": 0}},
    "beta5": {"spin": {"beta": 5.0, **PAPER_LOSS}, "train": {"eval_every": 0}},
    "stabilized": {"train": {"eval_every": 5}},  # the demo's sft_weight 1, beta 0.1; checks every 5 steps
}
QUICK_SETTINGS = ("beta1", "stabilized")


def data_limited_start(setup: Setup) -> tuple[dict, Path]:
    """(the base config, the SFT start): the data-limited task under OUT/demo, SFT for the whole
    curve without stopping early, its best epoch on validation NLL kept, in OUT/sft."""
    task = QUICK_REGIME_TASK if setup.quick else REGIME_TASK
    _build_inputs(setup.demo_dir(), task, QUICK_MODEL if setup.quick else MODEL)
    base = base_config(setup)
    curve_cfg = copy.deepcopy(base)
    epochs = 12 if setup.quick else CURVE_EPOCHS
    curve_cfg["sft"].update({"epochs": epochs, "patience": epochs})  # never stops early; keeps the best epoch
    return base, fine_tune(curve_cfg, base["model"]["name_or_path"], setup.out / "sft")


def experiment(setup: Setup) -> dict:
    out = setup.out
    task = QUICK_REGIME_TASK if setup.quick else REGIME_TASK
    base, start = data_limited_start(setup)
    jobs = {}
    settings = {k: SETTINGS[k] for k in QUICK_SETTINGS} if setup.quick else SETTINGS
    for seed in setup.seeds:
        for name, sections in settings.items():
            sections = copy.deepcopy(sections)
            sections.setdefault("eval", {})["continued_sft"] = True
            if not setup.quick:  # the paper's 2 epochs per iteration (a few steps on 400 prompts otherwise)
                sections["train"] = {**PAPER_EPOCHS, **sections.get("train", {})}
            jobs[f"{name}-seed{seed}"] = spin_config(base, start, out / "runs" / f"{name}-seed{seed}", seed,
                                                     setup.overrides, **sections)
    failed = run_all(out / "runs", jobs, setup.workers)
    for name, cfg in jobs.items():
        if name not in failed:
            spin_vs_sft.baselines(Path(cfg["run"]["dir"]), start, cfg)
    same = dataclasses.replace(setup, out=out / "same-capacity")
    same.out.mkdir(parents=True, exist_ok=True)
    kl = convergence.experiment(same, task=task, student={**(QUICK_MODEL if setup.quick else MODEL), "seed": 1})
    results = collect(jobs, failed, start, kl)
    write_results(out, results, table(results))
    plot(results, out / "regime.png")
    return results


def collect(jobs: dict[str, dict], failed: list[str], start: Path, kl: dict) -> dict:
    by_setting = by_setting_of(jobs, failed)
    chosen, last_val = choose(by_setting)
    info = read_json(start / "spinlm_sft.json") or {}  # the start's SFT run: validation NLL per epoch
    return {"curve": info.get("history", []), "sft_best_step": info.get("best_step"), "settings": by_setting,
            "chosen": chosen, "val_accuracy_last": last_val, "failed": failed,
            "same_capacity": {name: {"seed": r["seed"], "kl": {m["model"]: m["kl"] for m in r["models"]}}
                              for name, r in kl.get("runs", {}).items()}}


def by_setting_of(jobs: dict[str, dict], failed: list[str],
                  baseline_dirs: dict[str, Path] | None = None) -> dict[str, list[dict]]:
    """The finished runs (spin_vs_sft.collect's per-run results) grouped by setting: jobs are named
    SETTING-seedN."""
    by_setting: dict[str, list[dict]] = {}
    for name, r in spin_vs_sft.collect(jobs, failed, baseline_dirs)["seeds"].items():
        by_setting.setdefault(name.rsplit("-seed", 1)[0], []).append(r)
    return by_setting


def choose(by_setting: dict[str, list[dict]]) -> tuple[str | None, dict[str, float]]:
    """(the setting with the best mean validation accuracy after the last iteration, every
    setting's); ties go to the first in order. Test numbers never enter."""
    last_val = {s: statistics.mean(r["iterations"][-1]["spin"]["val_accuracy"] for r in rs)
                for s, rs in by_setting.items()
                if all(r["iterations"][-1]["spin"]["val_accuracy"] is not None for r in rs)}
    return (max(last_val, key=last_val.get) if last_val else None), last_val


def per_t(rs: list[dict], t: int | None, side: str, key: str) -> list[float]:
    pts = [r["start"] if t is None else r["iterations"][t][side] for r in rs]
    return [p[key] for p in pts if p[key] is not None]


COMPARISON_HEADER = ["| setting | after iteration | steps | SPIN test acc | continued SFT test acc | "
                     "SPIN - SFT (paired) | SPIN NLL/token | SFT NLL/token | SPIN val acc |",
                     "|---|---|---|---|---|---|---|---|---|"]


def setting_rows(label: str, rs: list[dict]) -> list[str]:
    """COMPARISON_HEADER's rows for one setting's runs (one per seed): the start, then per iteration
    mean ± sd over seeds and the paired SPIN - continued SFT test accuracy."""
    start_acc, start_nll = fmt(per_t(rs, None, "", "test_accuracy")), fmt(per_t(rs, None, "", "test_nll"), 4)
    lines = [f"| {label} | start | 0 | {start_acc} | {start_acc} | - | {start_nll} | {start_nll} | "
             f"{fmt(per_t(rs, None, '', 'val_accuracy'))} |"]
    for t in range(len(rs[0]["iterations"])):
        diff = [r["iterations"][t]["spin"]["test_accuracy"] - r["iterations"][t]["continued_sft"]["test_accuracy"]
                for r in rs if r["iterations"][t]["spin"]["test_accuracy"] is not None
                and r["iterations"][t]["continued_sft"]["test_accuracy"] is not None]
        steps = [r["iterations"][t]["steps"] for r in rs]
        lines.append(f"| {label} | {t} | {fmt(steps, 0)} | {fmt(per_t(rs, t, 'spin', 'test_accuracy'))} | "
                     f"{fmt(per_t(rs, t, 'continued_sft', 'test_accuracy'))} | {fmt(diff)} | "
                     f"{fmt(per_t(rs, t, 'spin', 'test_nll'), 4)} | "
                     f"{fmt(per_t(rs, t, 'continued_sft', 'test_nll'), 4)} | "
                     f"{fmt(per_t(rs, t, 'spin', 'val_accuracy'))} |")
    return lines


def table(results: dict) -> str:
    curve = results["curve"]
    lines = ["# The paper's regime at CPU scale: a data-limited start where more SFT hurts", "",
             "## 1. The SFT curve (validation NLL per token after every epoch)", ""]
    if curve:
        best = min(curve, key=lambda h: h["heldout_nll"])
        lines += ["| step | " + " | ".join(str(h["step"]) for h in curve) + " |",
                  "|---|" + "---|" * len(curve),
                  "| val NLL | " + " | ".join(f"{h['heldout_nll']:.3f}" for h in curve) + " |", "",
                  f"Best at step {best['step']} ({best['heldout_nll']:.4f}); the last epoch: "
                  f"{curve[-1]['heldout_nll']:.4f} (+{curve[-1]['heldout_nll'] - best['heldout_nll']:.4f}). "
                  "The start of every run below is the best epoch.", ""]
    lines += ["## 2. SPIN vs continued SFT at equal steps, per setting", "",
              f"Chosen on validation (mean validation accuracy after the last iteration): **{results['chosen']}** "
              f"({', '.join(f'{s} {v:.3f}' for s, v in results['val_accuracy_last'].items())}).", "",
              *COMPARISON_HEADER]
    for setting, rs in results["settings"].items():
        lines += setting_rows(setting + (" (chosen)" if setting == results["chosen"] else ""), rs)
    lines += ["", "Mean ± sample sd over seeds; *SPIN - SFT (paired)*: per seed, SPIN's test accuracy minus the "
              "continued-SFT baseline's at the same steps. Only the chosen row was chosen; the others are shown "
              "for completeness and were not selected on test.", "",
              "## 3. Same-capacity student: KL(teacher || model) per iteration", "",
              "The convergence experiment on this task with the student the teacher's shape (its own SFT "
              "start on the teacher's samples, the paper's loss alone); details in same-capacity/results.md. "
              "Nats per response, mean ± sd over seeds:", ""]
    same = list(results["same_capacity"].values())
    if same:
        names = list(same[0]["kl"])
        lines += ["| " + " | ".join(names) + " |", "|" + "---|" * len(names),
                  "| " + " | ".join(fmt([r["kl"].get(n) for r in same]) for n in names) + " |", ""]
    if results["failed"]:
        lines += [f"Failed runs (see their logs): {', '.join(results['failed'])}", ""]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    from spinlm.report.plots import figure

    fig, (curve_ax, acc_ax, nll_ax) = figure(1, 3)
    curve = results["curve"]
    if curve:
        curve_ax.plot([h["step"] for h in curve], [h["heldout_nll"] for h in curve], marker="o", markersize=3)
        curve_ax.set_xlabel("SFT optimizer steps")
        curve_ax.set_title("SFT: validation NLL per token", fontsize=9)
    for setting, rs in results["settings"].items():
        its = range(len(rs[0]["iterations"]))
        xs = [0] + [statistics.mean(r["iterations"][t]["steps"] for r in rs) for t in its]
        for ax, key in ((acc_ax, "test_accuracy"), (nll_ax, "test_nll")):
            per = [per_t(rs, None, "", key)] + [per_t(rs, t, "spin", key) for t in its]
            if all(per):
                band(ax, xs, per, f"SPIN {setting}")
    first = next(iter(results["settings"].values()), None)
    if first:
        its = range(len(first[0]["iterations"]))
        xs = [0] + [statistics.mean(r["iterations"][t]["steps"] for r in first) for t in its]
        for ax, key in ((acc_ax, "test_accuracy"), (nll_ax, "test_nll")):
            per = [per_t(first, None, "", key)] + [per_t(first, t, "continued_sft", key) for t in its]
            if all(per):
                band(ax, xs, per, "continued SFT (equal steps)", marker="s")
    for ax, title in ((acc_ax, "test accuracy"), (nll_ax, "test NLL per token")):
        ax.set_xlabel("optimizer steps from the start")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=6)
    fig.savefig(path, dpi=110)
