"""Model cards: a README.md in every model directory of a run (sft/model, iteration-t/model).

Written by `spinlm report RUN` and, as each model is evaluated, by `spinlm run`. A card has
Hugging Face front matter (library_name, tags, base_model when the run started from a Hub
id), then what the model is, where its data came from, its training numbers, its held-out
metrics and the config sections that produced it. The run is read by spinlm.report.runs.load_run.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from spinlm import __version__
from spinlm.report.runs import load_run
from spinlm.rundir import CONTINUED_SFT, SFT, RunLayout

TAGS = ["spinlm", "spin", "self-play-fine-tuning"]
PAPER = ("[SPIN](https://arxiv.org/abs/2401.01335) (Chen et al., *Self-Play Fine-Tuning Converts Weak Language "
         "Models to Strong Language Models*, ICML 2024)")
SECTIONS = {"sft": ("model", "data", "sft", "peft", "eval"),
            "iteration": ("model", "data", "generation", "spin", "train", "packing", "peft", "eval")}


def hub_id(name: str | None) -> str | None:
    """`name` if it reads as a Hub id (org/name, not a local path), else None."""
    if not name or Path(name).exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        return None
    return name


def _start(run: dict, t: int) -> str:
    """The model iteration t started from (and used as reference): p_t."""
    if t > 0:
        return str(RunLayout(run["dir"]).iteration(t - 1) / "model")
    sft = run["models"][0]
    return str(sft["model"]) if sft["name"] == SFT and sft["model"] else run["config"]["model"]["name_or_path"]


def _about(run: dict, m: dict) -> list[str]:
    cfg, data = run["config"], run["config"].get("data", {})
    train = f"`{data.get('train')}`" + (f" (first {data['max_train_rows']} rows)" if data.get("max_train_rows") else "")
    lines = [f"- Prompts and real responses: {train}", f"- Held-out data for the metrics below: `{data.get('eval')}`"]
    if m["name"] == "sft":
        return [f"Supervised fine-tuning of `{cfg['model']['name_or_path']}` on the real responses, the start "
                f"model of a {PAPER} run made with spinlm {__version__}.", "", "## Data", "", *lines]
    if m["name"] == CONTINUED_SFT:
        steps = (m["train"] or {}).get("steps")
        return [f"The baseline of a {PAPER} run made with spinlm {__version__}: the run's start model "
                f"`{_start(run, 0)}` fine-tuned further on the real responses (continued SFT) for {steps} optimizer "
                "steps, as many as all SPIN iterations took together, selected on validation as the iterations "
                "are (checked at their check steps, the best checked weights kept).", "", "## Data", "", *lines]
    t = int(m["name"].rsplit("-", 1)[1])
    window = range(max(0, t - int(cfg.get("spin", {}).get("mix_window", 1)) + 1), t + 1)
    return [f"Iteration {t} of {PAPER}, made with spinlm {__version__}: the model p_{t + 1}, trained from and "
            f"against the reference `{_start(run, t)}` (p_{t}) to prefer the real responses over its own samples.",
            "", "## Data", "", *lines,
            f"- Generated responses: sampled in iteration(s) {', '.join(map(str, window))} "
            f"(`iteration-s/generations.jsonl`), all scored under p_{t}"]


def _numbers(title: str, values: dict, skip: tuple[str, ...] = ()) -> list[str]:
    rows = [(k, v) for k, v in values.items() if k not in skip and isinstance(v, (int, float, str))]
    if not rows:
        return []
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    return ["", f"## {title}", "", "| | |", "|---|---|"] + [f"| {k} | {fmt(v)} |" for k, v in rows]


def card_text(run: dict, m: dict) -> str:
    cfg = run["config"]
    front = {"library_name": "transformers", "tags": TAGS}
    if base := hub_id(cfg.get("model", {}).get("name_or_path")):
        front["base_model"] = base
    sections = SECTIONS["sft" if m["name"] in (SFT, CONTINUED_SFT) else "iteration"]
    train = {k: v for k, v in (m["train"] or {}).items() if not isinstance(v, (list, dict))}
    final = {k: v for k, v in ((m["train"] or {}).get("final") or {}).items() if k not in ("step", "lr", "elapsed_s")}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "",
             f"# {run['dir'].name} / {m['name']}", "", *_about(run, m)]
    lines += _numbers("Training", {**train, **{f"final {k}": v for k, v in final.items()}})
    lines += _numbers("Held-out metrics", m["metrics"], skip=("model",)) or ["", "## Held-out metrics", "",
                                                                            "Not evaluated."]
    config = yaml.safe_dump({s: cfg[s] for s in sections if s in cfg}, sort_keys=False).rstrip()
    lines += ["", "## Config", "", "The sections of the run's config.yaml that produced this model:", "",
              "```yaml", config, "```", ""]
    return "\n".join(lines)


def write_cards(run: dict) -> list[Path]:
    """README.md in every model directory of the run (from runs.load_run); returns their paths."""
    written = []
    for m in run["models"]:
        if m["model"] is None:
            continue
        path = m["model"] / "README.md"
        tmp = path.with_name("README.md.tmp")
        tmp.write_text(card_text(run, m), encoding="utf-8")
        os.replace(tmp, path)
        written.append(path)
    return written


def write_run_cards(run_dir: Path) -> None:
    """The cards of the models a run has so far (rank 0 writes; the summary need not exist yet)."""
    from spinlm import dist

    if dist.is_main():
        write_cards(load_run(run_dir, need_summary=False))
