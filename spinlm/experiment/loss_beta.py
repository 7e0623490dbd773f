"""Loss choice and beta: the paper's logistic loss vs the reference code's hinge, at the paper's two
beta values, on the demo task, several seeds.

    spinlm experiment loss-beta [--out runs/experiment-loss-beta] [--seeds 0 1] [--iterations 2]

From one SFT start (the demo's), each (spin.loss_type, spin.beta) runs SPIN with the paper's
loss alone: spin.sft_weight 0 and no in-iteration checks (train.eval_every 0), so that the last
weights of every iteration are what is measured; the rest is the demo's settings.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from spinlm.experiment.common import (
    Setup,
    band,
    base_config,
    build_inputs,
    fine_tune,
    fmt,
    run_all,
    spin_config,
    summary,
    train_log,
    write_results,
)
from spinlm.rundir import RunLayout

LOSSES = ["sigmoid", "hinge"]
BETAS = [0.1, 5.0]
PAPER_LOSS = {"sft_weight": 0.0}
NO_CHECKS = {"eval_every": 0}


def name(loss: str, beta: float, seed: int) -> str:
    return f"{loss}-beta{beta:g}-seed{seed}"


def experiment(setup: Setup) -> dict:
    out = setup.out
    base = base_config(setup)
    build_inputs(setup)
    start = fine_tune(base, base["model"]["name_or_path"], out / "sft")
    jobs = {name(loss, beta, s): spin_config(base, start, out / "runs" / name(loss, beta, s), s, setup.overrides,
                                             spin={"loss_type": loss, "beta": beta, **PAPER_LOSS}, train=NO_CHECKS)
            for s, loss, beta in itertools.product(setup.seeds, LOSSES, BETAS)}
    failed = run_all(out / "runs", jobs, setup.workers)
    results = collect(jobs, failed)
    write_results(out, results, table(results))
    plot(results, out / "loss-beta.png")
    return results


def collect(jobs: dict[str, dict], failed: list[str]) -> dict:
    runs = {}
    for run_name, cfg in jobs.items():
        if run_name in failed:
            continue
        run_dir = Path(cfg["run"]["dir"])
        entries = summary(run_dir)
        models = RunLayout(run_dir).names(cfg["spin"]["iterations"])
        per = []
        for m in models:
            metrics, final = entries[m]["metrics"], train_log(run_dir / m / "model").get("final", {})
            per.append({"model": m, "test_accuracy": metrics.get("accuracy"), "test_nll": metrics.get("nll_per_token"),
                        "val_accuracy": entries[m]["val_metrics"].get("accuracy"),
                        "reward_accuracy": metrics.get("reward_accuracy"),
                        "reward_margin": metrics.get("reward_margin"), "train_loss": final.get("loss"),
                        "real_logratio_per_token": final.get("logratio/real_per_token")})
        runs[run_name] = {"loss_type": cfg["spin"]["loss_type"], "beta": cfg["spin"]["beta"],
                          "seed": cfg["run"]["seed"], "models": per}
    return {"runs": runs, "failed": failed}


def _settings(results: dict) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for r in results["runs"].values():
        groups.setdefault((r["loss_type"], r["beta"]), []).append(r)
    return groups


def table(results: dict) -> str:
    groups = _settings(results)
    if not groups:
        return "No run finished; see the logs in runs/.\n"
    any_run = next(iter(groups.values()))[0]
    models = [m["model"] for m in any_run["models"]]
    seeds = sorted({r["seed"] for r in results["runs"].values()})
    lines = [f"{len(results['runs'])} runs: loss {LOSSES} x beta {BETAS} x seeds {seeds}; the paper's loss alone "
             "(sft_weight 0, no in-iteration checks); mean ± sd over seeds. Test accuracy is greedy exact-answer "
             "accuracy; reward accuracy and margin are on held-out pairs against the iteration's reference; the "
             "last two columns are the last logging window of the last iteration's training.", "",
             "| loss | beta | " + " | ".join(f"test acc {m}" for m in models) + " | test NLL/token (last) | "
             "reward acc (last) | margin (last) | train loss (last) | real log-ratio/token (last) |",
             "|---|---|" + "---|" * (len(models) + 5)]
    for (loss, beta), rs in groups.items():
        col = lambda i, key, d=3: fmt([r["models"][i][key] for r in rs], d)  # noqa: E731
        lines.append(f"| {loss} | {beta:g} | " + " | ".join(col(i, "test_accuracy") for i in range(len(models)))
                     + f" | {col(-1, 'test_nll', 4)} | {col(-1, 'reward_accuracy')} | {col(-1, 'reward_margin', 4)} | "
                     f"{col(-1, 'train_loss', 4)} | {col(-1, 'real_logratio_per_token', 4)} |")
    if results["failed"]:
        lines += ["", f"Failed runs (see their logs): {', '.join(results['failed'])}"]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    from spinlm.report.plots import figure

    groups = _settings(results)
    if not groups:
        return
    fig, (acc, nll) = figure(1, 2)
    for (loss, beta), rs in groups.items():
        xs = list(range(len(rs[0]["models"])))
        for ax, key in ((acc, "test_accuracy"), (nll, "test_nll")):
            band(ax, xs, [[r["models"][i][key] for r in rs] for i in xs], f"{loss}, beta {beta:g}")
    labels = [m["model"] for m in next(iter(groups.values()))[0]["models"]]
    for ax, title in ((acc, "test accuracy"), (nll, "test NLL per token (real responses)")):
        ax.set_xticks(range(len(labels)), labels, fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)
