"""A run's report: README.md with the per-model table, a plain verdict and PNG plots; model cards.

    spinlm report RUN_DIR [--out RUN_DIR/report]

Reads RUN/summary.json, RUN/config.yaml, each model's metrics.json (held-out metrics and
training log) and the `.done` markers of the generation stages (length statistics); writes
RUN/report/README.md, metrics.png (held-out metrics per model), training.png (each
iteration's loss and rewards per step), sft.png (SFT held-out NLL, when SFT ran), and a
README.md model card into every model directory of the run. Plots need matplotlib
(`pip install 'spinlm[report]'`); they are drawn on the non-interactive Agg canvas.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import yaml

from .errors import UserError
from .io import marker
from .rundir import format_table

INSTALL = "pip install 'spinlm[report]'"
# (summary key, label, higher is better, number format) of the metrics the verdict compares.
VERDICT = (("accuracy", "Task accuracy", True, ".3f"), ("nll_per_token", "NLL per token", False, ".4f"))


def _read(path: Path, kind: str, required: bool = True):
    """A run file as JSON or YAML; a missing required or garbled one is a UserError naming it."""
    if not path.exists():
        if required:
            raise UserError(f"{path}: not found (is {path.parent} a finished spinlm run directory? "
                            "`spinlm run` writes it at the end)")
        return None
    try:
        text = path.read_text(encoding="utf-8")
        return json.loads(text) if kind == "json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as e:
        raise UserError(f"{path}: cannot be read as {kind.upper()} ({e})") from None


def _summary(run_dir: Path) -> list[dict]:
    path = run_dir / "summary.json"
    entries = _read(path, "json")
    if not (isinstance(entries, list) and entries and all(
            isinstance(e, dict) and isinstance(e.get("name"), str) and isinstance(e.get("metrics"), dict)
            for e in entries)):
        raise UserError(f"{path}: expected a list of entries with 'name' and 'metrics' (as `spinlm run` writes)")
    return entries


def load_run(run_dir: str | Path, need_summary: bool = True) -> dict:
    """Everything the report and the model cards use, read and checked up front."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    config = _read(run_dir / "config.yaml", "yaml")
    if not isinstance(config, dict):
        raise UserError(f"{run_dir / 'config.yaml'}: expected a mapping of config sections")
    summary = _summary(run_dir) if need_summary else None
    iterations = int(config.get("spin", {}).get("iterations", 0))
    names = [e["name"] for e in summary] if summary else ["sft"] + [f"iteration-{t}" for t in range(iterations)]
    models = [_model_entry(run_dir, name, summary) for name in names]
    info = _read(run_dir / "run_info.json", "json", required=False) or {}
    return {"dir": run_dir, "config": config, "summary": summary, "models": models, "info": info}


def _model_entry(run_dir: Path, name: str, summary: list[dict] | None) -> dict:
    d = run_dir / name
    saved = _read(d / "metrics.json", "json", required=False) or {}
    metrics = next((e["metrics"] for e in summary if e["name"] == name), None) if summary else None
    gen = _read(marker(d / "generations.jsonl"), "json", required=False) if (d / "generations.jsonl").exists() else None
    return {"name": name, "dir": d, "model": d / "model" if (d / "model" / "config.json").exists() else None,
            "metrics": metrics if metrics is not None else saved.get("eval") or {},
            "train": saved.get("train") or _training_log(d / "model"), "generation": (gen or {}).get("info")}


def _training_log(model_dir: Path) -> dict:
    """The model's own training log, for a run whose metrics.json lacks it (eval.enabled false)."""
    for name in ("spinlm_train.json", "spinlm_sft.json"):
        if (model_dir / name).exists():
            return _read(model_dir / name, "json", required=False) or {}
    return {}


# ---------------------------------------------------------------- the verdict

def verdict(entries: list[dict]) -> list[str]:
    """One line per compared metric: the last and the best iteration against the SFT start; the
    continued-SFT baseline, when the run has one, on a line of its own (it is no iteration)."""
    baseline = next((e for e in entries if e["name"] == "continued-sft" and e["metrics"]), None)
    start = entries[0]["metrics"]
    iters = [e for e in entries[1:] if e["metrics"] and e["name"] != "continued-sft"]
    if not start or not iters:
        return ["- No comparison: the SFT start and at least one iteration need held-out metrics "
                "(`eval.enabled` and `data.eval`)."]
    lines = []
    for key, label, higher, fmt in VERDICT:
        measured = [e for e in iters if _finite(e["metrics"].get(key))]
        if not _finite(start.get(key)) or not measured:
            lines.append(f"- **{label}**: not measured" + (" (no `eval.checker`)." if key == "accuracy" else "."))
            continue
        best = (max if higher else min)(measured, key=lambda e: e["metrics"][key])
        parts = [_versus(kind, e["name"], e["metrics"][key], start[key], higher, fmt)
                 for kind, e in (("last", measured[-1]), ("best", best))]
        lines.append(f"- **{label}** ({'higher' if higher else 'lower'} is better): SFT start "
                     f"{start[key]:{fmt}}; {parts[0]}; {parts[1]}.")
    if baseline:
        got = [f"{label.lower()} {baseline['metrics'][key]:{fmt}}" for key, label, _, fmt in VERDICT
               if _finite(baseline["metrics"].get(key))]
        lines.append(f"- **Continued SFT at equal steps** (the baseline, not an iteration): {', '.join(got)}.")
    return lines


def _versus(kind: str, name: str, value: float, start: float, higher: bool, fmt: str) -> str:
    better = value > start if higher else value < start
    return (f"{kind} iteration ({name}) {value:{fmt}} ({value - start:+{fmt}}: "
            f"{'improved' if better else 'no improvement'})")


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


# ---------------------------------------------------------------- plots

def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError(f"spinlm report draws its plots with matplotlib, which is not installed: {INSTALL}") from None


def figure(rows: int, cols: int):
    """A Figure on the Agg canvas (no pyplot, no display, no global backend switch)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * cols, 3.2 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False).ravel()


def _series(ax, names: list[str], values: list, label: str | None = None) -> bool:
    points = [(i, v) for i, v in enumerate(values) if _finite(v)]
    if points:
        ax.plot([i for i, _ in points], [v for _, v in points], marker="o", label=label)
    return bool(points)


def plot_metrics(run: dict, out: Path) -> str:
    """metrics.png: held-out metrics per model, plus the length of its samples on the training prompts."""
    models = run["models"]
    names = [m["name"] for m in models]
    got = lambda key: [m["metrics"].get(key) for m in models]  # noqa: E731
    gen = [m["generation"] or {} for m in models]  # iteration-t's generations were sampled by model t (p_t)
    sampled_tokens = [g.get("mean_tokens") for g in gen]
    sampled_hits = [g["hit_max_new_tokens"] / g["rows"] if g.get("rows") else None for g in gen]
    panels = [("Task accuracy (greedy)", [(None, got("accuracy"))]),
              ("NLL per token (real responses)", [(None, got("nll_per_token"))]),
              ("Reward accuracy (held-out pairs)", [(None, got("reward_accuracy"))]),
              ("Reward margin (held-out pairs)", [(None, got("reward_margin"))]),
              ("Mean response tokens", [("greedy, held-out", got("greedy_mean_tokens")),
                                        ("sampled, training prompts", sampled_tokens)]),
              ("Share hitting max_new_tokens", [("greedy, held-out", got("greedy_hit_max_new_tokens")),
                                                ("sampled, training prompts", sampled_hits)])]
    fig, axes = figure(2, 3)
    for ax, (title, series) in zip(axes, panels):
        drawn = [_series(ax, names, values, label) for label, values in series]
        _finish(ax, title, names, any(drawn), legend=len(series) > 1)
    fig.suptitle(f"{run['dir'].name}: held-out metrics per model")
    fig.savefig(out / "metrics.png", dpi=100)
    return "metrics.png"


def _finish(ax, title: str, names: list[str], drawn: bool, legend: bool) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
    ax.grid(alpha=0.3)
    if not drawn:
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes, color="gray")
    elif legend:
        ax.legend(fontsize=7)


def plot_training(run: dict, out: Path) -> str | None:
    """training.png: each iteration's logged loss, rewards, margin and reward accuracy per optimizer step."""
    logs = [(m["name"], m["train"].get("history") or []) for m in run["models"][1:]]
    logs = [(name, rows) for name, rows in logs if rows]
    if not logs:
        return None
    fig, axes = figure(3, 2)
    terms = sorted({k for _, rows in logs for r in rows for k in r if k.startswith("terms/")})
    styles = ["-", "--", ":", "-."]
    panels = [("Loss", [("loss", "-")]), ("Rewards: real (solid), generated (dashed)",
                                           [("rewards/real", "-"), ("rewards/generated", "--")]),
              ("Reward margin", [("rewards/margin", "-")]), ("Reward accuracy", [("rewards/accuracy", "-")]),
              ("Log-prob per token: real (solid), generated (dashed), historical (dotted)",
               [("logp/real_per_token", "-"), ("logp/generated_per_token", "--"), ("logp/historical_per_token", ":")]),
              ("Loss terms: " + (", ".join(f"{t.removeprefix('terms/')} ({_STYLE_NAMES[st]})"
                                           for t, st in zip(terms, styles)) or "none (one-term objective)"),
               list(zip(terms, styles)))]
    colors = [f"C{i % 10}" for i in range(len(logs))]
    for ax, (title, keys) in zip(axes, panels):
        for (name, rows), color in zip(logs, colors):
            for key, style in keys:
                points = [(r["step"], r[key]) for r in rows if _finite(r.get(key))]
                ax.plot([s for s, _ in points], [v for _, v in points], style, marker="o", markersize=3,
                        color=color, label=name if style == "-" else None)
        ax.set_title(title, fontsize=10)
        _steps_axis(ax)
        ax.legend(fontsize=7)
    fig.suptitle(f"{run['dir'].name}: training log of each iteration")
    fig.savefig(out / "training.png", dpi=100)
    return "training.png"


_STYLE_NAMES = {"-": "solid", "--": "dashed", ":": "dotted", "-.": "dash-dot"}


def _steps_axis(ax) -> None:
    ax.set_xlabel("optimizer step", fontsize=8)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)


def plot_sft(run: dict, out: Path) -> str | None:
    """sft.png: held-out NLL during SFT, when SFT ran with held-out data."""
    rows = [r for r in run["models"][0]["train"].get("history") or [] if _finite(r.get("heldout_nll"))]
    if run["models"][0]["name"] != "sft" or not rows:
        return None
    fig, (ax,) = figure(1, 1)
    ax.plot([r["step"] for r in rows], [r["heldout_nll"] for r in rows], marker="o")
    ax.set_title("SFT: held-out NLL per token", fontsize=10)
    _steps_axis(ax)
    fig.savefig(out / "sft.png", dpi=100)
    return "sft.png"


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
             "reward acc / margin: on held-out pairs (real vs a sample of the iteration's reference model); "
             "dead pairs: share of held-out pairs whose sample equals the real response. Times in seconds.", "",
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
    return format(v, fmt) if _finite(v) else "-"


def report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write RUN/report/README.md, its plots and the model cards; return the README's path."""
    from .cards import write_cards

    run = load_run(run_dir)
    require_matplotlib()
    out = Path(out) if out else run["dir"] / "report"
    out.mkdir(parents=True, exist_ok=True)
    plots = {"metrics": plot_metrics(run, out), "training": plot_training(run, out), "sft": plot_sft(run, out)}
    cards = write_cards(run)
    readme = out / "README.md"
    readme.write_text(render(run, plots, out, cards), encoding="utf-8")
    return readme
