"""Files of a run: JSON lines, atomic writes and stage markers.

A stage's output is written to a temporary path, renamed into place, and only then marked
done, so a crash never leaves partial output that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from spinlm.errors import UserError, disk_full


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    """Write rows atomically: temp file, fsync, rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: str | Path, obj: Any) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_main(path: str | Path, obj: Any) -> None:
    """write_json on rank 0 only (every process computed `obj`)."""
    from spinlm import dist

    if dist.is_main():
        write_json(path, obj)


def read_json(path: str | Path, default: Any = None) -> Any:
    path = Path(path)
    if not path.exists():
        return default
    return json.loads(path.read_text(encoding="utf-8"))


def produce(out: Path, fn) -> Any:
    """Run `fn(tmp)` to write a file or directory at a fresh temporary path, then move it to
    `out` (replacing a stale one): a crash never leaves a half-written `out`. Returns fn's result.
    With several processes all run `fn` (each doing its share; rank 0 writes) and rank 0 moves."""
    from spinlm import dist

    tmp = out.with_name(out.name + ".tmp")
    if dist.is_main():
        out.parent.mkdir(parents=True, exist_ok=True)
        fresh_tmp(out)
    dist.barrier()
    try:
        result = fn(tmp)
    except Exception as e:
        if not disk_full(e):
            raise
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        raise UserError(f"{out}: the disk is full (writing it failed: {e}); nothing was marked done and rows or "
                        "checkpoints finished so far are kept: free some space, then re-run the same command to "
                        "resume") from None
    dist.barrier()
    if dist.is_main():
        if out.is_dir():
            shutil.rmtree(out)
        os.replace(tmp, out)
    dist.barrier()
    return result


def finish(out: Path, info: dict | None = None) -> None:
    """After produce(out, ...), on rank 0: the `.done` marker holding `info` (where the output counts
    as a finished stage), then the stage's scratch files removed. The one sequence every stage,
    recipe and experiment ends with."""
    from spinlm import dist

    if dist.is_main():
        if info is not None:
            mark_done(out, info)
        remove_scratch(out)


def scratch(out: Path, kind: str) -> Path:
    """Work files of a stage writing `out` that outlive a crash: `out`.partial (finished rows),
    `out`.checkpoints (training state). Removed once the stage is done."""
    return out.with_name(f"{out.name}.{kind}")


def remove_scratch(out: Path) -> None:
    tmp = out.with_name(out.name + ".tmp")
    for path in [*tmp.parent.glob(tmp.name + ".partial*"), scratch(tmp, "checkpoints")]:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def fingerprint(*parts: Any) -> str:
    """A digest of everything that determines a stage's rows (a partial file from other
    inputs is not resumed)."""
    import hashlib

    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _read_log(path: Path, key: str) -> tuple[dict, int]:
    """(rows by index, bytes of intact lines) of a row log; nothing if its fingerprint differs."""
    done, good = {}, 0
    lines = path.read_bytes().split(b"\n")[:-1]  # what follows the last newline is torn
    for n, line in enumerate(lines):
        try:
            obj = json.loads(line)
        except ValueError:
            break
        if n == 0 and obj.get("fingerprint") != key:
            return {}, 0
        if n > 0:
            done[obj["i"]] = obj["row"]
        good += len(line) + 1
    return done, good


class RowLog:
    """Finished rows of a stage, appended and fsynced as they are produced, so a killed stage
    resumes where it stopped. Line 1 holds the inputs' fingerprint; then {"i": index, "row": ...}.
    A torn last line (a kill during the write) is cut off on reopening. `also` (a glob) names
    sibling logs whose rows count as done too: other processes' logs, or those of an attempt
    with another number of processes."""

    def __init__(self, path: Path, key: str, also: Path | None = None):
        self.path, self.done, good = path, {}, 0
        for other in sorted(also.parent.glob(also.name)) if also is not None else []:
            if other != path:
                self.done.update(_read_log(other, key)[0])
        if path.exists():
            mine, good = _read_log(path, key)
            self.done.update(mine)
        if self.done:
            import logging

            logging.getLogger("spinlm").info("%s: resuming with %d rows finished earlier", path, len(self.done))
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "r+b" if good else "wb")
        self.file.truncate(good)
        self.file.seek(good)
        if not good:
            self._write([{"fingerprint": key}])

    def add(self, rows: list[tuple[int, dict]]) -> None:
        self._write([{"i": i, "row": row} for i, row in rows])
        self.done.update(rows)

    def _write(self, objs: list[dict]) -> None:
        self.file.write(b"".join(json.dumps(o, ensure_ascii=False).encode() + b"\n" for o in objs))
        self.file.flush()
        os.fsync(self.file.fileno())

    def __enter__(self) -> "RowLog":
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()


def marker(out: Path) -> Path:
    return out.with_name(out.name + ".done")


def is_done(out: Path) -> bool:
    """Done = the output exists and its marker was written after it."""
    return out.exists() and marker(out).exists()


def mark_done(out: Path, info: dict) -> None:
    write_json(marker(out), {"finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "finished_unix": time.time(), **info})


def fresh_tmp(out: Path) -> Path:
    """A clean temporary sibling of `out` (left-overs of a crashed attempt are removed)."""
    tmp = out.with_name(out.name + ".tmp")
    if tmp.is_dir():
        shutil.rmtree(tmp)
    elif tmp.exists():
        tmp.unlink()
    marker(out).unlink(missing_ok=True)
    return tmp


_FAULT_HITS: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Testing aid: `SPINLM_FAULT=name[:k]` sends this process SIGKILL the k-th time (default
    the first) it reaches the point `name`: a real kill -9 at a chosen moment, for the
    kill/resume tests. Does nothing when the variable is unset."""
    spec = os.environ.get("SPINLM_FAULT")
    if not spec:
        return
    target, _, count = spec.partition(":")
    if target != name:
        return
    _FAULT_HITS[name] = _FAULT_HITS.get(name, 0) + 1
    if _FAULT_HITS[name] >= int(count or 1):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
