"""`spinlm dpo`: DPO on given preference pairs is SPIN's score + train stages on those pairs."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from spinlm.cli import main
from spinlm.io import read_json, read_jsonl
from spinlm.tokens import Limits, encode_pair

from conftest import COMMON

TRAIN = ["--train.epochs=1", "--train.batch_size=4", "--train.learning_rate=1e-3", "--train.optimizer=adamw",
         "--run.log_every=1", "--train.checkpoint_every=0", "--spin.beta=0.5"]


def _prefs(task_data, path, conversational: bool, n: int = 12):
    """TRL preference rows: chosen = the right answer, rejected = another row's answer."""
    rows = read_jsonl(task_data["train"])[:n]
    out = []
    for i, row in enumerate(rows):
        wrong = rows[(i + 1) % len(rows)]["response"]
        if conversational:
            out.append({"prompt": [{"role": "user", "content": row["prompt"]}],
                        "chosen": [{"role": "assistant", "content": row["response"]}],
                        "rejected": [{"role": "assistant", "content": wrong}]})
        else:
            out.append({"prompt": row["prompt"], "chosen": row["response"], "rejected": wrong})
    path.write_text("".join(json.dumps(r) + "\n" for r in out))
    return path


def _weights(model_dir):
    return load_file(str(model_dir / "model.safetensors"))


@pytest.mark.parametrize("conversational", [False, True])
def test_dpo_trains_the_model(tiny_model, task_data, tmp_path, conversational, capsys):
    prefs = _prefs(task_data, tmp_path / "prefs.jsonl", conversational)
    out = tmp_path / "dpo-model"
    assert main(["dpo", "--model", str(tiny_model), "--data", str(prefs), "--eval-data", str(prefs),
                 "--out", str(out), *COMMON, *TRAIN]) == 0
    assert "wrote" in capsys.readouterr().out
    log = read_json(out / "spinlm_train.json")
    assert log["steps"] == 3 and log["pairs"] == 12 and log["dead_pairs"] == 0
    record = read_json(out / "spinlm_dpo.json")
    assert record["beta"] == 0.5 and record["eval"]["reward_accuracy"] is not None
    start, trained = _weights(tiny_model), _weights(out)
    assert any(not torch.equal(start[k], trained[k]) for k in start)
    pairs = read_jsonl(tmp_path / "dpo-model.pairs.jsonl")
    rows = read_jsonl(task_data["train"])[:12]
    assert [p["real"] for p in pairs] == [r["response"] for r in rows]
    assert [p["generated"] for p in pairs] == [rows[(i + 1) % 12]["response"] for i in range(12)]
    assert not list(tmp_path.glob("*.tmp*"))  # no scratch left behind


def _plain_logp(model, prompt: list[int], response: list[int]) -> float:
    ids = torch.tensor([prompt + response])
    logps = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    return sum(logps[len(prompt) - 1 + k, tok].item() for k, tok in enumerate(response))


def test_dpo_loss_equals_spin_loss_on_the_same_pairs(tiny_model, task_data, tmp_path):
    """The same pairs written as SPIN generations, scored and trained by `spinlm score` + `spinlm train`,
    give the same reference log-probs, the same loss at every step and the same weights."""
    prefs = _prefs(task_data, tmp_path / "prefs.jsonl", conversational=False)
    flags = [*COMMON, *TRAIN, "--run.deterministic=true"]
    assert main(["dpo", "--model", str(tiny_model), "--data", str(prefs), "--out", str(tmp_path / "dpo"),
                 *flags]) == 0
    dpo_pairs = read_jsonl(tmp_path / "dpo.pairs.jsonl")
    gens = [{k: p[k] for k in ("id", "prompt", "real", "generated", "finish")} for p in dpo_pairs]
    (tmp_path / "gens.jsonl").write_text("".join(json.dumps(g) + "\n" for g in gens))
    assert main(["score", "--model", str(tiny_model), "--generations", str(tmp_path / "gens.jsonl"),
                 "--out", str(tmp_path / "spin-pairs.jsonl"), *flags]) == 0
    assert main(["train", "--model", str(tiny_model), "--pairs", str(tmp_path / "spin-pairs.jsonl"),
                 "--out", str(tmp_path / "spin"), *flags]) == 0
    spin_pairs = read_jsonl(tmp_path / "spin-pairs.jsonl")
    for key in ("ref_real_logp", "ref_generated_logp"):
        assert [p[key] for p in dpo_pairs] == [p[key] for p in spin_pairs]
    # The reference log-probs are the plain per-sequence sums under the starting model (EOS included).
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model)
    from spinlm import config

    cfg = config.build(None, [f"--model.name_or_path={tiny_model}", *COMMON])
    with torch.no_grad():
        for p in dpo_pairs[:3]:
            prompt, chosen, rejected = encode_pair(tok, p, Limits.of(cfg))
            assert chosen[-1] == rejected[-1] == tok.eos_token_id
            assert p["ref_real_logp"] == pytest.approx(_plain_logp(model, prompt, chosen), abs=1e-4)
            assert p["ref_generated_logp"] == pytest.approx(_plain_logp(model, prompt, rejected), abs=1e-4)
    dpo_log, spin_log = (read_json(tmp_path / "dpo" / "spinlm_train.json"),
                         read_json(tmp_path / "spin" / "spinlm_train.json"))
    assert [h["loss"] for h in dpo_log["history"]] == [h["loss"] for h in spin_log["history"]]
    assert dpo_log["history"][0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 1
    assert dpo_log["history"][-1]["loss"] != pytest.approx(math.log(2), abs=1e-4)
    a, b = _weights(tmp_path / "dpo"), _weights(tmp_path / "spin")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_rerun_reuses_the_scored_pairs(tiny_model, task_data, tmp_path, caplog):
    import logging

    prefs = _prefs(task_data, tmp_path / "prefs.jsonl", conversational=True, n=4)
    argv = ["dpo", "--model", str(tiny_model), "--data", str(prefs), "--out", str(tmp_path / "m"), *COMMON, *TRAIN]
    assert main(argv) == 0
    with caplog.at_level(logging.INFO, logger="spinlm"):
        assert main(argv) == 0
    assert "reusing the reference log-probs" in caplog.text


def test_missing_rejected_names_file_row_and_field(tiny_model, task_data, tmp_path, capsys):
    prefs = _prefs(task_data, tmp_path / "prefs.jsonl", conversational=False, n=4)
    rows = read_jsonl(prefs)
    del rows[2]["rejected"]
    prefs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = main(["dpo", "--model", str(tiny_model), "--data", str(prefs), "--out", str(tmp_path / "m"), *COMMON])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{prefs}, row 3, field 'rejected'" in err and "missing" in err and "Traceback" not in err
    assert not (tmp_path / "m").exists()


def test_one_response_formats_are_refused_for_dpo(tiny_model, task_data, tmp_path, capsys):
    code = main(["dpo", "--model", str(tiny_model), "--data", str(task_data["train"]), "--out", str(tmp_path / "m"),
                 *COMMON])
    err = capsys.readouterr().err
    assert code == 2 and "row 1" in err and "needs two" in err


def test_spin_format_rows_are_preference_pairs(tmp_path):
    from spinlm.data import load_examples

    user = {"role": "user", "content": "q"}
    row = {"real": [user, {"role": "assistant", "content": "human"}],
           "generated": [user, {"role": "assistant", "content": "model"}]}
    (tmp_path / "d.jsonl").write_text(json.dumps(row) + "\n")
    [ex] = load_examples(str(tmp_path / "d.jsonl"), preference=True)
    assert (ex.real, ex.rejected) == ("human", "model")
    [ex] = load_examples(str(tmp_path / "d.jsonl"))
    assert ex.rejected is None  # SPIN reads only the real side


def test_ultrafeedback_binarized_rows(tmp_path):
    """HuggingFaceH4/ultrafeedback_binarized's shape: chosen/rejected repeat the prompt as a user turn, and a
    `messages` column is present too (so the recipe sets data.format: trl)."""
    from spinlm import config
    from spinlm.data import load_examples

    user = {"role": "user", "content": "Name a prime."}
    row = {"prompt": "Name a prime.", "prompt_id": "p1", "chosen": [user, {"role": "assistant", "content": "7"}],
           "rejected": [user, {"role": "assistant", "content": "9"}], "messages": [user],
           "score_chosen": 8.0, "score_rejected": 2.0}
    (tmp_path / "uf.jsonl").write_text(json.dumps(row) + "\n")
    [ex] = load_examples(str(tmp_path / "uf.jsonl"), format="trl", preference=True)
    assert (ex.prompt, ex.real, ex.rejected, ex.id) == ([user], "7", "9", "p1")
    # the recipes' zero3 needs DeepSpeed; without it, the documented alternative
    no_deepspeed = [] if importlib.util.find_spec("deepspeed") else ["--train.strategy=fsdp"]
    for name in ("zephyr-7b-dpo", "zephyr-7b-spin-then-dpo"):
        cfg = config.build(Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml", no_deepspeed)
        config.validate(cfg)
        assert cfg.data.format == "trl" and cfg.data.train_split == "train_prefs"
