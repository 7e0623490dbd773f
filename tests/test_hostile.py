"""Hostile input: every case through `spinlm validate` and `spinlm run`, as a user runs them.

Each case must give exit code 2, exactly one `spinlm: error:` message that names the file
(and row and field where there is one), no traceback, and no run directory marked
complete (the checks run before the run directory is touched).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from spinlm.cli import main

GOOD = {"prompt": "What is 2 plus 3?", "response": "The answer is 5."}


def _rows(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _model_copy(tiny_model: Path, dest: Path, drop: tuple[str, ...] = ()) -> Path:
    shutil.copytree(tiny_model, dest)
    for name in drop:
        (dest / name).unlink()
    return dest


def _no_template(tiny_model: Path, dest: Path) -> Path:
    d = _model_copy(tiny_model, dest)
    (d / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


def _parquet(path: Path) -> Path:
    pq.write_table(pa.table({"question": ["a", "b"], "answer": ["c", "d"]}), path)
    return path


# name -> (setup(tmp, tiny_model, train_file) -> (config changes, extra flags), substrings the message must hold)
CASES = {
    "empty file": (lambda t, m, d: ({"data": {"train": str(_rows(t / "e.jsonl", []))}}, []),
                   ["e.jsonl", "no data rows"]),
    "invalid JSON on line 3": (lambda t, m, d: ({"data": {"train": str(_write(t / "j.jsonl", json.dumps(GOOD) + "\n"
                                                                                  + json.dumps(GOOD) + "\n{oops\n"))}},
                                                []), ["j.jsonl", "row 3"]),
    "parquet with wrong columns": (lambda t, m, d: ({"data": {"train": str(_parquet(t / "w.parquet"))}}, []),
                                   ["w.parquet", "row 1", "question"]),
    "wrong type of a field": (lambda t, m, d: ({"data": {"train": str(_rows(t / "n.jsonl", [GOOD, {"prompt": 7,
                                                                                               "response": "x"}]))}},
                                               []), ["n.jsonl", "row 2", "field 'prompt'"]),
    "empty response": (
        lambda t, m, d: ({"data": {"train": str(_rows(t / "er.jsonl", [GOOD, {**GOOD, "response": ""}]))}},
                         []), ["er.jsonl", "row 2", "field 'response'"]),
    "whitespace-only response": (
        lambda t, m, d: ({"data": {"train": str(_rows(t / "ws.jsonl", [GOOD, {**GOOD, "response": " \n\t"}]))}},
                         []), ["ws.jsonl", "row 2", "field 'response'"]),
    "conversation without an assistant turn": (
        lambda t, m, d: ({"data": {"train": str(_rows(t / "na.jsonl", [_conv("user", "assistant"), _conv("user")]))}},
                         []), ["na.jsonl", "row 2", "field 'messages'", "no assistant"]),
    "conversation ending with a user turn": (
        lambda t, m, d: ({"data": {"train": str(_rows(t / "eu.jsonl", [_conv("user", "assistant"),
                                                                      _conv("user", "assistant", "user")])),
                                   "turn": "last"}}, []),
        ["eu.jsonl", "row 2", "field 'messages'", "ends with a user"]),
    "unknown role": (lambda t, m, d: ({"data": {"train": str(_rows(t / "r.jsonl", [_conv("user", "assistant"),
                                                                                  _conv("bot", "assistant")]))}}, []),
                     ["r.jsonl", "row 2", "messages[0]", "bot"]),
    "non-UTF-8 bytes": (lambda t, m, d: ({"data": {"train": str(_write_bytes(t / "u.jsonl", json.dumps(GOOD).encode()
                                                                             + b"\n{\"prompt\": \"caf\xe9\", "
                                                                             b"\"response\": \"x\"}\n"))}}, []),
                        ["u.jsonl", "row 2", "UTF-8"]),
    "row that is not an object": (lambda t, m, d: ({"data": {"train": str(_rows(t / "l.jsonl", [GOOD, [1, 2]]))}},
                                                   []), ["l.jsonl", "row 2", "object"]),
    "missing data file": (lambda t, m, d: ({"data": {"train": str(t / "nope.jsonl")}}, []), ["nope.jsonl"]),
    "bad row in the held-out file": (lambda t, m, d: ({"data": {"eval": str(_rows(t / "ev.jsonl",
                                                                                  [GOOD, GOOD, {"prompt": "q"}]))}},
                                                      []), ["ev.jsonl", "row 3", "response"]),
    "every prompt too long with drop policy": (
        lambda t, m, d: ({"data": {"max_prompt_length": 4, "prompt_overflow": "drop"}}, []),
        ["no training examples left", "max_prompt_length=4"]),
    "unknown config key": (lambda t, m, d: ({"train": {"learning_rat": 1e-5}}, []),
                           ["train.learning_rat", "did you mean 'train.learning_rate'"]),
    "unknown section": (lambda t, m, d: ({"trian": {"epochs": 1}}, []), ["trian", "did you mean 'train'"]),
    "negative learning rate": (lambda t, m, d: ({"train": {"learning_rate": -1e-5}}, []),
                               ["train.learning_rate must be > 0"]),
    "beta of zero": (lambda t, m, d: ({"spin": {"beta": 0.0}}, []), ["spin.beta must be > 0"]),
    "mix_window below 1": (lambda t, m, d: ({"spin": {"mix_window": 0}}, []), ["spin.mix_window must be > 0"]),
    "iterations below 1": (lambda t, m, d: ({"spin": {"iterations": 0}}, []), ["spin.iterations must be > 0"]),
    "per-iteration list too short": (lambda t, m, d: ({"spin": {"iterations": 3, "beta": [0.1, 0.2]}}, []),
                                     ["spin.beta lists 2 values"]),
    "not a number": (lambda t, m, d: ({}, ["--train.batch_size=eight"]), ["train.batch_size", "eight"]),
    "NaN value": (lambda t, m, d: ({"generation": {"temperature": float("nan")}}, []),
                  ["generation.temperature", "finite"]),
    "YAML syntax error": (lambda t, m, d: ("run: [unclosed", []), ["not valid YAML"]),
    "missing model path": (lambda t, m, d: ({"model": {"name_or_path": str(t / "no-model")}}, []),
                           ["no-model", "no such model directory"]),
    "model directory without weights": (
        lambda t, m, d: ({"model": {"name_or_path": str(_model_copy(m, t / "nw", ("model.safetensors",)))}}, []),
        ["nw", "no model weights"]),
    "pickle weights only": (lambda t, m, d: ({"model": {"name_or_path": str(_pickle_only(m, t / "pk"))}}, []),
                            ["pk", "pytorch_model.bin", "safetensors only"]),
    "tokenizer without a chat template": (
        lambda t, m, d: ({"model": {"name_or_path": str(_no_template(m, t / "nt"))}}, []),
        ["nt", "no chat template", "model.chat_template"]),
    "task checker that cannot be imported": (lambda t, m, d: ({"eval": {"checker": "nowhere.module:check"}}, []),
                                             ["eval.checker", "nowhere.module:check"]),
    "unreachable generation server": (lambda t, m, d: ({"generation": {"backend": "server",
                                                                       "server_url": f"http://127.0.0.1:{_closed_port()}"}},
                                                        []), ["generation.server_url", "127.0.0.1", "unreachable"]),
    "missing API key variable": (lambda t, m, d: ({"generation": {"backend": "server", "server_url": "http://127.0.0.1:9",
                                                                  "api_key_env": "SPINLM_TEST_UNSET_KEY"}}, []),
                                 ["SPINLM_TEST_UNSET_KEY", "not set"]),
    "prompt limit not below total limit": (lambda t, m, d: ({"data": {"max_prompt_length": 128, "max_length": 64}},
                                                            []), ["data.max_prompt_length must be smaller"]),
}


def _closed_port() -> int:
    import socket

    with socket.socket() as s:  # bound then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _conv(*roles: str) -> dict:
    return {"messages": [{"role": r, "content": f"{r} says {i}"} for i, r in enumerate(roles)]}


def _pickle_only(tiny_model: Path, dest: Path) -> Path:
    d = _model_copy(tiny_model, dest, ("model.safetensors",))
    (d / "pytorch_model.bin").write_bytes(b"not loaded")
    return d


def _base(tiny_model: Path, task_data: dict, run_dir: Path) -> dict:
    return {"run": {"dir": str(run_dir), "progress": False},
            "model": {"name_or_path": str(tiny_model)},
            "data": {"train": str(task_data["train"]), "eval": str(task_data["test"]), "max_train_rows": 8,
                     "max_eval_rows": 4, "max_prompt_length": 64, "max_length": 128},
            "generation": {"max_new_tokens": 4}, "spin": {"iterations": 1}, "train": {"batch_size": 4},
            "eval": {"checker": "spinlm.demo.task:check_example"}}


def _merge(base: dict, changes: dict) -> dict:
    for section, values in changes.items():
        base.setdefault(section, {}).update(values)
    return base


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize("case", list(CASES))
def test_hostile_input_is_one_clear_error(case, command, tiny_model, task_data, tmp_path, capsys):
    setup, expected = CASES[case]
    run_dir = tmp_path / "run"
    changes, flags = setup(tmp_path, tiny_model, task_data["train"])
    cfg_path = tmp_path / "cfg.yaml"
    if isinstance(changes, str):
        cfg_path.write_text(changes)
    else:
        cfg_path.write_text(yaml.safe_dump(_merge(_base(tiny_model, task_data, run_dir), changes)))
    code = main([command, str(cfg_path), *flags])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("spinlm: error:") == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in err, (text, err)
    assert not run_dir.exists() or not list(run_dir.rglob("*.done")), "nothing may be marked done"
    assert not (run_dir / "config.yaml").exists(), "a rejected config must not be saved as the run's config"


def test_there_are_at_least_25_cases():
    assert len(CASES) >= 25


def test_validate_reports_lengths_duplicates_and_plan(tiny_model, task_data, tmp_path, capsys):
    rows = [json.loads(line) for line in task_data["train"].read_text().splitlines()[:6]]
    long = {"prompt": " ".join(["seven"] * 200), "response": "The answer is 7."}
    data = _rows(tmp_path / "d.jsonl", rows + [rows[0], rows[1], long])
    cfg = _base(tiny_model, task_data, tmp_path / "run")
    cfg["data"].update({"train": str(data), "max_train_rows": None, "val_size": 0})
    cfg["spin"].update({"iterations": 2, "mix_window": 2})
    for policy, kept in (("truncate", 7), ("drop", 6)):
        cfg["data"]["prompt_overflow"] = policy
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
        assert main(["validate", str(tmp_path / "c.yaml")]) == 0
        out = capsys.readouterr().out
        action = "truncated from the left" if policy == "truncate" else "dropped"
        assert f"train: {kept} rows" in out and f"1 prompts over the limit ({action})" in out, out
        assert "2 duplicate rows dropped" in out
        assert f"\n  0 | {kept} |" in out and f"\n  1 | {2 * kept} |" in out and "ok: no problems found" in out
    assert not (tmp_path / "run").exists(), "validate writes nothing"
