"""The run directory: its layout (every path of a run, RunLayout), opening it (lock, config drift
check) and stages with markers. Its summary and the choice of RUN/best: spinlm.summary."""

from __future__ import annotations

import atexit
import json
import logging
import os
import platform
import re
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from spinlm import __version__, dist, preempt
from spinlm.config import Config, to_yaml
from spinlm.errors import UserError
from spinlm.io import fault_point, finish, is_done, produce, read_json, write_json
from spinlm.tokens import ENCODING

log = logging.getLogger("spinlm")
# Keys that cannot change results: a resumed run may differ in these.
HARMLESS = {"run.progress", "run.progress_every_s", "run.log_every", "run.report_to", "train.checkpoint_every",
            "generation.concurrency", "generation.timeout_s", "generation.retries", "generation.server_start_timeout_s",
            "generation.api_key_env", "run.check_memory", "run.dist_timeout_min", "run.preempt_signals",
            "run.preempt_grace_s", "run.push_to_hub", "run.hub_model_id", "run.hub_private_repo"}


SFT, CONTINUED_SFT, BEST = "sft", "continued-sft", "best"  # RUN/<name> of the models beside the iterations


def iteration_name(t: int) -> str:
    return f"iteration-{t}"


def iteration_of(name: str) -> int | None:
    """t of a directory named iteration-t, else None."""
    m = re.fullmatch(r"iteration-(\d+)", name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class RunLayout:
    """Where everything of a run lives, the one place that names its paths:

        RUN/sft/model                       the SFT model (when sft.enabled), its metrics.json beside it
        RUN/iteration-T/generations.jsonl   p_T's responses to the training prompts
        RUN/iteration-T/pairs.jsonl         the pairs iteration T trains on, scored under p_T
        RUN/iteration-T/eval-*.jsonl        the same for the held-out prompts
        RUN/iteration-T/model               p_{T+1}, with spinlm_train.json; metrics.json beside it
        RUN/continued-sft/model             the baseline: as many SFT steps as SPIN took
        RUN/best -> the model chosen on validation; RUN/summary.json, RUN/config.yaml
        RUN/pushed.json                     what each Hub repo branch holds (spinlm push, run.push_to_hub)
    """

    root: Path

    def sft(self) -> Path:
        return self.root / SFT

    def continued_sft(self) -> Path:
        return self.root / CONTINUED_SFT

    def iteration(self, t: int) -> Path:
        return self.root / iteration_name(t)

    def generations(self, t: int) -> Path:
        return self.iteration(t) / "generations.jsonl"

    def train_log(self, t: int) -> Path:
        """spinlm_train.json of iteration t's model: its steps and training history."""
        return self.iteration(t) / "model" / "spinlm_train.json"

    def model(self, name: str) -> Path:
        """RUN/name/model: the model of sft, iteration-T or continued-sft."""
        return self.root / name / "model"

    def pushed(self) -> Path:
        return self.root / "pushed.json"

    def sft_log(self) -> Path:
        return self.sft() / "model" / "spinlm_sft.json"

    def names(self, iterations: int) -> list[str]:
        """The models of a run in order: the SFT start, then each iteration's."""
        return [SFT] + [iteration_name(t) for t in range(iterations)]


class Stage:
    """Runs a stage once: output to a temporary path, rename, then a `.done` marker. `on_done(name,
    out)` is called once the stage is done, whether it ran now or before."""

    def __init__(self, run_dir: Path, on_done: Callable[[str, Path], None] | None = None):
        self.run_dir, self.on_done = run_dir, on_done

    def __call__(self, name: str, out: Path, fn: Callable[[Path], Any]) -> None:
        preempt.stop_here(f"before the {name} stage ({out.relative_to(self.run_dir)}); the stages done so far are "
                          "kept: a re-run resumes there")
        self._run(name, out, fn)
        if self.on_done is not None:
            self.on_done(name, out)

    def _run(self, name: str, out: Path, fn: Callable[[Path], Any]) -> None:
        rel = out.relative_to(self.run_dir)
        if is_done(out):
            log.info("%s: done already (%s)", name, rel)
            return
        log.info("%s -> %s", name, rel)
        start = time.time()
        info = produce(out, fn)
        fault_point("stage-output")
        seconds = round(time.time() - start, 2)
        finish(out, {"stage": name, "seconds": seconds, "info": info if isinstance(info, dict) else None})
        dist.barrier()
        fault_point("stage-done")
        log.info("%s finished in %.1f s", name, seconds)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_drift(old: dict, new: dict) -> list[str]:
    """Changed keys; a key the old config lacks (added by a later spinlm) counts only if not at its default."""
    a, b, default = _flat(old), _flat(new), _flat(Config().to_dict())
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if k not in HARMLESS and a.get(k) != b.get(k) and not (k not in a and b.get(k) == default.get(k))]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def acquire_lock(run_dir: Path) -> Path:
    """RUN/.lock holds the owner's host and pid: one process per run directory. A lock left by
    a dead process on this host is cleared with a message."""
    lock = run_dir / ".lock"
    me = {"host": socket.gethostname(), "pid": os.getpid()}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner = json.loads(lock.read_text() or "{}")
            except (OSError, ValueError):
                owner = {}
            if owner.get("host") == me["host"] and not _pid_alive(int(owner.get("pid", -1))):
                log.warning("%s: clearing a stale lock left by process %s, which is no longer running",
                            run_dir, owner.get("pid"))
                lock.unlink(missing_ok=True)
                continue
            raise UserError(f"{run_dir} is in use by process {owner.get('pid', '?')} on {owner.get('host', '?')} "
                            f"(lock file {lock}); wait for it to finish, or delete the lock if that process is gone")
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        atexit.register(release_lock, lock)
        preempt.at_exit(lambda: release_lock(lock))  # an exit at once skips atexit; a requeue may land elsewhere
        return lock
    raise UserError(f"{lock}: could not take the run lock")


def release_lock(lock: Path) -> None:
    try:
        if json.loads(lock.read_text()).get("pid") == os.getpid():
            lock.unlink()
    except (OSError, ValueError):
        pass


def open_run(cfg: Config, force: bool, provenance: dict | None = None) -> Path:
    """Create or resume RUN/: take its lock, refuse a changed config unless forced, log to RUN/log.txt.
    With several processes rank 0 does this and the others share its outcome."""
    run_dir = dist.on_main(lambda: _open_run(cfg, force, provenance))
    dist.barrier()
    return run_dir


def _open_run(cfg: Config, force: bool, provenance: dict | None = None) -> Path:
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    acquire_lock(run_dir)
    saved = run_dir / "config.yaml"
    if saved.exists():
        drift = config_drift(yaml.safe_load(saved.read_text(encoding="utf-8")) or {}, cfg.to_dict())
        if drift and not force:
            raise UserError(f"{run_dir} was started with a different config; these settings changed:\n  "
                            + "\n  ".join(drift) + "\nuse the old settings, another run.dir, or --force")
        if drift:
            log.warning("config changed on resume (--force): %s", "; ".join(drift))
        _warn_if_encoding_changed(run_dir)
    tmp = saved.with_name("config.yaml.tmp")
    tmp.write_text(to_yaml(cfg), encoding="utf-8")
    os.replace(tmp, saved)
    logger = logging.getLogger("spinlm")
    for old in [h for h in logger.handlers if isinstance(h, logging.FileHandler)]:  # an earlier run in this process
        logger.removeHandler(old)
        old.close()
    handler = logging.FileHandler(run_dir / "log.txt", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(handler)
    # provenance: the commits the model id and Hub datasets resolved to (validate.provenance)
    write_json(run_dir / "run_info.json", {**run_info(), **(provenance or {})})
    return run_dir


def _warn_if_encoding_changed(run_dir: Path) -> None:
    """A run started by a spinlm that turned text into token ids otherwise (`spinlm.tokens.ENCODING`): the
    rows of its unfinished generate/score stages are not resumed (their fingerprints hash the token ids), but
    its finished stages and training checkpoints are, so a mix is possible: say so."""
    before = (read_json(run_dir / "run_info.json") or {}).get("encoding", 1)
    if before != ENCODING:
        log.warning("%s was started by a spinlm that encoded prompts differently (encoding %s, now %s: a prompt "
                    "now starts with the BOS its tokenizer adds by default, e.g. Zephyr's <s>); the stages finished "
                    "before and a training checkpoint keep the old token ids, the rows of unfinished generate/score "
                    "stages are redone: finish the run with the spinlm that started it, or use another run.dir",
                    run_dir, before, ENCODING)


def run_info() -> dict:
    import accelerate
    import torch
    import transformers

    return {"spinlm": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "accelerate": accelerate.__version__, "peft": _version("peft"),
            "argv": sys.argv, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "encoding": ENCODING}  # spinlm.tokens.ENCODING: how text became token ids


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None
