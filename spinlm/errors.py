"""Errors a user can act on.

`UserError` is raised for anything the user can fix (bad config, bad data, missing files).
The CLI turns it into one line on stderr and exit code 2, with no traceback. `TrainingStopped`
(exit code 3) is a guard that stopped training. `Preempted` (exit code 75) is a stage stopped by a
signal at a safe point (spinlm.preempt), leaving state a re-run resumes. Any other exception is our
bug: the CLI prints the traceback and exits 1.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input: printed as one clear message, exit code 2."""

    exit_code = 2


class TrainingStopped(UserError):
    """Training stopped itself (a non-finite loss or gradient): one message, exit code 3."""

    exit_code = 3


class Preempted(Exception):
    """A stage stopped at a safe point on a signal (spinlm.preempt); what it kept is in the message.
    Exit code 75 (EX_TEMPFAIL, "try again later"): a job script requeues, the re-run resumes."""

    exit_code = 75


def where(path: str, row: int | None = None, field: str | None = None) -> str:
    """Format a location as `file, row N, field 'x'` for error messages (rows are 1-based)."""
    parts = [str(path)]
    if row is not None:
        parts.append(f"row {row}")
    if field is not None:
        parts.append(f"field '{field}'")
    return ", ".join(parts)


def disk_full(error: BaseException | None) -> bool:
    """True if `error` (or what caused it) is a write refused for lack of space: no space left,
    quota exceeded, or the file size limit. safetensors reports these as its own error type."""
    import errno

    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return True
        text = str(error)
        if any(s in text for s in ("No space left", "os error 28", "Disk quota", "os error 122", "File too large",
                                   "os error 27")):
            return True
        error = error.__cause__ or error.__context__
    return False
