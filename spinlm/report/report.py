"""A run's report: README.md with the per-model table, a plain verdict and PNG plots; model cards.

    spinlm report RUN_DIR [--out RUN_DIR/report]

`report()` reads the run (spinlm.report.runs.load_run: RUN/summary.json, RUN/config.yaml, each
model's metrics.json and the generation stages' `.done` markers), draws its plots
(spinlm.report.plots: metrics.png, training.png, sft.png; they need matplotlib,
`pip install 'spinlm[report]'`), writes a README.md model card into every model directory of the
run (spinlm.report.cards) and then RUN/report/README.md: the verdict (did the model chosen on
validation, RUN/best's choice, improve on the SFT start?), the per-model table, the plots and the
per-iteration training and sampling tables.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from spinlm.report.cards import write_cards
from spinlm.report.plots import plot_metrics, plot_sft, plot_training, require_matplotlib
from spinlm.report.runs import finite, load_run
from spinlm.rundir import CONTINUED_SFT, SFT
from spinlm.summary import format_table, select_baseline, select_best

# (summary key, label, higher is better, number format) of the metrics the verdict compares.
VERDICT = (("accuracy", "Task accuracy", True, ".3f"), ("nll_per_token", "NLL per token", False, ".4f"))


# ---------------------------------------------------------------- the verdict

def verdict(entries: list[dict]) -> list[str]:
    """The verdict's lines. No model is picked by its test numbers: the model compared with the SFT
    start is the one chosen on validation (RUN/best's choice, spinlm.summary.select_best, the start
    included), beside the last iteration; the continued-SFT baseline, chosen the same way
    (select_baseline), is on lines of its own (it is no iteration)."""
    start = entries[0]["metrics"]
    iters = [e for e in entries[1:] if e["metrics"] and e["name"] != CONTINUED_SFT]
    if not start or not iters:
        return ["- No comparison: the SFT start and at least one iteration need held-out metrics "
                "(`eval.enabled` and `data.eval`)."]
    chosen, by_name = select_best(entries), {e["name"]: e for e in entries}
    lines = [_choice(chosen)]
    for key, label, higher, fmt in VERDICT:
        measured = [e for e in iters if finite(e["metrics"].get(key))]
        if not finite(start.get(key)) or not measured:
            lines.append(f"- **{label}**: not measured" + (" (no `eval.checker`)." if key == "accuracy" else "."))
            continue
        compared = [(f"chosen on validation ({chosen['name']}{', the start itself' if chosen['name'] == SFT else ''})",
                     by_name[chosen["name"]])] if chosen else []
        compared += [(f"last iteration ({measured[-1]['name']})", measured[-1])]
        parts = [_versus(label, e["metrics"].get(key), start[key], higher, fmt) for label, e in compared]
        lines.append(f"- **{label}** (held-out, {'higher' if higher else 'lower'} is better): SFT start "
                     f"{start[key]:{fmt}}; {'; '.join(parts)}.")
    baseline = next((e for e in entries if e["name"] == CONTINUED_SFT and e["metrics"]), None)
    return lines + (_baseline(baseline, chosen, select_baseline(entries), by_name) if baseline else [])


def _choice(chosen: dict | None) -> str:
    if not chosen:
        return ("- **No model was chosen**: the run has no validation data (`data.val`, `data.val_size`), and "
                "choosing on the held-out data would flatter the choice; only the last iteration is compared.")
    return (f"- **Chosen on validation** (RUN/best: validation {chosen['metric']}, the start included; the held-out "
            f"numbers below are reported, never used to choose): {chosen['name']} ({chosen['value']:.4f} vs the "
            f"start's {chosen['start_value']:.4f}).")


def _versus(label: str, value, start: float, higher: bool, fmt: str) -> str:
    if not finite(value):
        return f"{label} not measured"
    better = value > start if higher else value < start
    return f"{label} {value:{fmt}} ({value - start:+{fmt}}: {'improved' if better else 'no improvement'})"


def _baseline(baseline: dict, chosen: dict | None, own: dict | None, by_name: dict) -> list[str]:
    """The continued-SFT lines: its held-out numbers, its choice on validation (as RUN/best's, the start
    included), and SPIN's choice against it."""
    got = [f"{label.lower()} {baseline['metrics'][key]:{fmt}}" for key, label, _, fmt in VERDICT
           if finite(baseline["metrics"].get(key))]
    line = (f"- **Continued SFT at equal steps** (the baseline, not an iteration; selected on validation as SPIN's "
            f"iterations are: checked at their check steps, the best weights kept, or its last weights where they "
            f"kept theirs): {', '.join(got)}.")
    if not own:
        return [line]
    line += (f" Validation {own['metric']} {own['baseline_value']:.4f} vs the start's {own['start_value']:.4f}, so "
             f"the choice RUN/best makes keeps {'it' if own['improved'] else 'the start'}.")
    if not chosen:
        return [line]
    spin, other = by_name[chosen["name"]], by_name[own["name"]]
    cells = []
    for key, label, higher, fmt in VERDICT:
        a, b = spin["metrics"].get(key), other["metrics"].get(key)
        if finite(a) and finite(b):
            ahead = "level" if a == b else "SPIN ahead" if (a > b) == higher else "SPIN behind"
            cells.append(f"{label.lower()} {a:{fmt}} vs {b:{fmt}} ({ahead})")
    return [line, f"- **SPIN's choice vs the baseline's** (both chosen on validation, the start included: "
                  f"{chosen['name']} vs {own['name']}): " + "; ".join(cells) + "."]


# ---------------------------------------------------------------- README.md

def render(run: dict, plots: dict[str, str | None], out: Path, cards: list[Path]) -> str:
    rel = lambda p: Path(os.path.relpath(p, out)).as_posix()  # noqa: E731
    info, cfg = run["info"], run["config"]
    lines = [f"# SPIN run report: {run['dir'].name}", "",
             f"Run directory `{run['dir'].resolve()}`; spinlm {info.get('spinlm', '?')}, started "
             f"{info.get('started', '?')}; report written {time.strftime('%Y-%m-%dT%H:%M:%S')}. "
             f"Config: [{rel(run['dir'] / 'config.yaml')}]({rel(run['dir'] / 'config.yaml')}).", "",
             "## Did SPIN improve on the SFT start?", "", *verdict(run["summary"]), "",
             "## Per-model metrics", "", format_table(run["summary"]), "",
             "accuracy: greedy task accuracy on held-out prompts; NLL/token: of the real held-out responses; "
             "reward acc / margin: on the live held-out pairs (real vs a sample of the iteration's reference "
             "model, the sample not equal to the real response); dead pairs: share of held-out pairs whose sample "
             "equals the real response. Times in seconds.", "",
             "## Plots", ""]
    titles = {"metrics": "Held-out metrics per model", "training": "Training log of each iteration",
              "sft": "SFT held-out NLL"}
    lines += [f"![{titles[k]}]({v})" for k, v in plots.items() if v] + [""]
    lines += _training_table(run["models"]) + _generation_table(run["models"])
    lines += ["## Model cards", ""] + [f"- [{c.parent.relative_to(run['dir']).as_posix()}]({rel(c)})" for c in cards]
    lines += [""]
    return "\n".join(lines + _setup(cfg))


def _setup(cfg: dict) -> list[str]:
    model, data, spin, train = (cfg.get(k) or {} for k in ("model", "data", "spin", "train"))
    return ["## Setup", "", f"- model: `{model.get('name_or_path')}`",
            f"- training data: `{data.get('train')}`; held-out: `{data.get('eval')}`",
            f"- iterations {spin.get('iterations')}, mix window {spin.get('mix_window')}, beta {spin.get('beta')}, "
            f"loss {spin.get('loss_type')}, lr {train.get('learning_rate')}, optimizer {train.get('optimizer')}", ""]


def _training_table(models: list[dict]) -> list[str]:
    rows = [m for m in models[1:] if m["train"]]
    if not rows:
        return []
    out = ["## Training per iteration", "", "| iteration | pairs | steps | lr | beta | final loss | final margin | "
           "final reward acc | skipped steps |", "|---|---|---|---|---|---|---|---|---|"]
    for m in rows:
        t, last = m["train"], m["train"].get("final") or {}
        out.append(f"| {m['name']} | {t.get('pairs', '-')} | {t.get('steps', '-')} | {t.get('learning_rate', '-')} | "
                   f"{t.get('beta', '-')} | {_num(last.get('loss'))} | {_num(last.get('rewards/margin'))} | "
                   f"{_num(last.get('rewards/accuracy'))} | {t.get('skipped_steps', 0)} |")
    return out + [""] + _diagnostics_table(rows)


def _diagnostics_table(models: list[dict]) -> list[str]:
    """What each iteration's objective moved: the first and the last logged value of the policy's
    log-prob per token of each response, the margin, and the objective's loss terms."""
    keys = ["logp/real_per_token", "logp/generated_per_token", "logp/historical_per_token", "rewards/margin"]
    histories = [(m, m["train"].get("history") or []) for m in models]
    histories = [(m, h) for m, h in histories if h]
    keys += sorted({k for _, h in histories for r in h for k in r if k.startswith("terms/")})
    keys = [k for k in keys if any(k in h[0] for _, h in histories)]
    if not histories or not keys:
        return []
    out = ["## What each objective moved", "",
           "First -> last logged value in each iteration (training batches): the policy's log-prob per token of "
           "the real, generated and (T-SPIN) historical responses, the reward margin, and the objective's loss "
           "terms (their sum, plus the NLL term, is the loss). A term that stays flat while another moves is the "
           "side that has stalled.", "",
           "| iteration | objective | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for m, h in histories:
        cells = [f"{_num(h[0].get(k))} -> {_num(h[-1].get(k))}" if k in h[0] else "-" for k in keys]
        out.append(f"| {m['name']} | {m['train'].get('objective', 'spin')} | " + " | ".join(cells) + " |")
    return out + [""]


def _generation_table(models: list[dict]) -> list[str]:
    rows = [(m, m["generation"]) for m in models if m["generation"]]
    if not rows:
        return []
    out = ["## Samples on the training prompts", "",
           "iteration-t's generations.jsonl, sampled by the model that iteration starts from.", "",
           "| iteration | rows | mean tokens | hit max_new_tokens | empty | equal to real |",
           "|---|---|---|---|---|---|"]
    out += [f"| {m['name']} | {g.get('rows')} | {_num(g.get('mean_tokens'), '.1f')} | {g.get('hit_max_new_tokens')} | "
            f"{g.get('empty')} | {g.get('equal_to_real')} |" for m, g in rows]
    return out + [""]


def _num(v, fmt: str = ".4g") -> str:
    return format(v, fmt) if finite(v) else "-"


def report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write RUN/report/README.md, its plots and the model cards; return the README's path."""
    run = load_run(run_dir)
    require_matplotlib()
    out = Path(out) if out else run["dir"] / "report"
    out.mkdir(parents=True, exist_ok=True)
    plots = {"metrics": plot_metrics(run, out), "training": plot_training(run, out), "sft": plot_sft(run, out)}
    cards = write_cards(run)
    readme = out / "README.md"
    readme.write_text(render(run, plots, out, cards), encoding="utf-8")
    return readme
