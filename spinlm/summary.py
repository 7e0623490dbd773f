"""A run's summary: one entry per model (SFT, each iteration, the continued-SFT baseline) with its
held-out and validation metrics and stage times, the table `spinlm run` prints, and the choice of
RUN/best on validation data (never on the held-out data the table reports)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from spinlm import dist
from spinlm.config import Config
from spinlm.io import is_done, marker, read_json, write_json
from spinlm.rundir import CONTINUED_SFT, SFT, RunLayout

log = logging.getLogger("spinlm")


def _seconds(path: Path) -> float:
    return (read_json(marker(path), {}) or {}).get("seconds", 0.0) if is_done(path) else 0.0


def model_entry(run_dir: Path, name: str, start_model: str) -> dict:
    """The summary entry of RUN/NAME: its model, held-out ("metrics") and validation metrics, and
    the seconds of its stages (`start_model` stands in when RUN/sft has no model of its own)."""
    d = run_dir / name
    seconds = {"sft": _seconds(d / "model"), "generate": _seconds(d / "generations.jsonl")
               + _seconds(d / "eval-generations.jsonl"),
               "score": _seconds(d / "pairs.jsonl") + _seconds(d / "eval-pairs.jsonl"),
               "train": _seconds(d / "model") if name != SFT else 0.0, "evaluate": _seconds(d / "metrics.json")}
    if name != SFT:
        seconds.pop("sft")
    saved = read_json(d / "metrics.json", {})
    return {"name": name, "model": str(d / "model") if (d / "model").exists() else start_model,
            "metrics": saved.get("eval", {}), "val_metrics": saved.get("val") or {}, "seconds": seconds}


def summarize(run_dir: Path, cfg: Config) -> list[dict]:
    """RUN/summary.json: one entry per evaluated model (SFT, then each iteration)."""
    layout = RunLayout(run_dir)
    names = layout.names(cfg.spin.iterations)
    names += [CONTINUED_SFT] if (layout.continued_sft() / "metrics.json").exists() else []
    entries = [model_entry(run_dir, name, cfg.model.name_or_path) for name in names]
    best = select_best(entries)
    if dist.is_main():
        write_json(run_dir / "summary.json", entries)
        print(format_table(entries))
        if best:
            point_best(run_dir, best)
            print(best["statement"])
        elif any(e["metrics"] for e in entries):
            print(NO_SELECTION)
            log.info("%s", NO_SELECTION)
    return entries


NO_SELECTION = ("No model was chosen as RUN/best: the run has no validation data (data.val unset and data.val_size 0), "
                "and choosing on the held-out data that the table reports would flatter the choice.")


def _choose(entries: list[dict]) -> tuple[int, str] | None:
    """(index, metric) of the model chosen on validation among `entries`: by task accuracy if every
    one has it (a checker), else by NLL per token; ties go to the earlier model. None unless every
    entry has validation metrics (choosing on the split the table reports would flatter the choice)."""
    if not entries or not all(e["val_metrics"] for e in entries):
        return None
    val = [e["val_metrics"] for e in entries]
    metric = "accuracy" if all(v.get("accuracy") is not None for v in val) else "nll_per_token"
    sign = 1 if metric == "accuracy" else -1
    return max(range(len(entries)), key=lambda i: (sign * val[i][metric], -i)), metric


def select_best(entries: list[dict]) -> dict | None:
    """The best evaluated model, the start (SFT) model included: by task accuracy if there is a
    checker, else by NLL per token, on the validation data; None without validation data for every
    model (selecting on the split the table reports would flatter the choice). Ties go to the
    earlier model. The continued-SFT baseline is never chosen; its own choice is select_baseline's."""
    baseline = select_baseline(entries)
    entries = [e for e in entries if e["name"] != CONTINUED_SFT]
    chosen = _choose(entries)
    if chosen is None:
        return None
    k, metric = chosen
    val = [e["val_metrics"] for e in entries]
    best, start = entries[k], entries[0]
    delta = val[k][metric] - val[0][metric]
    if k == 0:
        statement = (f"SPIN did not improve on the start model ({start['name']}): its validation {metric} "
                     f"{val[0][metric]:.4f} is the best of all iterations; RUN/best points to it.")
    else:
        statement = (f"SPIN improved on the start model: validation {metric} {val[0][metric]:.4f} -> "
                     f"{val[k][metric]:.4f} ({delta:+.4f}) at {best['name']}; RUN/best points to it.")
    if baseline:
        statement += (f" Continued SFT at equal steps: validation {metric} {baseline['baseline_value']:.4f} "
                      f"({baseline['baseline_value'] - val[0][metric]:+.4f} vs the start"
                      + (")." if baseline["improved"] else ", so the same choice would keep the start)."))
    return {"name": best["name"], "model": best["model"], "metric": metric, "split": "val", "value": val[k][metric],
            "start": start["name"], "start_value": val[0][metric], "improved": k != 0, "delta": delta,
            "statement": statement}


def select_baseline(entries: list[dict]) -> dict | None:
    """The continued-SFT baseline's counterpart of RUN/best: the start or the baseline, whichever is
    better on validation by the metric select_best uses (ties to the start), as RUN/best may choose the
    start over every iteration. None without a baseline, or without validation metrics."""
    baseline = next((e for e in entries if e["name"] == CONTINUED_SFT), None)
    rest = [e for e in entries if e["name"] != CONTINUED_SFT]
    chosen = _choose(rest)
    if baseline is None or chosen is None or (baseline["val_metrics"] or {}).get(chosen[1]) is None:
        return None
    metric, start = chosen[1], rest[0]
    value, start_value = baseline["val_metrics"][metric], start["val_metrics"][metric]
    improved = value > start_value if metric == "accuracy" else value < start_value
    return {"name": baseline["name"] if improved else start["name"], "metric": metric, "improved": improved,
            "value": value if improved else start_value, "baseline_value": value, "start_value": start_value}


def point_best(run_dir: Path, best: dict) -> None:
    """RUN/best.json describes the choice; RUN/best is a symlink to its model (when it is local)."""
    write_json(run_dir / "best.json", best)
    link, model = run_dir / "best", Path(best["model"])
    if model.is_dir():
        tmp = run_dir / "best.tmp-link"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(os.path.relpath(model.resolve(), run_dir.resolve()))
        os.replace(tmp, link)
    log.info("%s", best["statement"])


def format_table(entries: list[dict]) -> str:
    """The per-model table (Markdown) the demo prints."""
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    head = ("| model | accuracy | NLL/token | reward acc | margin | dead pairs | "
            "generate s | score s | train s | eval s |\n"
            "|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for e in entries:
        m, s = e["metrics"], e["seconds"]
        train_s = s.get("train", 0.0) or s.get("sft", 0.0)
        rows.append(f"| {e['name']} | {f(m.get('accuracy'), '.3f')} | {f(m.get('nll_per_token'), '.4f')} | "
                    f"{f(m.get('reward_accuracy'), '.3f')} | {f(m.get('reward_margin'), '.4f')} | "
                    f"{f(m.get('dead_pair_share'), '.2f')} | "
                    f"{s.get('generate', 0):.1f} | {s.get('score', 0):.1f} | {train_s:.1f} | "
                    f"{s.get('evaluate', 0):.1f} |")
    return "\n".join([head] + rows)
