"""Tests of the demo's bundled task and of the offline tokenizer/model builder."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

os.environ["HF_HUB_OFFLINE"] = "1"  # everything here must work with no Hub access

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from spinlm.demo.build import build_model, build_tiny, build_tokenizer
from spinlm.demo.task import KINDS, check, check_example, extract_answer, make_splits, write_splits
from spinlm.errors import UserError

SMALL = dict(n_train=300, n_val=40, n_test=40)


@pytest.fixture(scope="module")
def splits():
    return make_splits(seed=0, **SMALL)


@pytest.fixture(scope="module")
def texts(splits):
    return [r["prompt"] + "\n" + r["response"] for r in splits["train"]]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, texts):
    out = tmp_path_factory.mktemp("tiny")
    return build_tiny(out, texts, hidden_size=32, num_layers=2, num_heads=2)


# ---------------------------------------------------------------- task


def test_make_splits_sizes_and_fields(splits):
    assert {k: len(v) for k, v in splits.items()} == {"train": 300, "val": 40, "test": 40}
    for rows in splits.values():
        for r in rows:
            assert set(r) == {"prompt", "response", "answer", "kind"}
            assert r["kind"] in KINDS
    assert {r["kind"] for r in splits["train"]} == set(KINDS)


def test_make_splits_deterministic_per_seed(splits):
    assert make_splits(seed=0, **SMALL) == splits
    assert make_splits(seed=1, **SMALL) != splits


def test_make_splits_leaves_global_random_alone():
    import random

    state = random.getstate()
    make_splits(seed=3, **SMALL)
    assert random.getstate() == state


def test_eval_splits_do_not_depend_on_train_size(splits):
    # Test and val are drawn first, so a bigger train set keeps the same held-out rows.
    bigger = make_splits(seed=0, n_train=600, n_val=40, n_test=40)
    assert bigger["test"] == splits["test"] and bigger["val"] == splits["val"]


def test_no_prompt_in_two_splits(splits):
    seen: dict[str, str] = {}
    for name, rows in splits.items():
        for r in rows:
            assert seen.setdefault(r["prompt"], name) == name, r["prompt"]


def test_every_response_passes_its_check(splits):
    for rows in splits.values():
        for r in rows:
            assert check(r["answer"], r["response"]), r


def test_check_rejects_wrong_or_decorated_answers():
    assert check("936", "The answer is 936.")
    assert check("936", "  The answer is 936.\n")  # surrounding whitespace only
    assert not check("936", "The answer is 935.")
    assert not check("936", "The answer is 9 36.")
    assert not check("936", "The answer is 936")  # no final period
    assert not check("936", "The answer is 936. Or 935.")
    assert not check("936", "936")
    assert extract_answer("The answer is 1 5 9.") == "1 5 9"


def test_check_example_reads_extra():
    ex = SimpleNamespace(extra={"answer": "42"})
    assert check_example(ex, "The answer is 42.")
    assert not check_example(ex, "The answer is 24.")
    with pytest.raises(UserError):
        check_example(SimpleNamespace(extra={}), "The answer is 42.")


def test_write_splits_jsonl(tmp_path):
    paths = write_splits(tmp_path, seed=0, **SMALL)
    assert set(paths) == {"train", "val", "test"}
    rows = [json.loads(line) for line in paths["val"].read_text(encoding="utf-8").splitlines()]
    assert rows == make_splits(seed=0, **SMALL)["val"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test.jsonl", "train.jsonl", "val.jsonl"]


# ---------------------------------------------------------------- tokenizer


def _chat_ids(tok, messages, **kw):
    ids = tok.apply_chat_template(messages, tokenize=True, **kw)
    return ids if isinstance(ids, list) else ids["input_ids"]  # a list before transformers 5, a BatchEncoding from 5


def test_tokenizer_reloads_and_chat_template_is_consistent(tmp_path, texts, splits):
    build_tokenizer(texts, tmp_path, vocab_size=400)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert 256 + 7 <= len(tok) <= 400  # BPE stops early when the corpus has no more pairs
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<|pad|>", "<|bos|>", "<|eos|>")
    for r in splits["test"][:20]:
        user = [{"role": "user", "content": r["prompt"]}]
        prompt = _chat_ids(tok, user, add_generation_prompt=True)
        response = tok(r["response"], add_special_tokens=False)["input_ids"]
        full = _chat_ids(tok, user + [{"role": "assistant", "content": r["response"]}])
        assert prompt + response + [tok.eos_token_id] == full
        assert tok.decode(response) == r["response"]
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|user|>hi<|end|><|assistant|>"


def test_digits_are_single_tokens(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    for text in ("12345", "The answer is 9870.", " 100 200"):
        pieces = [tok.decode([i]) for i in tok(text, add_special_tokens=False)["input_ids"]]
        digit_pieces = [p for p in pieces if any(c.isdigit() for c in p)]
        assert all(len(p.strip()) == 1 for p in digit_pieces), pieces
        assert "".join(pieces) == text


def test_system_turn_and_bad_role(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == "<|system|>Be brief.<|end|><|user|>Hi<|end|>"
    with pytest.raises(Exception):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


# ---------------------------------------------------------------- model


def test_build_tiny_model_dir_loads_and_runs(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert model.config.vocab_size == len(tok)
    assert model.config.tie_word_embeddings
    assert tok.model_max_length == model.config.max_position_embeddings == 256
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id
    ids = torch.tensor([_chat_ids(tok, [{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok))
    assert torch.isfinite(logits).all()


def test_build_model_seeded_and_leaves_global_rng(tmp_path, tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    state = torch.random.get_rng_state()
    kw = dict(hidden_size=32, num_layers=1, num_heads=2, seed=7)
    a = AutoModelForCausalLM.from_pretrained(build_model(tok, tmp_path / "a", **kw))
    b = AutoModelForCausalLM.from_pretrained(build_model(tok, tmp_path / "b", **kw))
    c = AutoModelForCausalLM.from_pretrained(build_model(tok, tmp_path / "c", **{**kw, "seed": 8}))
    assert torch.equal(torch.random.get_rng_state(), state)
    wa, wb, wc = (m.get_input_embeddings().weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_build_model_rejects_bad_heads(tmp_path, tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    with pytest.raises(UserError):
        build_model(tok, tmp_path, hidden_size=30, num_heads=4)


def test_sweep_table_selects_on_validation_and_reports_test(tmp_path):
    """The sweep's ranking uses validation accuracy only; test columns are reported as they are."""
    from spinlm.demo.sweep import _name, collect, table
    from spinlm.io import write_json

    def summary(val: list[float], test: list[float], cont: tuple[float, float] | None = None) -> list[dict]:
        names = ["sft"] + [f"iteration-{i}" for i in range(len(val) - 1)]
        rows = [{"name": n, "metrics": {"accuracy": t}, "val_metrics": {"accuracy": v}}
                for n, v, t in zip(names, val, test)]
        if cont:
            rows.append({"name": "continued-sft", "metrics": {"accuracy": cont[1]},
                         "val_metrics": {"accuracy": cont[0]}})
        return rows

    a = {"beta": 0.1, "learning_rate": 1e-5, "sft_weight": 0.0, "drop_dead_pairs": False}
    b = {"beta": 5.0, "learning_rate": 5e-5, "sft_weight": 1.0, "drop_dead_pairs": True}
    jobs = []
    for knobs, seed, val, test in ((a, 0, [0.9, 0.92, 0.91], [0.8, 0.99, 0.99]),
                                   (a, 1, [0.9, 0.93, 0.9], [0.8, 0.98, 0.9]),
                                   (b, 0, [0.9, 0.95, 0.96], [0.8, 0.7, 0.71]),
                                   (b, 1, [0.9, 0.94, 0.97], [0.8, 0.72, 0.7])):
        name = f"{_name(knobs)}-seed{seed}"
        write_json(tmp_path / "runs" / name / "summary.json", summary(val, test, (0.98, 0.97) if knobs is a else None))
        jobs.append((name, knobs, seed, {}))
    results = collect(tmp_path, jobs, failed=[])
    assert results["runs"]["beta5-lr5e-05-sftw1-drop-seed1"]["chosen_iteration"] == "iteration-1"
    text = table(results, 2, [0, 1])
    rows = [line for line in text.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert rows[0].startswith("| 1 | 5 | 5e-05 | 1 | drop | 0.965 ± 0.005 | 0.705 ± 0.005 |")  # chosen on validation
    assert rows[1].startswith("| 2 | 0.1 | 1e-05 | 0 | keep | 0.925 ± 0.005 | 0.985 ± 0.005 |")  # better on test
    assert "continued SFT at equal steps: test 0.970 ± 0.000" in text
    assert "best" not in text  # every choice is made on validation; nothing is called best
