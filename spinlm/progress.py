"""Progress of long loops: a tqdm bar on a terminal, plain log lines anywhere else.

When stderr is not a terminal (a log file, a pipe, a job scheduler), a carriage-return bar turns
into thousands of partial lines; there, one line is logged every `run.progress_every_s` seconds
with done / total, the rate and the time left, and one when the loop ends.
"""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("spinlm")
_every_s = 30.0


def configure(run_cfg) -> None:
    """Take the interval of the log lines from the config (run.progress_every_s)."""
    global _every_s
    _every_s = float(run_cfg.progress_every_s)


def bar(total: int, desc: str, enabled: bool = True):
    """Something with update(n) and close(): tqdm on a terminal, log lines elsewhere, nothing when off."""
    if enabled and sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, leave=False)
    return Lines(total, desc, _every_s, enabled)


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Lines:
    """A progress bar as log lines: `desc: done/total (share), rate/s, ETA h:mm:ss`."""

    def __init__(self, total: int, desc: str, every_s: float, enabled: bool = True):
        self.total, self.desc, self.every_s, self.enabled = total, desc, every_s, enabled
        self.done, self.start = 0, time.monotonic()
        self.last = self.start

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and now - self.last >= self.every_s and self.done < self.total:
            self.last = now
            log.info("%s", self.line(now))

    def line(self, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        eta = _clock((self.total - self.done) / rate) if rate > 0 else "?"
        return f"{self.desc}: {self.done}/{self.total}{share}, {rate:.3g}/s, ETA {eta}"

    def close(self) -> None:
        if self.enabled and self.total:
            log.info("%s: %d/%d in %s", self.desc, self.done, self.total, _clock(time.monotonic() - self.start))
        self.enabled = False
