"""Experiment trackers (run.report_to): TensorBoard, Weights & Biases, trackio, MLflow.

The trackers are accelerate's (accelerate.tracking), started once per `spinlm run` on rank 0.
Every metric goes on one global step axis: SFT's optimizer steps first, then those of iteration
0, 1, ... in order, so the curves of iteration t continue where t-1 ended. A stage's first step is
derived from what the run directory has persisted (the `steps` of each finished model's
spinlm_sft.json / spinlm_train.json), so it is the same after a resume. RUN/tracking.json keeps
the tracker runs' ids (a resumed run continues the same W&B / MLflow / trackio run; TensorBoard
always writes to RUN/tensorboard) and, per stream, the last step logged: a resumed run never logs
a step twice, and one that finished before report_to was set gets its per-stage metrics logged
from the files when it resumes.

Streams (tag prefixes) and when they are logged:
  sft/                  loss, lr, tokens_per_s every run.log_every steps; sft/check/heldout_nll per check
  train/                every training metric of the log (loss, rewards/*, logratio/*, dead_pairs, lr,
                        grad_norm, tokens_per_s, iteration, ...) every run.log_every steps
  train/check/          the in-iteration held-out check (train.eval_every)
  generate/, generate_eval/   per iteration, at its first step: mean_tokens, hit_max_new_tokens_share,
                        empty_share, equal_to_real_share, tokens_per_s (the stage's wall time)
  eval/, val/           held-out and validation metrics of each model, at the step it was trained to
  continued_sft/eval/, continued_sft/val/   the baseline, at the step where the last iteration ends
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import re
import uuid
from pathlib import Path
from typing import Callable

from spinlm import dist
from spinlm.config import Config, trackers
from spinlm.errors import UserError
from spinlm.io import marker, read_json, write_json
from spinlm.rundir import CONTINUED_SFT, SFT, RunLayout, iteration_of

log = logging.getLogger("spinlm")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio", "mlflow": "mlflow"}
Log = Callable[[str, int, dict], None]  # (stream, step within the stage, values)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a module set to None in sys.modules, a broken parent
        return False


# accelerate's trackers got start() (a tracker made first, started later) in 1.8 and TrackioTracker in 1.9;
# from 1.9 to 1.12 W&B's offline runs were started twice per process (fixed in 1.13), and up to 1.13
# TrackioTracker.log dropped the step (trackio numbered the points itself; fixed in 1.14). spinlm's core runs on
# accelerate 1.0, so the tracker extras ask for more and this says so before a run.
TRACKERS_ACCELERATE = {"tensorboard": (1, 9), "wandb": (1, 13), "mlflow": (1, 9), "trackio": (1, 14)}


def accelerate_too_old(version: str, names: list[str]) -> str | None:
    """The problem with accelerate `version` for the trackers `names` of run.report_to, or None."""
    found = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    short = [n for n in names if found < TRACKERS_ACCELERATE[n]]
    if not short:
        return None
    need = ".".join(map(str, max(TRACKERS_ACCELERATE[n] for n in short)))
    return (f"run.report_to {', '.join(short)} needs accelerate>={need} (its trackers), found {version}: "
            f"pip install 'accelerate>={need}' (the spinlm[NAME] tracker extras ask for it)")


def require(cfg: Config) -> None:
    """Every tracker of run.report_to can be imported (checked by `spinlm validate` and `spinlm run`)."""
    names = trackers(cfg.run)
    missing = [n for n in names if not _installed(PACKAGES[n])]
    if missing:
        raise UserError("run.report_to: " + "; ".join(
            f"{n} needs the {PACKAGES[n]} package, which is not installed: pip install 'spinlm[{n}]'" for n in missing))
    if names and (problem := accelerate_too_old(importlib.metadata.version("accelerate"), names)):
        raise UserError(problem)


def first_step(run_dir: Path, iteration: int) -> int:
    """The global step where iteration `iteration` starts: SFT's steps plus those of the iterations
    before it, as their finished models recorded them."""
    layout = RunLayout(run_dir)
    steps = (read_json(layout.sft_log()) or {}).get("steps", 0)
    for t in range(iteration):
        steps += (read_json(layout.train_log(t)) or {}).get("steps", 0)
    return steps


def hyperparameters(cfg: Config) -> dict:
    """The resolved config, flat (`section.key`), with list values as JSON text."""
    flat = {}
    for section, values in cfg.to_dict().items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if value is None or isinstance(value, (bool, int, float, str)) \
                else json.dumps(value)
    return flat


def scalars(values: dict) -> dict[str, float]:
    return {k: float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and k != "step"}


class Tracker:
    """The run's trackers; without run.report_to (and on ranks other than 0) every call does nothing."""

    def __init__(self, run_dir: Path, cfg: Config):
        self.run_dir, self.cfg = run_dir, cfg
        self.path = run_dir / "tracking.json"
        self.state = read_json(self.path, {}) or {}
        self.marks: dict[str, int] = self.state.setdefault("marks", {})
        self.trackers = []
        names = trackers(cfg.run) if dist.is_main() else []
        if names:
            self.hparams = hyperparameters(cfg)
            self.trackers = [self._start(name) for name in names]
            digest = hashlib.sha256(json.dumps(self.hparams, sort_keys=True).encode()).hexdigest()
            for tracker in self.trackers:  # TensorBoard: each time a new hparams folder, so once per config
                if tracker.name != "tensorboard" or self.state.get("config") != digest:
                    self._store_config(tracker)
            self.state["config"] = digest
            self._save()
            log.info("run.report_to: logging to %s", ", ".join(names))

    def _save(self) -> None:
        write_json(self.path, self.state)

    def _start(self, name: str):
        from accelerate import tracking

        ids, run_name = self.state.setdefault("ids", {}), self.run_dir.resolve().name
        if name == "tensorboard":
            tracker = tracking.TensorBoardTracker("tensorboard", str(self.run_dir))
        elif name == "wandb":
            ids.setdefault("wandb", uuid.uuid4().hex[:12])
            self._save()  # before wandb.init: a kill inside it still resumes this run
            where = {} if os.environ.get("WANDB_DIR") else {"dir": str(self.run_dir)}
            tracker = tracking.WandBTracker(os.environ.get("WANDB_PROJECT", "spinlm"), name=run_name, id=ids["wandb"],
                                            resume="allow", **where)
        elif name == "trackio":
            ids.setdefault("trackio", f"{run_name}-{uuid.uuid4().hex[:8]}")  # trackio resumes a run by its name
            tracker = tracking.TrackioTracker(os.environ.get("TRACKIO_PROJECT", "spinlm"), name=ids["trackio"],
                                              resume="allow", config=self.hparams)
        else:
            import mlflow

            if not os.environ.get("MLFLOW_TRACKING_URI"):  # a file store in the run directory
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
                mlflow.set_tracking_uri((self.run_dir / "mlruns").resolve().as_uri())
            tracker = tracking.MLflowTracker(experiment_name=os.environ.get("MLFLOW_EXPERIMENT_NAME", "spinlm"),
                                             run_id=ids.get("mlflow"), run_name=run_name)
        tracker.start()
        if name == "mlflow":
            ids["mlflow"] = tracker.active_run.info.run_id
        return tracker

    def _store_config(self, tracker) -> None:
        if tracker.name == "trackio":  # given to trackio.init (accelerate's method does not persist it)
            return
        try:
            tracker.store_init_configuration(self.hparams)
        except Exception as e:  # e.g. MLflow refuses to change a logged parameter (a --force resume)
            log.warning("run.report_to: %s did not take the config as hyper-parameters: %s", tracker.name, e)

    def log(self, stream: str, step: int, values: dict) -> None:
        """values' numbers as `stream/name` at `step`, unless this stream already logged that step."""
        if not self.trackers or step <= self.marks.get(stream, -1):
            return
        numbers = {f"{stream}/{k}": v for k, v in scalars(values).items()}
        for tracker in self.trackers:
            tracker.log(numbers, step=step)
        self.marks[stream] = step
        self._save()

    def sft_log(self) -> Log | None:
        """For sft(): its steps are the first of the axis."""
        return (lambda stream, step, values: self.log(stream, step, values)) if self.trackers else None

    def train_log(self, iteration: int) -> Log | None:
        """For train() of `iteration`: its steps follow those of SFT and the iterations before it."""
        if not self.trackers:
            return None
        start = first_step(self.run_dir, iteration)
        return lambda stream, step, values: self.log(stream, start + step, values)

    def stage_done(self, name: str, out: Path) -> None:
        """After each stage (run now or done before): its per-stage metrics, read from its files."""
        if not self.trackers:
            return
        where = out.parent
        t = iteration_of(where.name)
        if name in ("generate", "generate-eval") and t is not None:
            info = read_json(marker(out), {}) or {}
            stats, seconds = info.get("info") or {}, info.get("seconds") or 0.0
            rows = max(stats.get("rows", 0), 1)
            self.log(name.replace("-", "_"), first_step(self.run_dir, t), {
                "mean_tokens": stats.get("mean_tokens"), "rows": stats.get("rows"),
                "hit_max_new_tokens_share": stats.get("hit_max_new_tokens", 0) / rows,
                "empty_share": stats.get("empty", 0) / rows,
                "equal_to_real_share": stats.get("equal_to_real", 0) / rows,
                "tokens_per_s": stats.get("mean_tokens", 0) * rows / seconds if seconds else None})
        elif name == "train" and t is not None:  # what live logging missed (report_to set after the stage ran)
            start = first_step(self.run_dir, t)
            for row in (read_json(out / "spinlm_train.json") or {}).get("history", []):
                self.log("train", start + row["step"], {**row, "iteration": t})
        elif name == "evaluate":
            metrics = read_json(out, {}) or {}
            if where.name == SFT:
                step, prefix = first_step(self.run_dir, 0), ""
            elif t is not None:
                step, prefix = first_step(self.run_dir, t + 1), ""
            elif where.name == CONTINUED_SFT:
                step, prefix = first_step(self.run_dir, self.cfg.spin.iterations), "continued_sft/"
            else:
                return
            for split in ("eval", "val"):
                if metrics.get(split):
                    self.log(prefix + split, step, metrics[split])

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []
