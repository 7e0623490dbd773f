"""Reading a finished (or running) spinlm run directory: the data the report and the model cards use.

`load_run(RUN)` reads RUN/config.yaml, RUN/summary.json (optional with need_summary=False, as
while `spinlm run` is still going), RUN/run_info.json, each model's metrics.json (held-out and
validation metrics and training log, or the model's own training log when metrics.json lacks it) and the
`.done` markers of the generation stages (length statistics). A missing or garbled file is a
UserError naming it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from spinlm.errors import UserError
from spinlm.io import marker
from spinlm.rundir import RunLayout


def finite(v) -> bool:
    """Whether a value read from a run is a finite number (missing, NaN and inf are not)."""
    return isinstance(v, (int, float)) and math.isfinite(v)


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
    names = [e["name"] for e in summary] if summary else RunLayout(run_dir).names(iterations)
    models = [_model_entry(run_dir, name, summary) for name in names]
    info = _read(run_dir / "run_info.json", "json", required=False) or {}
    return {"dir": run_dir, "config": config, "summary": summary, "models": models, "info": info}


def _model_entry(run_dir: Path, name: str, summary: list[dict] | None) -> dict:
    d = run_dir / name
    saved = _read(d / "metrics.json", "json", required=False) or {}
    entry = next((e for e in summary if e["name"] == name), None) if summary else None
    metrics, val = (entry["metrics"], entry.get("val_metrics")) if entry else (None, None)
    gen = _read(marker(d / "generations.jsonl"), "json", required=False) if (d / "generations.jsonl").exists() else None
    return {"name": name, "dir": d, "model": d / "model" if (d / "model" / "config.json").exists() else None,
            "metrics": metrics if metrics is not None else saved.get("eval") or {},
            "val_metrics": val if val is not None else saved.get("val") or {},
            "train": saved.get("train") or _training_log(d / "model"), "generation": (gen or {}).get("info")}


def _training_log(model_dir: Path) -> dict:
    """The model's own training log, for a run whose metrics.json lacks it (eval.enabled false)."""
    for name in ("spinlm_train.json", "spinlm_sft.json"):
        if (model_dir / name).exists():
            return _read(model_dir / name, "json", required=False) or {}
    return {}
