"""Errors a user can act on.

`UserError` is raised for anything the user can fix (bad config, bad data, missing files).
The CLI turns it into one line on stderr and exit code 2, with no traceback. `TrainingStopped`
(exit code 3) is a guard that stopped training. Any other exception is our bug: the CLI prints the traceback and exits 1.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input: printed as one clear message, exit code 2."""

    exit_code = 2


class TrainingStopped(UserError):
    """Training stopped itself (a non-finite loss or gradient): one message, exit code 3."""

    exit_code = 3


def where(path: str, row: int | None = None, field: str | None = None) -> str:
    """Format a location as `file, row N, field 'x'` for error messages (rows are 1-based)."""
    parts = [str(path)]
    if row is not None:
        parts.append(f"row {row}")
    if field is not None:
        parts.append(f"field '{field}'")
    return ", ".join(parts)
