"""Read (prompt, real response) examples from the dataset shapes SPIN users already have.

Sources: a local `.jsonl`, `.json` or `.parquet` file, or a Hugging Face Hub dataset id (with a subset and
revision), whose split's files spinlm.hub finds through huggingface_hub and the same readers read.
Row shapes (see FORMATS): the released SPIN data (`real`/`generated`), UltraChat-style
`messages`, TRL preference (`prompt`/`chosen`/`rejected`, strings or conversational),
plain `prompt`/`response`, and Alpaca (`instruction`/`input`/`output`).
`load_examples(..., preference=True)` (for `spinlm dpo`) also keeps each row's second response
in `Example.rejected`: TRL's `rejected`, or the SPIN data's `generated`.

Every problem in the user's data is a `UserError` that names the file, the 1-based row
(for JSON lines: the line number) and the field, and says what was expected.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from spinlm.errors import UserError, where

log = logging.getLogger("spinlm")

FORMATS = ("spin", "messages", "trl", "prompt_response", "alpaca")
TURNS = ("first", "last")
_ROLES = ("system", "user", "assistant")

# Required columns per format, in detection priority order (ultrachat rows carry both
# `prompt` and `messages`, so `messages` must win over the prompt-based formats).
_REQUIRED = {
    "spin": ("real",),
    "messages": ("messages",),
    "trl": ("prompt", "chosen"),
    "prompt_response": ("prompt", "response"),
    "alpaca": ("instruction", "output"),
}
# Columns a format reads; they are kept out of Example.extra. ultrachat's `prompt`
# only repeats the first user message.
_CONSUMED = {
    "spin": {"real", "generated"},
    "messages": {"messages", "prompt"},
    "trl": {"prompt", "chosen", "rejected"},
    "prompt_response": {"prompt", "response"},
    "alpaca": {"instruction", "input", "output"},
}
_ACCEPTED = (
    "real (+ generated) -> spin; messages -> messages; prompt + chosen (+ rejected) -> trl; "
    "prompt + response -> prompt_response; instruction + output (+ input) -> alpaca"
)
# Formats with two responses per prompt, and the field holding the second (rejected) one.
PREFERENCE_FIELDS = {"trl": "rejected", "spin": "generated"}
_READABLE_SUFFIXES = (".jsonl", ".json", ".parquet")
# Names with these suffixes are meant as files, never as Hub ids.
_FILE_SUFFIXES = _READABLE_SUFFIXES + (".csv", ".tsv", ".txt", ".gz", ".arrow")


@dataclass
class Example:
    """One training prompt with its human-written (real) response."""

    prompt: list[dict[str, str]]  # chat messages before the response; ends with a user message
    real: str  # the human (real) response text
    id: str  # row's prompt_id if present, else first 16 hex of sha1(prompt, real)
    source: str  # "path:row" (1-based row), for messages and debugging
    extra: dict = field(default_factory=dict)  # the row's other scalar fields (e.g. `answer`)
    rejected: str | None = None  # preference data only: the dispreferred response (TRL's `rejected`)


@dataclass(frozen=True)
class _At:
    """Location of the row being converted, to build error messages."""

    path: str
    row: int

    def error(self, fld: str | None, message: str) -> UserError:
        """A UserError prefixed with `file, row N, field 'x'`."""
        return UserError(f"{where(self.path, self.row, fld)}: {message}")


def _tname(value: Any) -> str:
    """Type name as a user would say it (JSON's `null` rather than NoneType)."""
    return "null" if value is None else type(value).__name__


# ---------------------------------------------------------------- reading rows


def _open_source(source: str, split: str, subset: str | None = None,
                 revision: str | None = None) -> tuple[str, Iterator[tuple[str, int, Any]], dict | None]:
    """Resolve `source` to (display name, iterator of (file name, 1-based row number in it, row), and for a Hub
    dataset what was read: id, subset, split, revision, commit, files)."""
    name = str(source)
    path = Path(name).expanduser()
    if path.is_file():
        return name, _rows_of(path, name), None
    looks_like_file = (path.suffix.lower() in _FILE_SUFFIXES
                       or name.startswith(("./", "../", "/", "~")))
    if looks_like_file and not path.exists():
        raise UserError(f"{name}: no such file (looked for {path.resolve()})")
    if path.is_dir():
        raise UserError(f"{name}: a directory; give a .jsonl, .json or .parquet file in it, or a Hub dataset id")
    # Not a local file: a Hub dataset id, resolved to the split's files through huggingface_hub's cache.
    from spinlm.hub import dataset_split

    found = dataset_split(name, split, subset, revision)
    subset_part = "" if found.subset == "default" else f", subset {found.subset}"
    label = f"{name}[{split}{subset_part}]@{found.commit[:12]}"
    return label, _hub_rows(found, label), {"id": name, "subset": found.subset, "split": split,
                                            "revision": revision, "commit": found.commit,
                                            "files": [rel for rel, _ in found.files]}


def _rows_of(path: Path, name: str) -> Iterator[tuple[str, int, Any]]:
    """Rows of one local file, by its suffix."""
    suffix = path.suffix.lower()
    if suffix not in _READABLE_SUFFIXES:
        raise UserError(
            f"{name}: unsupported file type '{suffix}'; expected .jsonl, .json or .parquet")
    reader = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}[suffix]
    for row_no, row in reader(path, name):
        yield name, row_no, row


def _hub_rows(found, label: str) -> Iterator[tuple[str, int, Any]]:
    """Rows of a Hub split's files in order; each file's rows numbered from 1 and named by the file."""
    for rel, local in found.files:
        yield from _rows_of(local, f"{label}/{rel}")


def _read_jsonl(path: Path, name: str) -> Iterator[tuple[int, Any]]:
    """Rows of a JSON lines file, read line by line so errors can name the line."""
    with open(path, "rb") as f:
        yield from _parse_json_lines(name, f)


def _parse_json_lines(name: str, lines: Iterable[bytes]) -> Iterator[tuple[int, Any]]:
    """Decode and parse one JSON value per non-blank line; row number = line number."""
    for lineno, raw in enumerate(lines, 1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(
                f"{where(name, lineno)}: line {lineno} is not valid UTF-8 "
                f"(byte 0x{raw[e.start]:02x} at column {e.start + 1}); save the file as UTF-8"
            ) from None
        if lineno == 1:
            text = text.lstrip("\ufeff")  # editors on Windows prepend a BOM
        if not text.strip():
            continue
        try:
            yield lineno, json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{where(name, lineno)}: invalid JSON on line {lineno}: "
                            f"{e.msg} at column {e.colno}") from None


def _read_json(path: Path, name: str) -> Iterator[tuple[int, Any]]:
    """Rows of a `.json` file: a JSON array of objects, or else JSON lines."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8").lstrip("\ufeff")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UserError(f"{where(name, line)}: line {line} is not valid UTF-8; "
                        "save the file as UTF-8") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("["):  # meant as one array: its own error is the useful one
            raise UserError(
                f"{name}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        yield from _parse_json_lines(name, data.splitlines())
        return
    if isinstance(doc, dict):  # a one-line JSON lines file parses as one document
        doc = [doc]
    if not isinstance(doc, list):
        raise UserError(f"{name}: expected a JSON array of objects, got {_tname(doc)}")
    yield from enumerate(doc, 1)


def _read_parquet(path: Path, name: str) -> Iterator[tuple[int, Any]]:
    """Rows of a parquet file as dicts."""
    import pyarrow
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (OSError, ValueError, pyarrow.ArrowException) as e:
        raise UserError(f"{name}: cannot read as parquet: {e}") from None
    yield from enumerate(rows, 1)


# ---------------------------------------------------------------- formats


def detect_format(row: dict, path: str, row_number: int = 1) -> str:
    """Name the format of `row` (the first data row) from its columns."""
    if not isinstance(row, dict):
        raise UserError(
            f"{where(path, row_number)}: expected an object with named fields, got {_tname(row)}")
    for fmt, cols in _REQUIRED.items():
        if all(c in row for c in cols):
            return fmt
    raise UserError(
        f"{where(path, row_number)}: cannot tell the data format from columns {sorted(row)}; "
        f"accepted column sets: {_ACCEPTED}"
    )


def _check_text(value: Any, at: _At, fld: str) -> str:
    """A non-blank string, returned unchanged (leading spaces can matter, e.g. completions)."""
    if not isinstance(value, str):
        raise at.error(fld, f"expected a non-empty string, got {_tname(value)}")
    if not value.strip():
        raise at.error(fld, "expected a non-empty string, got an empty or whitespace-only string")
    return value


def _bad_message(m: Any) -> str:
    """Describe why `m` is not a {'role': str, 'content': str} message."""
    if not isinstance(m, dict):
        return _tname(m)
    bad = [f"'{k}' " + ("missing" if k not in m else f"is {_tname(m[k])}")
           for k in ("role", "content") if not isinstance(m.get(k), str)]
    return "a dict whose " + " and ".join(bad)


def _messages(value: Any, at: _At, fld: str) -> list[dict[str, str]]:
    """Validate a list of chat messages; return copies holding only role and content."""
    if not isinstance(value, list):
        raise at.error(fld, "expected a list of messages {'role': ..., 'content': ...}, "
                            f"got {_tname(value)}")
    out = []
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)):
            raise at.error(f"{fld}[{i}]", "expected a message with string 'role' and 'content', "
                                          f"got {_bad_message(m)}")
        if m["role"] not in _ROLES:
            raise at.error(f"{fld}[{i}]",
                           f"unknown role {m['role']!r}; expected one of {', '.join(_ROLES)}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _check_prompt(msgs: list[dict[str, str]], at: _At, fld: str) -> list[dict[str, str]]:
    """The prompt must end with a non-blank user message for the response to answer."""
    if not msgs:
        raise at.error(fld, "expected at least one user message before the assistant reply, "
                            "found none")
    if msgs[-1]["role"] != "user":
        raise at.error(fld, "expected the prompt to end with a user message, "
                            f"got a {msgs[-1]['role']} message")
    if not msgs[-1]["content"].strip():
        raise at.error(fld, "expected a non-empty user message, "
                            "got an empty or whitespace-only one")
    return msgs


def _select_turn(msgs: list[dict[str, str]], turn: str, at: _At, fld: str,
                 start: int = 0, base: int = 0, prompt_fld: str | None = None) -> tuple[list, str]:
    """Split a conversation at the first/last assistant message at index >= `start`.

    `base` maps an index in `msgs` to an index in the row's `fld` list, for messages.
    """
    picks = [i for i in range(start, len(msgs)) if msgs[i]["role"] == "assistant"]
    if not picks:
        roles = ", ".join(m["role"] for m in msgs[start:]) or "none"
        raise at.error(fld, "expected a conversation with an assistant reply, "
                            f"found no assistant message (roles: {roles})")
    i = picks[0] if turn == "first" else picks[-1]
    if turn == "last" and i != len(msgs) - 1:
        raise at.error(
            fld, f"the conversation ends with a {msgs[-1]['role']} message after the last "
                 "assistant reply; turn='last' expects it to end with the assistant reply "
                 "(use turn='first', or drop the trailing turn)")
    prompt = _check_prompt(msgs[:i], at, prompt_fld or fld)
    return prompt, _check_text(msgs[i]["content"], at, f"{fld}[{i - base}].content")


def _from_spin(row: dict, turn: str, at: _At) -> tuple[list, str]:
    """SPIN data: `real` is [user..., assistant]; `generated` is the old model's reply to the same
    prompt (not read as a response, but checked to answer the same prompt: a row whose two sides
    disagree about the conversation is an input error, not silently trained on)."""
    prompt, real = _select_turn(_messages(row["real"], at, "real"), turn, at, "real")
    gen = row.get("generated")
    if gen is not None:
        if not isinstance(gen, list):
            raise at.error("generated", f"expected a list of messages, got {_tname(gen)}")
        gen_msgs = _messages(gen, at, "generated")
        picks = [i for i, m in enumerate(gen_msgs) if m["role"] == "assistant"]
        cut = (picks[0] if turn == "first" else picks[-1]) if picks else len(gen_msgs)
        _same_prompt(prompt, gen_msgs[:cut], at, "generated", "real")
    return prompt, real


def _same_prompt(expected: list[dict], got: list[dict], at: _At, fld: str, other: str) -> None:
    """Both sides of a row must answer the same conversation; name the first message that differs."""
    if got == expected:
        return
    k = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
    seen = f"{got[k]['role']} message {got[k]['content'][:60]!r}" if k < len(got) else "nothing"
    want = f"{expected[k]['role']} message {expected[k]['content'][:60]!r}" if k < len(expected) else "nothing"
    raise at.error(f"{fld}[{k}]", f"the conversation before this side's reply differs from {other}'s: {want} "
                                  f"expected, {seen} found; both sides of a pair must answer the same prompt")


def _from_messages(row: dict, turn: str, at: _At) -> tuple[list, str]:
    """UltraChat-style `messages`: a (multi-turn) conversation. UltraChat's `prompt` column repeats the
    first user message; a row where it does not is refused (which one is the prompt?)."""
    msgs = _messages(row["messages"], at, "messages")
    prompt_col = row.get("prompt")
    first_user = next((m["content"] for m in msgs if m["role"] == "user"), None)
    if isinstance(prompt_col, str) and first_user is not None and prompt_col.strip() != first_user.strip():
        raise at.error("prompt", f"{prompt_col[:60]!r} differs from the first user message of 'messages' "
                                 f"({first_user[:60]!r}); in this format 'prompt' repeats it: fix one of them, or "
                                 "drop the 'prompt' column")
    return _select_turn(msgs, turn, at, "messages")


def _from_trl(row: dict, turn: str, at: _At) -> tuple[list, str]:
    """TRL preference rows, plain strings or conversational; `rejected` is read by `_rejected`."""
    return _trl_response(row, "chosen", turn, at)


def _trl_prompt(row: dict, at: _At) -> list[dict[str, str]]:
    prompt = row["prompt"]
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list):
        return _messages(prompt, at, "prompt")
    raise at.error("prompt", f"expected a string or a list of messages, got {_tname(prompt)}")


def _trl_response(row: dict, fld: str, turn: str, at: _At) -> tuple[list, str]:
    """(prompt, text) of one response column (`chosen` or `rejected`) of a TRL row."""
    pmsgs, value = _trl_prompt(row, at), row[fld]
    if isinstance(value, str):
        return _check_prompt(pmsgs, at, "prompt"), _check_text(value, at, fld)
    if not isinstance(value, list):
        raise at.error(fld, f"expected a string or a list of messages, got {_tname(value)}")
    rmsgs = _messages(value, at, fld)
    # Older exports repeat the prompt inside the response (TRL's "implicit prompt" form).
    repeated = len(rmsgs) > len(pmsgs) and rmsgs[: len(pmsgs)] == pmsgs
    if not repeated and rmsgs and rmsgs[0]["role"] != "assistant":
        # a conversation of its own that is not the prompt repeated: it disagrees with `prompt`
        _same_prompt(pmsgs, rmsgs[: len(pmsgs)], at, fld, "'prompt'")
        raise at.error(f"{fld}[0]", f"expected the response to start with an assistant message (or to repeat the "
                                    f"prompt first), got a {rmsgs[0]['role']} message")
    conv = rmsgs if repeated else pmsgs + rmsgs
    base = 0 if repeated else len(pmsgs)
    return _select_turn(conv, turn, at, fld, start=len(pmsgs), base=base, prompt_fld="prompt")


def _rejected(row: dict, fmt: str, turn: str, at: _At) -> tuple[list, str]:
    """(prompt, text) of the second response of a preference row: TRL's `rejected`, or SPIN data's
    `generated`."""
    fld = PREFERENCE_FIELDS.get(fmt)
    if fld is None:
        raise at.error(None, f"format '{fmt}' has one response per prompt; preference training (DPO) needs two: "
                             "prompt + chosen + rejected (trl) or real + generated (spin)")
    if row.get(fld) is None:
        raise at.error(fld, f"missing; preference training (DPO) needs the {fld} response of every row "
                            f"(format '{fmt}'), this row has {sorted(row)}")
    if fmt == "trl":
        return _trl_response(row, fld, turn, at)
    return _select_turn(_messages(row[fld], at, fld), turn, at, fld)


def _from_prompt_response(row: dict, turn: str, at: _At) -> tuple[list, str]:
    """Plain `prompt` + `response` strings; the prompt becomes one user message."""
    prompt = _check_text(row["prompt"], at, "prompt")
    return [{"role": "user", "content": prompt}], _check_text(row["response"], at, "response")


def _from_alpaca(row: dict, turn: str, at: _At) -> tuple[list, str]:
    """Alpaca: user message = instruction, plus a blank line and `input` when there is one."""
    content = _check_text(row["instruction"], at, "instruction")
    extra_input = row.get("input")
    if extra_input is not None and not isinstance(extra_input, str):
        raise at.error("input", f"expected a string (or no field), got {_tname(extra_input)}")
    if extra_input and extra_input.strip():
        content = f"{content}\n\n{extra_input}"
    return [{"role": "user", "content": content}], _check_text(row["output"], at, "output")


_CONVERTERS = {
    "spin": _from_spin,
    "messages": _from_messages,
    "trl": _from_trl,
    "prompt_response": _from_prompt_response,
    "alpaca": _from_alpaca,
}


# ---------------------------------------------------------------- examples


def _example_id(row: dict, prompt: list, real: str, at: _At) -> str:
    """The row's `prompt_id` when present, else a content hash (stable across runs)."""
    pid = row.get("prompt_id")
    if isinstance(pid, bool) or not (pid is None or isinstance(pid, (str, int))):
        raise at.error("prompt_id", f"expected a string id, got {_tname(pid)}")
    if pid is not None and str(pid).strip():
        return str(pid)
    blob = json.dumps([prompt, real], ensure_ascii=False, sort_keys=True)
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()[:16]


def _to_example(row: dict, fmt: str, how: str, turn: str, at: _At, preference: bool = False) -> Example:
    """Convert one row of format `fmt` (chosen `how`: explicitly or detected) to an Example;
    with `preference`, the row's rejected response is kept too."""
    if not isinstance(row, dict):
        raise at.error(None, f"expected an object with named fields, got {_tname(row)}")
    for col in _REQUIRED[fmt]:
        if col not in row:
            raise at.error(col, f"missing; format '{fmt}' ({how}) needs fields "
                                f"{', '.join(_REQUIRED[fmt])}, this row has {sorted(row)}")
    prompt, real = _CONVERTERS[fmt](row, turn, at)
    skip = _CONSUMED[fmt] | {"prompt_id"}
    extra = {k: v for k, v in row.items()
             if k not in skip and (v is None or isinstance(v, (str, int, float, bool)))}
    rejected = None
    if preference:
        rejected_prompt, rejected = _rejected(row, fmt, turn, at)
        _same_prompt(prompt, rejected_prompt, at, PREFERENCE_FIELDS[fmt], "the chosen side" if fmt == "trl" else "real")
    return Example(prompt=prompt, real=real, id=_example_id(row, prompt, real, at),
                   source=f"{at.path}:{at.row}", extra=extra, rejected=rejected)


def _check_options(format: str, turn: str, max_rows: int | None) -> None:
    """Reject option values we do not understand before reading anything."""
    if format != "auto" and format not in FORMATS:
        raise UserError(
            f"unknown data format {format!r}; expected 'auto' or one of {', '.join(FORMATS)}")
    if turn not in TURNS:
        raise UserError(f"unknown turn {turn!r}; expected 'first' or 'last'")
    bad_type = isinstance(max_rows, bool) or not isinstance(max_rows, int)
    if max_rows is not None and (bad_type or max_rows < 1):
        raise UserError(f"max_rows must be a positive integer or None, got {max_rows!r}")


def _make_ids_unique(examples: list[Example], name: str) -> None:
    """Suffix repeated ids (-2, -3, ...): later stages key generations and scores by id."""
    used: set[str] = set()
    renamed = 0
    for ex in examples:
        base, k = ex.id, 1
        while ex.id in used:
            k += 1
            ex.id = f"{base}-{k}"
        renamed += k > 1
        used.add(ex.id)
    if renamed:
        log.warning("%s: %d examples repeated an earlier example's id (same prompt_id, or "
                    "duplicates kept with dedupe=False); suffixed them -2, -3, ... to keep ids "
                    "unique", name, renamed)


def split_validation(examples: list[Example], size: float, seed: int,
                     cap: int | None = None) -> tuple[list[Example], list[Example]]:
    """(train, validation): a seeded slice of `size` examples (a share below 1, a count from 1 up; at
    most `cap`) split off for selection, so that nothing is chosen on the held-out data that is then
    reported. Which rows are chosen depends only on (seed, example id); both parts keep file order."""
    n = int(size) if size >= 1 else max(1, round(size * len(examples))) if size > 0 else 0
    n = min(n, cap if cap is not None else n, len(examples) - 1)
    if n <= 0:
        return examples, []
    order = sorted(range(len(examples)), key=lambda i: hashlib.sha256(f"{seed}:{examples[i].id}".encode()).digest())
    chosen = set(order[:n])
    return ([ex for i, ex in enumerate(examples) if i not in chosen],
            [ex for i, ex in enumerate(examples) if i in chosen])


def load_examples(source: str, *, split: str = "train", format: str = "auto", turn: str = "first",
                  max_rows: int | None = None, dedupe: bool = True, counts: dict | None = None,
                  preference: bool = False, subset: str | None = None, revision: str | None = None) -> list[Example]:
    """Load examples from a local .jsonl/.json/.parquet file or a Hub dataset id.

    `format="auto"` detects the format from the first row; every row is then checked against
    it. `turn` picks the first (the paper's choice) or last assistant reply of a conversation.
    `dedupe` drops exact (prompt, real) repeats, keeping the first; `max_rows` keeps the
    first N examples after dedupe (reading stops there). `counts`, if given, receives the
    number of duplicates dropped, and for a Hub dataset `hub`: the commit and files read. `preference` (DPO)
    also reads each row's rejected response (formats trl and spin, see PREFERENCE_FIELDS); a row without one
    is an error. For a Hub dataset id, `subset` (config) and `revision` choose what `split` is read from
    (spinlm.hub.dataset_split).
    """
    _check_options(format, turn, max_rows)
    name, rows, hub = _open_source(source, split, subset, revision)
    auto = format == "auto"
    fmt = None if auto else format
    how = "detected from the first row" if auto else "given explicitly"
    examples: list[Example] = []
    seen: set[tuple[str, str]] = set()
    dropped = 0
    for file, row_no, row in rows:
        at = _At(file, row_no)
        fmt = fmt or detect_format(row, file, row_no)
        ex = _to_example(row, fmt, how, turn, at, preference)
        key = (json.dumps(ex.prompt, ensure_ascii=False), ex.real, ex.rejected)
        if dedupe and key in seen:
            dropped += 1
            continue
        seen.add(key)
        examples.append(ex)
        if max_rows is not None and len(examples) >= max_rows:
            break
    if not examples:
        raise UserError(f"{name}: no data rows (the file or split is empty)")
    if dropped:
        log.warning("%s: dropped %d duplicate examples (same prompt and real response; "
                    "kept the first)", name, dropped)
    _make_ids_unique(examples, name)
    if counts is not None:
        counts["duplicates"] = dropped
        if hub:
            counts["hub"] = hub
    return examples
