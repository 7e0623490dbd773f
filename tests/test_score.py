"""The score stage: the rows of one prompt (a mix window's files) scored together, each real response once,
with the values of scoring each file alone; a killed stage resumes to the same file."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

import spinlm.modeling
import spinlm.stages.score
from spinlm import config
from spinlm.io import read_jsonl
from spinlm.stages.score import score_files
from spinlm.tokens import Limits, encode_pair

COMMON = ["--data.max_prompt_length=64", "--data.max_length=128", "--run.progress=false"]


def _window(pairs, tmp_path, n: int = 20):
    """Two generation files of the same prompts and real responses, as iterations t-1 and t write them: the
    second's samples differ (the first's ids reversed; a few rows keep the first's sample, as a model may
    sample the same response twice)."""
    rows = read_jsonl(pairs.parent / "gens.jsonl")[:n]
    before, now = tmp_path / "it0.jsonl", tmp_path / "it1.jsonl"
    before.write_text("".join(json.dumps(r) + "\n" for r in rows))
    later = [{**r, "iteration": 1, "generated_ids": r["generated_ids"] if k % 5 == 0 else r["generated_ids"][::-1]}
             for k, r in enumerate(rows)]
    now.write_text("".join(json.dumps(r) + "\n" for r in later))
    return before, now


def test_a_prompt_in_two_window_files_is_forwarded_once_with_the_values_of_each_file_alone(
        tiny_model, pairs, tmp_path, monkeypatch):
    before, now = _window(pairs, tmp_path)
    cfg = config.build(None, [f"--model.name_or_path={tiny_model}", *COMMON])
    tok = AutoTokenizer.from_pretrained(tiny_model)
    forwarded = []  # tokens (padding excluded) of each packed forward, outside the packing probe
    probing = []

    def counting(path, c):
        model, fsdp = spinlm.modeling.load_model(path, c.model).eval(), None

        def hook(module, args, kwargs):
            ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
            if mask.dim() == 4 and not probing:
                forwarded.append(int((ids != tok.pad_token_id).sum()))
        model.register_forward_pre_hook(hook, with_kwargs=True)
        return model, fsdp

    real_prepare = spinlm.stages.score.prepare

    def prepare(*args):
        probing.append(True)
        try:
            return real_prepare(*args)
        finally:
            probing.pop()

    monkeypatch.setattr(spinlm.stages.score, "inference_model", counting)
    monkeypatch.setattr(spinlm.stages.score, "prepare", prepare)
    score_files(str(tiny_model), [before, now], tmp_path / "pairs.jsonl", cfg)
    together = read_jsonl(tmp_path / "pairs.jsonl")

    # every prompt and every distinct response once: the real response of a prompt is in both files
    lim = Limits.of(cfg)
    expected = 0
    for a, b in zip(read_jsonl(before), read_jsonl(now)):
        (prompt, real, gen_a), (_, _, gen_b) = encode_pair(tok, a, lim), encode_pair(tok, b, lim)
        expected += len(prompt) + sum(len(r) for r in {tuple(real), tuple(gen_a), tuple(gen_b)})
    assert sum(forwarded) == expected

    alone = []
    for path in (before, now):
        score_files(str(tiny_model), [path], tmp_path / f"alone-{path.name}", cfg)
        alone += read_jsonl(tmp_path / f"alone-{path.name}")
    assert [r["id"] for r in together] == [r["id"] for r in alone] and len(together) == 40
    for x, y in zip(together, alone):
        assert x["real_tokens"] == y["real_tokens"] and x["generated_tokens_scored"] == y["generated_tokens_scored"]
        assert x["ref_real_logp"] == pytest.approx(y["ref_real_logp"], abs=1e-4)
        assert x["ref_generated_logp"] == pytest.approx(y["ref_generated_logp"], abs=1e-4)
    # the real response of a prompt has one value in both files' rows
    assert [r["ref_real_logp"] for r in together[:20]] == [r["ref_real_logp"] for r in together[20:]]


@pytest.mark.slow
def test_a_window_killed_after_its_first_chunk_resumes_to_the_same_pairs(tiny_model, pairs, tmp_path):
    """kill -9 after the first chunk (16 prompts = 32 rows at eval.batch_size 1) of two window files, re-run:
    the pairs file equals an uninterrupted run's byte for byte, and only the other prompts are scored again."""
    before, now = _window(pairs, tmp_path, n=40)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("SPINLM_FAULT", None)

    def score(out, fault=None):
        cmd = [sys.executable, "-m", "spinlm", "score", "--model", str(tiny_model), "--generations", str(before),
               str(now), "--out", str(out), "--eval.batch_size=1", *COMMON]
        return subprocess.run(cmd, env={**env, **({"SPINLM_FAULT": fault} if fault else {})}, capture_output=True,
                              text=True, timeout=600)

    straight = score(tmp_path / "straight.jsonl")
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = score(tmp_path / "pairs.jsonl", "score-chunk:1")
    assert killed.returncode == -9, killed.stderr[-3000:]
    kept = list(tmp_path.glob("pairs.jsonl*partial*"))
    assert kept and not (tmp_path / "pairs.jsonl").exists()
    assert len(kept[0].read_text().splitlines()) == 1 + 32  # a header line, then the first chunk's rows
    resumed = score(tmp_path / "pairs.jsonl")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming with 32 rows finished earlier" in resumed.stderr
    assert (tmp_path / "pairs.jsonl").read_bytes() == (tmp_path / "straight.jsonl").read_bytes()
    assert not list(tmp_path.glob("pairs.jsonl*partial*"))
