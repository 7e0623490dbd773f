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


def read_json(path: str | Path, default: Any = None) -> Any:
    path = Path(path)
    if not path.exists():
        return default
    return json.loads(path.read_text(encoding="utf-8"))


def produce(out: Path, fn) -> Any:
    """Run `fn(tmp)` to write a file or directory at a fresh temporary path, then move it to
    `out` (replacing a stale one): a crash never leaves a half-written `out`. Returns fn's result."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = fresh_tmp(out)
    result = fn(tmp)
    if out.is_dir():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return result


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
