"""The SPIN family side by side (issue 19): SPIN, SPIN + NLL, T-SPIN, SPACE and SPPO-hard against
continued SFT at equal steps, in the data-limited regime of `spinlm experiment regime` and on
the demo task.

    spinlm experiment family [--out runs/experiment-family] [--seeds 0 1 2] [--iterations 3]

Per task (OUT/regime/, OUT/demo-task/), one SFT start: the regime's (the best epoch of a 40-epoch
SFT curve on 400 problems) and the demo's (2000 problems, early stopping on validation NLL).
From it, per seed, each candidate setting of each objective in FAMILY (the papers' defaults; the
paper's loss alone: no NLL term except in spin+nll, no in-iteration checks) for the iterations
asked, and for every run and iteration t continued SFT for as many optimizer steps as the run's
iterations 0..t took (spin-vs-sft's baseline; the runs of a seed whose iterations took the same
steps share one, which is the same model for each: see baseline_holders), so each difference is
paired on seed and steps. Each objective's setting is chosen on validation (mean validation accuracy
after the last iteration over seeds); so is the
best objective. Test numbers, with paired objective - continued SFT differences per seed, are
reported for the chosen settings, and for every candidate as well (marked), never chosen on test.

--quick: the regime's tiny task only, three objectives (spin, tspin, space), a test of the
machinery. Writes OUT/results.{md,json} and OUT/family.png; re-running resumes.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import statistics
from pathlib import Path

from spinlm.experiment import regime, spin_vs_sft
from spinlm.experiment.common import (
    Setup,
    band,
    base_config,
    build_inputs,
    fine_tune,
    run_all,
    spin_config,
    write_results,
)
from spinlm.loop import iteration_steps

PAPER_LOSS = {"sft_weight": 0.0}
FAMILY = {  # objective -> candidate -> spin section over the demo's (chosen on validation per objective)
    "spin": {"beta0.1": {"beta": 0.1, **PAPER_LOSS}, "beta1": {"beta": 1.0, **PAPER_LOSS}},
    "spin+nll": {"beta0.1-nll1": {"beta": 0.1, "sft_weight": 1.0}},  # iterative RPO's alpha 1; the demo's loss
    "tspin": {"alpha1-hist0.1": {"objective": "tspin", "tspin_alpha": 1.0, "tspin_history_weight": 0.1,
                                 **PAPER_LOSS}},
    "space": {"mu1": {"objective": "space", "space_mu": 1.0, **PAPER_LOSS}},
    "sppo_hard": {"beta1": {"objective": "sppo_hard", "beta": 1.0, **PAPER_LOSS}},
}
QUICK_FAMILY = ("spin", "tspin", "space")  # their first candidate each
TASKS = ("regime", "demo-task")


def experiment(setup: Setup) -> dict:
    tasks = TASKS[:1] if setup.quick else TASKS
    results = {"tasks": {task: compare(dataclasses.replace(setup, out=setup.out / task), task) for task in tasks}}
    write_results(setup.out, results, table(results))
    plot(results, setup.out / "family.png")
    return results


def candidates(quick: bool) -> dict[str, dict]:
    """Job setting name (OBJECTIVE=CANDIDATE) -> spin section."""
    if quick:
        return {f"{o}={next(iter(FAMILY[o]))}": next(iter(FAMILY[o].values())) for o in QUICK_FAMILY}
    return {f"{o}={c}": section for o, cs in FAMILY.items() for c, section in cs.items()}


def compare(setup: Setup, task: str) -> dict:
    """One task: its start, every objective's runs and baselines, the choices on validation."""
    if task == "regime":
        base, start = regime.data_limited_start(setup)
    else:
        base = base_config(setup)
        build_inputs(setup)
        start = fine_tune(base, base["model"]["name_or_path"], setup.out / "sft")
    jobs = {}
    for seed in setup.seeds:
        for i, (name, spin) in enumerate(candidates(setup.quick).items()):
            train = {"eval_every": 0}
            if task == "regime" and not setup.quick:
                train.update(regime.PAPER_EPOCHS)  # as `spinlm experiment regime`: 2 epochs of 400 prompts
            jobs[f"{name}-seed{seed}"] = spin_config(base, start, setup.out / "runs" / f"{name}-seed{seed}", seed,
                                                     setup.overrides, spin=copy.deepcopy(spin), train=train,
                                                     eval={"continued_sft": i == 0})  # the seed's first run trains it
    failed = run_all(setup.out / "runs", jobs, setup.workers)
    holders = baseline_holders(jobs, failed)
    for holder in dict.fromkeys(holders.values()):
        spin_vs_sft.baselines(holder, start, jobs[holder.name])
    by_setting = regime.by_setting_of(jobs, failed, holders)
    chosen = {}
    for objective in dict.fromkeys(s.split("=", 1)[0] for s in by_setting):
        choice, last_val = regime.choose({s: rs for s, rs in by_setting.items() if s.split("=", 1)[0] == objective})
        chosen[objective] = {"setting": choice, "val_accuracy_last": last_val}
    best, _ = regime.choose({c["setting"]: by_setting[c["setting"]] for c in chosen.values() if c["setting"]})
    return {"settings": by_setting, "chosen": chosen, "best": best, "failed": failed}


def baseline_holders(jobs: dict[str, dict], failed: list[str]) -> dict[str, Path]:
    """Finished job -> the run directory that holds its continued-SFT baselines. Continued SFT sees
    neither the objective nor the generated responses: from the same start, with the same seed,
    data, sft/train/eval settings and number of steps, it is the same model. So the runs that agree
    on all of these (and on every iteration's steps) share one set of baselines, trained in the
    first of them (the one that trained its last one in-run where it finished); the others' pairing
    on seed and steps is unchanged."""
    groups: dict[str, list[str]] = {}
    for name, cfg in jobs.items():
        if name in failed:
            continue
        run_dir = Path(cfg["run"]["dir"])
        rest = {k: v for k, v in cfg.items() if k not in ("spin", "run")}
        rest["eval"] = {k: v for k, v in cfg["eval"].items() if k != "continued_sft"}
        key = json.dumps([cfg["run"]["seed"], cfg["spin"]["iterations"], rest,
                          iteration_steps(run_dir, cfg["spin"]["iterations"])], sort_keys=True)
        groups.setdefault(key, []).append(name)
    holders = {}
    for names in groups.values():
        first = next((n for n in names if jobs[n]["eval"]["continued_sft"]), names[0])
        holders.update({n: Path(jobs[first]["run"]["dir"]) for n in names})
    return holders


def table(results: dict) -> str:
    lines = ["# The SPIN family at equal steps: which objective helps where", ""]
    for task, r in results["tasks"].items():
        picked = {c["setting"] for c in r["chosen"].values()}
        lines += [f"## {task}", "",
                  "Each objective's setting chosen on validation (mean validation accuracy after the last iteration): "
                  + "; ".join(f"{o}: **{c['setting']}** ("
                              f"{', '.join(f'{s} {v:.3f}' for s, v in c['val_accuracy_last'].items())})"
                              for o, c in r["chosen"].items())
                  + f". Best objective on validation: **{r['best']}**.", "",
                  *regime.COMPARISON_HEADER]
        for setting, rs in r["settings"].items():
            mark = " (best)" if setting == r["best"] else " (chosen)" if setting in picked else " (candidate)"
            lines += regime.setting_rows(setting + mark, rs)
        lines += [""]
        if r["failed"]:
            lines += [f"Failed runs (see their logs): {', '.join(r['failed'])}", ""]
    lines += ["Mean ± sample sd over seeds. *SPIN* columns are the objective's run; *SPIN - SFT (paired)*: per seed, "
              "its test accuracy minus the continued-SFT baseline's at the same optimizer steps. *(chosen)*: the "
              "objective's setting chosen on validation; *(candidate)*: not chosen, shown for completeness.", ""]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """family.png: per task, test accuracy after each iteration for each objective's chosen setting,
    and continued SFT at equal steps."""
    from spinlm.report.plots import figure

    tasks = results["tasks"]
    fig, axes = figure(1, len(tasks))
    for ax, (task, r) in zip(axes, tasks.items()):
        chosen = [c["setting"] for c in r["chosen"].values() if c["setting"]]
        for setting in chosen:
            rs = r["settings"][setting]
            its = range(len(rs[0]["iterations"]))
            xs = [0] + [statistics.mean(x["iterations"][t]["steps"] for x in rs) for t in its]
            per = [regime.per_t(rs, None, "", "test_accuracy")] + [regime.per_t(rs, t, "spin", "test_accuracy")
                                                                   for t in its]
            if all(per):
                band(ax, xs, per, setting)
        if chosen:  # the baseline of the first objective's runs (same start and step schedule)
            rs = r["settings"][chosen[0]]
            its = range(len(rs[0]["iterations"]))
            xs = [0] + [statistics.mean(x["iterations"][t]["steps"] for x in rs) for t in its]
            per = [regime.per_t(rs, None, "", "test_accuracy")] + [regime.per_t(rs, t, "continued_sft", "test_accuracy")
                                                                   for t in its]
            if all(per):
                band(ax, xs, per, f"continued SFT (steps of {chosen[0]})", marker="s")
        ax.set_xlabel("optimizer steps from the start")
        ax.set_title(f"{task}: test accuracy", fontsize=9)
        ax.legend(fontsize=6)
    fig.savefig(path, dpi=110)
