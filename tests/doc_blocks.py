"""Shell blocks of README.md and docs/ for the tests that run them: each block is preceded by a marker line,
    <!-- commands run by tests/FILE.py::TEST ... -->
    <!-- commands not run in tests: WHY -->
and the test named reads its commands with doc_commands(), so the page and the test cannot drift apart.
A recipe's (configs/*.yaml) header comment documents its launch commands too: recipe_commands() reads them."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN_BY = re.compile(r"<!-- commands run by (tests/[\w/]+\.py)::(\w+)")
NOT_RUN = re.compile(r"<!-- commands not run in tests: \S.*-->")


def shell_blocks(page: Path) -> list[tuple[str, list[str]]]:
    """(the line before the block, the block's lines) for every ```bash block of a page."""
    lines = page.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```bash":
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            blocks.append((lines[i - 1] if i else "", lines[i + 1:end]))
            i = end
        i += 1
    return blocks


def doc_commands(page: str, test: str) -> list[list[str]]:
    """The commands (argv lists, comments and blank lines dropped, `\\` continuations joined) of the block
    of `page` (relative to the repo) whose marker names `test`."""
    found = [body for marker, body in shell_blocks(ROOT / page) if (m := RUN_BY.search(marker)) and m[2] == test]
    assert len(found) == 1, f"{page}: expected one shell block run by {test}, found {len(found)}"
    return _argv("\n".join(found[0]))


def _argv(text: str) -> list[list[str]]:
    text = text.replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in text.splitlines() if shlex.split(line, comments=True)]


def recipe_commands(recipe: str) -> list[list[str]]:
    """The commands (argv lists) in the header comment of a recipe (relative to the repo): its comment lines
    before the first key whose text, after `#`, starts with `spinlm`, `torchrun` or `accelerate`, with the
    lines a `\\` continues."""
    header = []
    for line in (ROOT / recipe).read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line[1:].strip())
    lines, keep = [], False
    for line in header:
        keep = line.split(" ", 1)[0] in ("spinlm", "torchrun", "accelerate") or (keep and lines[-1].endswith("\\"))
        if keep:
            lines.append(line)
    return _argv("\n".join(lines))
