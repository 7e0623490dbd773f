"""Tests for spinlm.data: reading the dataset shapes of SPIN.md, and clear errors on bad data."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest

from spinlm.data import FORMATS, detect_format, load_examples
from spinlm.errors import UserError

SAMPLES = Path(__file__).resolve().parent / "data" / "formats"  # copies of the shapes in the wild (README.md there)


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def raises_user_error(*parts: str, **kwargs) -> str:
    """Call load_examples(**kwargs), expect a UserError whose message contains every part."""
    with pytest.raises(UserError) as info:
        load_examples(**kwargs)
    message = str(info.value)
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"
    return message


# ---------------------------------------------------------------- the sample files


@pytest.mark.parametrize("name", ["spin_iter.jsonl", "spin_iter.parquet"])
def test_spin_samples(name):
    examples = load_examples(str(SAMPLES / name))
    assert [e.prompt for e in examples] == [
        [user("Name three primary colors.")],
        [user("What is 12 times 11?")],
        [user("Write a haiku about rain.")],
    ]
    assert [e.real for e in examples] == [
        "Red, yellow and blue are the traditional primary colors.",
        "12 times 11 is 132.",
        "Soft rain on the roof\nthe garden drinks in silence\nevening smells of earth",
    ]
    assert [e.source for e in examples] == [f"{SAMPLES / name}:{i}" for i in (1, 2, 3)]
    assert all(e.extra == {} for e in examples)  # `generated` is consumed, not extra


@pytest.mark.parametrize("name", ["ultrachat.jsonl", "ultrachat.parquet"])
def test_ultrachat_first_turn_keeps_system_message(name):
    examples = load_examples(str(SAMPLES / name))
    assert [e.id for e in examples] == ["a1", "a2", "a3"]
    assert examples[0].prompt == [user("How do I boil an egg?")]
    assert examples[0].real == (
        "Put the egg in boiling water for about nine minutes, then cool it in cold water.")
    assert examples[1].prompt == [
        {"role": "system", "content": "You are a concise translator."},
        user("Translate 'good morning' into French."),
    ]
    assert examples[1].real == "Bonjour."
    assert examples[2].real == "2 and 3."
    assert examples[0].extra == {}  # `prompt` repeats the first user turn: consumed


@pytest.mark.parametrize("name", ["ultrachat.jsonl", "ultrachat.parquet"])
def test_ultrachat_last_turn(name):
    examples = load_examples(str(SAMPLES / name), turn="last")
    assert examples[0].prompt == [
        user("How do I boil an egg?"),
        assistant("Put the egg in boiling water for about nine minutes, "
                  "then cool it in cold water."),
        user("And for a soft yolk?"),
    ]
    assert examples[0].real == "Take it out after six minutes instead."
    assert examples[1].prompt[0] == {"role": "system", "content": "You are a concise translator."}
    assert examples[1].real == "Bonjour."


def test_trl_conversational_and_string_rows():
    examples = load_examples(str(SAMPLES / "trl_preference.jsonl"))
    assert examples[0].prompt == [user("What is the capital of Italy?")]
    assert examples[0].real == "Rome."
    assert examples[1].prompt == [user("Complete: the sky is")]
    assert examples[1].real == " blue on a clear day."  # leading space kept: it is a completion


def test_prompt_response_sample():
    examples = load_examples(str(SAMPLES / "prompt_response.jsonl"))
    assert [(e.prompt, e.real) for e in examples] == [
        ([user("Reverse the word 'stone'.")], "enots"),
        ([user("Add 17 and 25.")], "17 + 25 = 42"),
    ]


def test_alpaca_with_and_without_input():
    examples = load_examples(str(SAMPLES / "alpaca.jsonl"))
    assert examples[0].prompt == [user("Sort the numbers in ascending order.\n\n9 4 7")]
    assert examples[0].real == "4 7 9"
    assert examples[1].prompt == [user("Give a synonym for 'quick'.")]
    assert examples[1].real == "fast"


@pytest.mark.parametrize("name, fmt", [
    ("spin_iter.jsonl", "spin"), ("ultrachat.parquet", "messages"), ("trl_preference.jsonl", "trl"),
    ("prompt_response.jsonl", "prompt_response"), ("alpaca.jsonl", "alpaca"),
])
def test_detect_format_of_samples(name, fmt):
    first = load_examples(str(SAMPLES / name), format=fmt)[0]
    assert first == load_examples(str(SAMPLES / name))[0]  # explicit == detected
    if name.endswith(".jsonl"):
        row = json.loads((SAMPLES / name).read_text().splitlines()[0])
    else:
        import pyarrow.parquet as pq

        row = pq.read_table(SAMPLES / name).to_pylist()[0]
    assert detect_format(row, name) == fmt
    assert fmt in FORMATS


# ---------------------------------------------------------------- ids, extra, dedupe, options


def test_hash_ids_are_stable_and_content_based(tmp_path):
    examples = load_examples(str(SAMPLES / "prompt_response.jsonl"))
    again = load_examples(str(SAMPLES / "prompt_response.jsonl"))
    assert [e.id for e in examples] == [e.id for e in again]
    blob = json.dumps([[user("Reverse the word 'stone'.")], "enots"],
                      ensure_ascii=False, sort_keys=True)
    assert examples[0].id == hashlib.sha1(blob.encode()).hexdigest()[:16]
    # same content in another file and format: same id
    moved = write_jsonl(tmp_path / "moved.jsonl", [{"instruction": "Reverse the word 'stone'.",
                                                    "output": "enots"}])
    assert load_examples(str(moved))[0].id == examples[0].id


def test_prompt_id_used_and_repeated_ids_made_unique(tmp_path, caplog):
    path = write_jsonl(tmp_path / "ids.jsonl", [
        {"prompt": "a", "response": "x", "prompt_id": "p1"},
        {"prompt": "a", "response": "y", "prompt_id": "p1"},
        {"prompt": "b", "response": "z", "prompt_id": 7},
    ])
    with caplog.at_level(logging.WARNING, logger="spinlm"):
        examples = load_examples(str(path))
    assert [e.id for e in examples] == ["p1", "p1-2", "7"]
    assert "ids.jsonl" in caplog.text and "id" in caplog.text


def test_extra_keeps_other_scalar_fields(tmp_path):
    path = write_jsonl(tmp_path / "extra.jsonl", [
        {"prompt": "2+2=", "response": "4", "answer": "4", "kind": "add", "level": 1,
         "hard": False, "note": None, "meta": {"nested": 1}, "tags": ["a"]},
    ])
    ex = load_examples(str(path))[0]
    assert ex.extra == {"answer": "4", "kind": "add", "level": 1, "hard": False, "note": None}
    json.dumps(ex.extra)  # must be JSON-serialisable


def test_dedupe_drops_exact_duplicates_and_warns(tmp_path, caplog):
    path = write_jsonl(tmp_path / "dups.jsonl", [
        {"prompt": "q1", "response": "r1"},
        {"prompt": "q1", "response": "r1"},
        {"prompt": "q1", "response": "r2"},
        {"prompt": "q1", "response": "r1", "kind": "differs only in extra"},
    ])
    with caplog.at_level(logging.WARNING, logger="spinlm"):
        examples = load_examples(str(path))
    assert [(e.real, e.source) for e in examples] == [("r1", f"{path}:1"), ("r2", f"{path}:3")]
    assert "dropped 2 duplicate" in caplog.text and "dups.jsonl" in caplog.text
    kept = load_examples(str(path), dedupe=False)
    assert len(kept) == 4
    assert len({e.id for e in kept}) == 4  # duplicates kept get distinct ids


def test_max_rows_counts_after_dedupe(tmp_path):
    path = write_jsonl(tmp_path / "many.jsonl", [
        {"prompt": "q1", "response": "r1"}, {"prompt": "q1", "response": "r1"},
        {"prompt": "q2", "response": "r2"}, {"prompt": "q3", "response": "r3"},
    ])
    assert [e.real for e in load_examples(str(path), max_rows=2)] == ["r1", "r2"]
    assert [e.real for e in load_examples(str(path), max_rows=2, dedupe=False)] == ["r1", "r1"]


def test_blank_lines_skipped_and_rows_are_line_numbers(tmp_path):
    path = tmp_path / "gaps.jsonl"
    path.write_text('\n{"prompt": "a", "response": "b"}\n\n{"prompt": "c", "response": "d"}\n')
    assert [e.source for e in load_examples(str(path))] == [f"{path}:2", f"{path}:4"]


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "a", "response": "b"}).encode())
    assert load_examples(str(path))[0].real == "b"
    as_json = tmp_path / "bom.json"
    as_json.write_bytes(b"\xef\xbb\xbf" + json.dumps([{"prompt": "a", "response": "c"}]).encode())
    assert load_examples(str(as_json))[0].real == "c"


def test_json_array_and_json_lines_fallback(tmp_path):
    arr = tmp_path / "arr.json"
    arr.write_text(json.dumps([{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d"}],
                              indent=2))
    assert [e.real for e in load_examples(str(arr))] == ["b", "d"]
    lines = write_jsonl(tmp_path / "lines.json", [{"prompt": "a", "response": "b"},
                                                  {"prompt": "c", "response": "d"}])
    assert [e.source for e in load_examples(str(lines))] == [f"{lines}:1", f"{lines}:2"]


def test_trl_implicit_prompt_and_multi_turn_prompt(tmp_path):
    path = write_jsonl(tmp_path / "trl.jsonl", [
        # chosen repeats the prompt (older exports)
        {"prompt": [user("hi")], "chosen": [user("hi"), assistant("hello")], "rejected": []},
        # multi-turn prompt: the reply to answer is the one in `chosen`, not the prompt's
        {"prompt": [user("a"), assistant("b"), user("c")], "chosen": [assistant("d")],
         "rejected": [assistant("e")]},
    ])
    first, second = load_examples(str(path))
    assert (first.prompt, first.real) == ([user("hi")], "hello")
    assert second.prompt == [user("a"), assistant("b"), user("c")]
    assert second.real == "d"


def test_bad_options():
    raises_user_error("unknown data format 'csv'", "alpaca", source=str(SAMPLES / "alpaca.jsonl"),
                      format="csv")
    raises_user_error("unknown turn 'middle'", source=str(SAMPLES / "alpaca.jsonl"), turn="middle")
    raises_user_error("max_rows", source=str(SAMPLES / "alpaca.jsonl"), max_rows=0)


# ---------------------------------------------------------------- errors in user data


def test_explicit_format_mismatch():
    raises_user_error("spin_iter.jsonl", "row 1", "field 'instruction'", "format 'alpaca'",
                      "given explicitly", "real", source=str(SAMPLES / "spin_iter.jsonl"),
                      format="alpaca")


def test_explicit_format_checked_on_every_row(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [{"prompt": "a", "response": "b"},
                                                  {"prompt": "c", "answer": "d"}])
    raises_user_error("mixed.jsonl", "row 2", "field 'response'", "missing",
                      source=str(path), format="prompt_response")
    # auto: detected from row 1, then row 2 must match too
    raises_user_error("mixed.jsonl", "row 2", "field 'response'", "detected from the first row",
                      source=str(path))


def test_empty_file(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    raises_user_error("empty.jsonl", "no data rows", source=str(tmp_path / "empty.jsonl"))
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    raises_user_error("blank.jsonl", "no data rows", source=str(tmp_path / "blank.jsonl"))
    (tmp_path / "empty.json").write_text("[]")
    raises_user_error("empty.json", "no data rows", source=str(tmp_path / "empty.json"))


def test_invalid_json_on_line_3(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": "d"}\n'
                    '{"prompt": "e", "response": \n')
    raises_user_error("broken.jsonl", "row 3", "invalid JSON on line 3", source=str(path))


def test_invalid_json_array_names_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"prompt": "a", "response": "b"},\n'
                    '  {"prompt": "c" "response": "d"}\n]\n')
    raises_user_error("broken.json", "line 3", "invalid JSON", source=str(path))


def test_non_utf8_bytes(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "a", "response": "b"}\n'
                     + '{"prompt": "caf\u00e9", "response": "b"}\n'.encode("latin-1"))
    raises_user_error("latin1.jsonl", "row 2", "line 2 is not valid UTF-8", "0xe9",
                      source=str(path))
    as_json = tmp_path / "latin1.json"
    as_json.write_bytes(path.read_bytes())
    raises_user_error("latin1.json", "row 2", "not valid UTF-8", source=str(as_json))


def test_row_not_an_object(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n["prompt", "response"]\n')
    raises_user_error("list.jsonl", "row 2", "expected", "got list", source=str(path))


def test_wrong_type(tmp_path):
    path = write_jsonl(tmp_path / "types.jsonl", [{"prompt": "a", "response": "b"},
                                                  {"prompt": "c", "response": 42}])
    raises_user_error("types.jsonl", "row 2", "field 'response'", "expected a non-empty string",
                      "got int", source=str(path))
    path = write_jsonl(tmp_path / "ptype.jsonl", [{"prompt": None, "chosen": "x", "rejected": "y"}])
    raises_user_error("ptype.jsonl", "row 1", "field 'prompt'", "got null", source=str(path))
    path = write_jsonl(tmp_path / "gen.jsonl", [{"real": [user("q"), assistant("r")],
                                                 "generated": "oops"}])
    raises_user_error("gen.jsonl", "row 1", "field 'generated'", "got str", source=str(path))


def test_empty_or_whitespace_response_and_prompt(tmp_path):
    path = write_jsonl(tmp_path / "blank.jsonl", [{"prompt": "a", "response": "b"},
                                                  {"prompt": "c", "response": "  \n"}])
    raises_user_error("blank.jsonl", "row 2", "field 'response'", "whitespace-only",
                      source=str(path))
    path = write_jsonl(tmp_path / "blankp.jsonl", [{"instruction": " ", "output": "x"}])
    raises_user_error("blankp.jsonl", "row 1", "field 'instruction'", "empty", source=str(path))
    path = write_jsonl(tmp_path / "blankm.jsonl", [{"messages": [user("q"), assistant("")]}])
    raises_user_error("blankm.jsonl", "row 1", "field 'messages[1].content'", "empty",
                      source=str(path))


def test_conversation_without_assistant_turn(tmp_path):
    path = write_jsonl(tmp_path / "noasst.jsonl", [{"messages": [user("q"), assistant("r")]},
                                                   {"messages": [user("q"), user("again")]}])
    raises_user_error("noasst.jsonl", "row 2", "field 'messages'", "no assistant message",
                      "roles: user, user", source=str(path))


def test_conversation_ending_with_user_under_turn_last(tmp_path):
    path = write_jsonl(tmp_path / "trailing.jsonl", [
        {"real": [user("q"), assistant("r")]},
        {"real": [user("q2"), assistant("r2"), user("and?")]},
    ])
    assert load_examples(str(path))[1].real == "r2"  # turn=first ignores what follows
    raises_user_error("trailing.jsonl", "row 2", "field 'real'", "ends with a user message",
                      "turn='last'", source=str(path), turn="last")


def test_malformed_messages(tmp_path):
    path = write_jsonl(tmp_path / "bad_msg.jsonl", [{"messages": [user("q"), {"content": "r"}]}])
    raises_user_error("bad_msg.jsonl", "row 1", "field 'messages[1]'", "'role' missing",
                      source=str(path))
    path = write_jsonl(tmp_path / "role.jsonl", [{"messages": [{"role": "tool", "content": "x"},
                                                               assistant("r")]}])
    raises_user_error("role.jsonl", "row 1", "field 'messages[0]'", "unknown role 'tool'",
                      source=str(path))
    path = write_jsonl(tmp_path / "notlist.jsonl", [{"messages": "q: hi a: hello"}])
    raises_user_error("notlist.jsonl", "row 1", "field 'messages'", "list of messages", "got str",
                      source=str(path))


def test_prompt_must_end_with_user_message(tmp_path):
    path = write_jsonl(tmp_path / "sys.jsonl", [{"messages": [{"role": "system", "content": "s"},
                                                              assistant("r")]}])
    raises_user_error("sys.jsonl", "row 1", "field 'messages'", "end with a user message",
                      source=str(path))
    path = write_jsonl(tmp_path / "first.jsonl", [{"real": [assistant("r")]}])
    raises_user_error("first.jsonl", "row 1", "field 'real'", "at least one user message",
                      source=str(path))


def test_parquet_with_wrong_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"question": ["q"], "reply": ["r"]}), path)
    raises_user_error("wrong.parquet", "row 1", "question", "reply", "accepted column sets",
                      source=str(path))
    raises_user_error("wrong.parquet", "row 1", "field 'messages'", "missing", source=str(path),
                      format="messages")


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "corrupt.parquet"
    path.write_bytes(b"this is not parquet")
    raises_user_error("corrupt.parquet", "cannot read as parquet", source=str(path))


def test_missing_file(tmp_path):
    raises_user_error("nope.jsonl", "no such file", source=str(tmp_path / "nope.jsonl"))
    raises_user_error("./data/nope", "no such file", source="./data/nope")


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("prompt,response\na,b\n")
    raises_user_error("data.csv", "unsupported file type '.csv'", source=str(path))


def test_unrecognized_columns(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "reply": "r"}])
    message = raises_user_error("odd.jsonl", "row 1", "['question', 'reply']", source=str(path))
    for columns in ("real", "messages", "prompt + chosen", "prompt + response",
                    "instruction + output"):
        assert columns in message
    with pytest.raises(UserError, match="row 4"):
        detect_format({"foo": 1}, "x.jsonl", row_number=4)
