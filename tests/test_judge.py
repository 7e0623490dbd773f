"""`spinlm judge` against real loopback servers: small HTTP judges run by the test itself, and one real
`transformers serve` of the tiny model (whose replies carry no grade)."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spinlm.cli import main
from spinlm.eval import judge_prompts
from spinlm.eval.judge import parse_grade, parse_verdict
from spinlm.generation.process import free_port, stop_process_group
from spinlm.io import read_json, read_jsonl

from conftest import COMMON, scripted_server

TRANSFORMERS = str(Path(sys.executable).parent / "transformers")
GEN = [*COMMON, "--generation.max_new_tokens=6", "--eval.batch_size=8"]

# Each user turn carries a marker the scripted judge reads: g=N grades N, g=x gets no grade.
QUESTIONS = [
    {"question_id": 81, "category": "math", "turns": ["What is 2 plus 3? g=9", "And twice that? g=3"]},
    {"question_id": 82, "category": "writing", "turns": ["Write a line. g=6", "Shorter. g=x"]},
    {"question_id": 83, "category": "writing", "turns": ["Name a colour. g=8"], "reference": ["Blue."]},
]


def _reply(text: str):
    return 200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                              "finish_reason": "stop"}]}


def _grader(n, headers, body):
    marker = re.findall(r"User: .*?g=(\d+|x)", body["messages"][-1]["content"])[-1]
    return _reply("The reply is fine." if marker == "x" else f"Reasonable. Grade: [[{marker}]]")


def _write_questions(tmp_path, questions=QUESTIONS):
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in questions))
    return path


def _argv(model, questions, url, out, *extra):
    return ["judge", "--model", str(model), "--questions", str(questions), "--judge-url", url,
            "--judge-model", "judge-1", "--out", str(out), "--retries=2", *GEN, *extra]


def test_parsers():
    assert parse_grade("ok [[3]] then Grade: [[7]]") == 7
    assert parse_grade("[[ 8.5 ]]") == 8.5
    assert parse_grade("Grade: [[11]]") is None and parse_grade("7/10") is None
    assert parse_verdict("A is fine but [[B]]") == "B" and parse_verdict("[[D]]") is None


def test_single_grading_per_category_unparsable_and_retry(other_model, tmp_path, capsys, monkeypatch):
    key = "sk-judge-7d1e0f"
    monkeypatch.setenv("JUDGE_KEY", key)

    def answer(n, headers, body):
        if headers.get("Authorization") != f"Bearer {key}":
            return 401, {"error": {"message": "bad key"}}
        return (503, {"detail": "busy"}) if n == 1 else _grader(n, headers, body)

    with scripted_server(answer) as (url, state):
        code = main(_argv(other_model, _write_questions(tmp_path), url + "/v1", tmp_path / "out",
                          "--api-key-env=JUDGE_KEY", "--concurrency=1"))
    out = capsys.readouterr()
    assert code == 0, out.err
    assert len(state["requests"]) == 1 + 5  # the 503 was retried; 5 turns judged
    assert {path for path, _, _ in state["requests"]} == {"/v1/chat/completions"}
    summary = read_json(tmp_path / "out" / "judge.json")
    assert summary["template_version"] == judge_prompts.TEMPLATE_VERSION and summary["mode"] == "single"
    assert summary["protocol"] == "spinlm quick judge (not MT-Bench)"  # its scores do not sit beside MT-Bench's
    assert "spinlm quick judge (not MT-Bench): average grade" in out.out
    assert summary["judgments"] == 5 and summary["scored"] == 4 and summary["unparsable"]["count"] == 1
    assert summary["unparsable"]["examples"][0]["question_id"] == "82"
    assert summary["overall"] == pytest.approx((9 + 3 + 6 + 8) / 4)
    assert summary["per_category"] == {"math": 6.0, "writing": 7.0}
    assert summary["per_turn"] == {"1": pytest.approx(23 / 3), "2": 3.0}
    assert "1 of 5 judge replies unparsable" in out.out
    # turn 2 was answered with the first exchange as context, and the reference reached the judge
    answers = read_jsonl(tmp_path / "out" / "answers-a.jsonl")
    assert answers[0]["answers"][0].strip()
    turn2 = [b["messages"][-1]["content"] for _, _, b in state["requests"] if "And twice that?" in str(b)][0]
    assert f"Assistant: {answers[0]['answers'][0]}" in turn2 and "User: What is 2 plus 3?" in turn2
    assert any("Blue." in b["messages"][-1]["content"] for _, _, b in state["requests"])
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert all(key.encode() not in p.read_bytes() for p in files) and key not in out.out + out.err


def test_rerun_resumes_from_the_cache(tiny_model, tmp_path, capsys, monkeypatch):
    questions = _write_questions(tmp_path)

    def failing(n, headers, body):  # the 4th request is refused (4xx: not retried): the command fails
        return (400, {"error": {"message": "quota exceeded"}}) if n == 4 else _grader(n, headers, body)

    with scripted_server(failing) as (url, state):
        code = main(_argv(tiny_model, questions, url, tmp_path / "out", "--concurrency=1"))
    err = capsys.readouterr().err
    assert code == 2 and "quota exceeded" in err and "Traceback" not in err
    import spinlm.eval.judge

    monkeypatch.setattr(spinlm.eval.judge, "_load", lambda *a: pytest.fail("answers must come from the cache"))
    with scripted_server(_grader) as (url, state):
        assert main(_argv(tiny_model, questions, url, tmp_path / "out")) == 0
    assert len(state["requests"]) == 5 - 3  # three judgments were cached before the failure
    assert read_json(tmp_path / "out" / "judge.json")["scored"] == 4
    with scripted_server(_grader) as (url, state):
        assert main(_argv(tiny_model, questions, url, tmp_path / "out")) == 0
    assert state["requests"] == []  # everything cached


def _digest(text: str) -> str:
    import hashlib

    return hashlib.sha1(text.strip().encode()).hexdigest()


def _last_reply(content: str, who: str) -> str:
    block = content.split(f"<conversation of assistant {who}>")[1].split(f"</conversation of assistant {who}>")[0]
    return block.rsplit("Assistant: ", 1)[1].strip()


def test_pairwise_both_orders(tiny_model, other_model, tmp_path, capsys):
    questions = _write_questions(tmp_path)

    def position_blind(n, headers, body):  # prefers the reply with the smaller digest; equal replies tie
        content = body["messages"][-1]["content"]
        a, b = _digest(_last_reply(content, "A")), _digest(_last_reply(content, "B"))
        return _reply("[[A]]" if a < b else "[[B]]" if b < a else "[[C]]")

    with scripted_server(position_blind) as (url, state):
        assert main(_argv(tiny_model, questions, url, tmp_path / "out", "--pairwise",
                          "--model-b", str(other_model))) == 0
    assert len(state["requests"]) == 2 * 5
    s = read_json(tmp_path / "out" / "judge.json")
    a = read_jsonl(tmp_path / "out" / "answers-a.jsonl")
    b = read_jsonl(tmp_path / "out" / "answers-b.jsonl")
    assert [r["answers"] for r in a] != [r["answers"] for r in b]
    outcomes = ["a" if _digest(x) < _digest(y) else "b" if _digest(y) < _digest(x) else "tie"
                for ra, rb in zip(a, b) for x, y in zip(ra["answers"], rb["answers"])]
    assert len(set(outcomes)) > 1
    assert s["scored"] == 5 and s["inconsistent_orders"] == 0 and s["unparsable"]["count"] == 0
    assert s["win_rate"] == pytest.approx(outcomes.count("a") / 5)
    assert s["loss_rate"] == pytest.approx(outcomes.count("b") / 5)
    assert s["tie_rate"] == pytest.approx(outcomes.count("tie") / 5)

    with scripted_server(lambda n, h, body: _reply("[[A]]")) as (url, state):  # pure position bias
        assert main(_argv(tiny_model, questions, url, tmp_path / "biased", "--pairwise",
                          "--model-b", str(other_model))) == 0
    s = read_json(tmp_path / "biased" / "judge.json")
    assert s["tie_rate"] == 1.0 and s["inconsistent_orders"] == 5 and s["first_position_preferred"] == 1.0
    assert "win 0.000, tie 1.000, loss 0.000" in capsys.readouterr().out


def test_bad_questions_and_options_are_user_errors(tiny_model, tmp_path, capsys):
    bad = _write_questions(tmp_path, [QUESTIONS[0], {"question_id": 2, "category": "x", "turns": "hi"}])
    code = main(_argv(tiny_model, bad, "http://127.0.0.1:9", tmp_path / "out"))
    err = capsys.readouterr().err
    assert code == 2 and f"{bad}, row 2, field 'turns'" in err and "Traceback" not in err
    code = main(_argv(tiny_model, _write_questions(tmp_path), "http://127.0.0.1:9", tmp_path / "out", "--pairwise"))
    assert code == 2 and "--model-b" in capsys.readouterr().err
    code = main(_argv(tiny_model, _write_questions(tmp_path), "http://127.0.0.1:9", tmp_path / "out",
                      "--api-key-env=SPINLM_NO_SUCH_VAR"))
    assert code == 2 and "SPINLM_NO_SUCH_VAR" in capsys.readouterr().err


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_transformers_serve_as_judge_replies_are_counted_unparsable(tiny_model, tmp_path, capsys, caplog):
    # the judge's prompts (~540 tokens) exceed the tiny model's 256 positions, which transformers serve
    # >= 5.25 enforces: the judge is the same weights with room for them (rotary positions, no table)
    judge = tmp_path / "judge-model"
    shutil.copytree(tiny_model, judge)
    config = json.loads((judge / "config.json").read_text())
    (judge / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 2048}))
    port = free_port()
    proc = subprocess.Popen([TRANSFORMERS, "serve", str(judge), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.monotonic() + 120
        while not _port_open(port):
            assert proc.poll() is None and time.monotonic() < deadline, "transformers serve did not start"
            time.sleep(0.2)
        questions = _write_questions(tmp_path, QUESTIONS[:2])
        argv = ["judge", "--model", str(tiny_model), "--questions", str(questions), "--judge-url",
                f"http://127.0.0.1:{port}", "--judge-model", str(judge), "--judge-max-tokens=8",
                "--concurrency=2", "--out", str(tmp_path / "out"), *GEN]
        with caplog.at_level(logging.WARNING, logger="spinlm"):
            code = main(argv)
    finally:
        stop_process_group(proc, grace_s=10)
    out = capsys.readouterr()
    assert code == 0, out.err
    s = read_json(tmp_path / "out" / "judge.json")
    assert s["judgments"] == 4 and s["unparsable"]["count"] == 4 and s["scored"] == 0 and s["overall"] is None
    assert "4 of 4 judge replies unparsable" in out.out and "no parsable verdict" in caplog.text
    rows = read_jsonl(tmp_path / "out" / "judgments.jsonl")
    assert all(isinstance(r["reply"], str) and r["grade"] is None for r in rows)
