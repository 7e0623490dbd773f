"""The report's plots, drawn with matplotlib on the non-interactive Agg canvas.

matplotlib is an optional extra (`pip install 'spinlm[report]'`), imported only inside the
functions here; `require_matplotlib()` turns its absence into a UserError. `figure` is shared
with the experiments' plots (spinlm.experiment). Each plot_* writes one PNG of a run read by
spinlm.report.runs.load_run and returns its file name (None when the run has nothing to draw):

- metrics.png: held-out metrics per model, and the length of its samples on the training prompts;
- training.png: each iteration's loss, rewards, log-probs and loss terms per optimizer step;
- sft.png: held-out NLL during SFT, when SFT ran with held-out data.
"""

from __future__ import annotations

from pathlib import Path

from spinlm.errors import UserError
from spinlm.report.runs import finite

INSTALL = "pip install 'spinlm[report]'"


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
    points = [(i, v) for i, v in enumerate(values) if finite(v)]
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
              ("Reward accuracy (live held-out pairs)", [(None, got("reward_accuracy"))]),
              ("Reward margin (live held-out pairs)", [(None, got("reward_margin"))]),
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
              ("Reward margin (live pairs)", [("rewards/margin", "-")]),
              ("Reward accuracy (live pairs)", [("rewards/accuracy", "-")]),
              ("Log-prob per token: real (solid), generated (dashed), historical (dotted)",
               [("logp/real_per_token", "-"), ("logp/generated_per_token", "--"), ("logp/historical_per_token", ":")]),
              ("Loss terms: " + (", ".join(f"{t.removeprefix('terms/')} ({_STYLE_NAMES[st]})"
                                           for t, st in zip(terms, styles)) or "none (one-term objective)"),
               list(zip(terms, styles)))]
    colors = [f"C{i % 10}" for i in range(len(logs))]
    for ax, (title, keys) in zip(axes, panels):
        for (name, rows), color in zip(logs, colors):
            for key, style in keys:
                points = [(r["step"], r[key]) for r in rows if finite(r.get(key))]
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
    rows = [r for r in run["models"][0]["train"].get("history") or [] if finite(r.get("heldout_nll"))]
    if run["models"][0]["name"] != "sft" or not rows:
        return None
    fig, (ax,) = figure(1, 1)
    ax.plot([r["step"] for r in rows], [r["heldout_nll"] for r in rows], marker="o")
    ax.set_title("SFT: held-out NLL per token", fontsize=10)
    _steps_axis(ax)
    fig.savefig(out / "sft.png", dpi=100)
    return "sft.png"
