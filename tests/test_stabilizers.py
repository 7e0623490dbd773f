"""Issue "make SPIN help": sft_weight, dead-pair dropping, the unlearning warning, in-iteration
held-out checks with best weights, and RUN/best falling back to the SFT model."""

from __future__ import annotations

import json
import logging

import torch
import yaml

from spinlm.cli import main
from spinlm.config import Config
from spinlm.io import read_json, read_jsonl, write_jsonl
from spinlm.logprobs import sequence_logps
from spinlm.loss import objective, real_nll_per_token, spin_loss
from spinlm.modeling import load_model, load_tokenizer
from spinlm.stages.train import batch_losses, pair_items

from conftest import COMMON


def test_sft_weight_adds_the_real_nll_per_token(tiny_model, pairs):
    cfg = Config()
    cfg.data.max_prompt_length, cfg.data.max_length = 64, 128
    tok = load_tokenizer(str(tiny_model), cfg.model)
    model = load_model(str(tiny_model), cfg.model, dtype=torch.float64)
    items = pair_items(tok, read_jsonl(pairs)[:5], cfg)
    spin, params = objective("spin"), {"beta": 0.1, "loss_type": "sigmoid"}
    plain, _ = batch_losses(model, items, tok.pad_token_id, None, spin, params)
    weighted, metrics = batch_losses(model, items, tok.pad_token_id, None, spin, params, sft_weight=0.7)
    # independent: unpacked per-sequence log-probs, and the NLL per token by hand
    with torch.no_grad():
        real = sequence_logps(model, [(i["prompt"], i["real"]) for i in items], tok.pad_token_id)[0]
        gen = sequence_logps(model, [(i["prompt"], i["generated"]) for i in items], tok.pad_token_id)[0]
    ref_r = torch.tensor([i["ref_real"] for i in items], dtype=torch.float64)
    ref_g = torch.tensor([i["ref_generated"] for i in items], dtype=torch.float64)
    base = spin_loss(real, gen, ref_r, ref_g, 0.1, "sigmoid")
    nll = torch.tensor([-real[k].item() / len(i["real"]) for k, i in enumerate(items)], dtype=torch.float64)
    assert torch.allclose(plain.double(), base, atol=1e-5)
    assert torch.allclose(weighted.double(), base + 0.7 * nll, atol=1e-5)
    assert not torch.allclose(weighted.double(), base, atol=1e-3)
    assert torch.allclose(real_nll_per_token(real, torch.tensor([float(len(i["real"])) for i in items])).double(), nll)
    # at the reference (the model that scored the pairs) policy minus reference is 0 per token
    assert metrics["logratio/real_per_token"].abs().max() < 1e-4


def test_dead_pairs_are_counted_and_can_be_dropped(tiny_model, pairs, tmp_path):
    rows = read_jsonl(pairs)
    for r in rows[:5]:
        r["generated"], r["finish"] = r["real"], "eos"
        r.pop("generated_ids")  # a text-only row: re-encoded from its text
    write_jsonl(tmp_path / "p.jsonl", rows)
    for drop, trained in (("false", len(rows)), ("true", len(rows) - 5)):
        out = tmp_path / f"m-{drop}"
        assert main(["train", "--model", str(tiny_model), "--pairs", str(tmp_path / "p.jsonl"), "--out", str(out),
                     f"--spin.drop_dead_pairs={drop}", "--train.batch_size=8", *COMMON]) == 0
        info = read_json(out / "spinlm_train.json")
        assert info["dead_pairs"] >= 5 and info["pairs"] == trained - (info["dead_pairs"] - 5) * (drop == "true")
        assert info["history"][0]["dead_pairs"] >= (0.0 if drop == "true" else 5 / 8 / 10)


def test_too_high_lr_warns_that_the_model_unlearns_the_data(tiny_model, pairs, tmp_path, caplog):
    """The pilot's failure mode: generated responses that differ from the real ones in a detail
    (here the number in "The answer is N.") are pushed down so hard that the real ones go down too."""
    rows = read_jsonl(pairs)
    for r in rows:
        r["generated"] = "".join(str((int(c) + 1) % 10) if c.isdigit() else c for c in r["real"])
        r["finish"] = "eos"
        r.pop("generated_ids")  # a text-only row: re-encoded from its text
    write_jsonl(tmp_path / "near.jsonl", rows)
    assert main(["score", "--model", str(tiny_model), "--generations", str(tmp_path / "near.jsonl"), "--out",
                 str(tmp_path / "near-pairs.jsonl"), *COMMON]) == 0
    caplog.set_level(logging.WARNING, logger="spinlm")
    args = ["train", "--model", str(tiny_model), "--pairs", str(tmp_path / "near-pairs.jsonl"), "--train.batch_size=8",
            "--run.log_every=1", "--train.optimizer=adamw", "--train.epochs=3", "--train.warmup_ratio=0", *COMMON]
    assert main([*args, "--out", str(tmp_path / "low"), "--train.learning_rate=1e-6"]) == 0
    assert read_json(tmp_path / "low" / "spinlm_train.json")["unlearning_warnings"] == 0
    assert "unlearning the data" not in caplog.text
    assert main([*args, "--out", str(tmp_path / "high"), "--train.learning_rate=3e-2"]) == 0
    info = read_json(tmp_path / "high" / "spinlm_train.json")
    assert min(row["logratio/real_per_token"] for row in info["history"]) < -0.05
    assert info["unlearning_warnings"] > 0 and "unlearning the data" in caplog.text


def test_in_iteration_checks_keep_the_best_weights(tiny_model, task_data, pairs, tmp_path):
    from spinlm.data import load_examples
    from spinlm.metrics import heldout_nll
    from spinlm.tokens import Limits, encode_real

    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump({"run": {"dir": str(tmp_path / "run"), "progress": False},
                                        "model": {"name_or_path": str(tiny_model)},
                                        "data": {"train": str(task_data["train"]), "val": str(task_data["val"]),
                                                 "eval": str(task_data["test"]), "max_train_rows": 24,
                                                 "max_eval_rows": 8, "max_prompt_length": 64, "max_length": 128},
                                        "generation": {"max_new_tokens": 8},
                                        "spin": {"iterations": 1, "mix_window": 1},
                                        "train": {"learning_rate": 2e-2, "optimizer": "adamw", "batch_size": 4,
                                                  "epochs": 2, "eval_every": 2, "patience": 2}}))
    assert main(["run", str(cfg_path)]) == 0
    info = read_json(tmp_path / "run" / "iteration-0" / "model" / "spinlm_train.json")
    checks = info["checks"]
    assert checks and all(c["metric"] == "nll_per_token" for c in checks)  # no checker: NLL
    assert info["best_check"] == min(checks, key=lambda c: c["value"])
    best_i = checks.index(info["best_check"])
    stale = len(checks) - 1 - best_i
    assert (info["steps"] < info["planned_steps"]) == (stale >= 2)  # stopped early iff patience ran out
    # the saved model is the best checked one: its validation NLL is the best check's value
    val = load_examples(str(task_data["val"]), max_rows=8)
    model_dir = tmp_path / "run" / "iteration-0" / "model"
    tok = load_tokenizer(str(model_dir), Config().model)
    model = load_model(str(model_dir), Config().model)
    nll = heldout_nll(model, encode_real(tok, val, Limits(64, 128)), tok.pad_token_id, None, 16)
    assert abs(nll - info["best_check"]["value"]) < 1e-4


def test_best_falls_back_to_the_sft_model_when_every_iteration_is_worse(tiny_model, task_data, tmp_path, capsys):
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "run": {"dir": str(tmp_path / "run"), "progress": False},
        "model": {"name_or_path": str(tiny_model)},
        "data": {"train": str(task_data["train"]), "val": str(task_data["val"]), "eval": str(task_data["test"]),
                 "max_train_rows": 32, "max_eval_rows": 8, "max_prompt_length": 64, "max_length": 128},
        "sft": {"enabled": True, "epochs": 40, "learning_rate": 1e-2, "batch_size": 8},
        "generation": {"max_new_tokens": 8},
        "spin": {"iterations": 2, "mix_window": 1},
        # a destructive learning rate: every iteration ends worse than the SFT model
        "train": {"learning_rate": 0.5, "optimizer": "adamw", "batch_size": 8, "warmup_ratio": 0.0},
        "eval": {"continued_sft": True}}))
    assert main(["run", str(cfg_path)]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "run"
    best = read_json(run / "best.json")
    summary = read_json(run / "summary.json")
    nll = {e["name"]: e["val_metrics"]["nll_per_token"] for e in summary if e["name"] != "continued-sft"}
    assert min(nll, key=nll.get) == "sft" and best["name"] == "sft" and not best["improved"]
    assert best["split"] == "val" and best["metric"] == "nll_per_token"
    assert (run / "best").resolve() == (run / "sft" / "model").resolve()
    assert "SPIN did not improve on the start model (sft)" in out
    assert json.loads((run / "best.json").read_text())["statement"] in out
    # the continued-SFT baseline: as many steps as SPIN took, evaluated and listed, never chosen as best
    # (iteration 0 trains on all 32 pairs: 2 epochs of 4 steps; how many of the destroyed iteration-0 model's
    # samples come back empty, and so how many steps iteration 1 takes, differs between machines' float kernels)
    steps = [read_json(run / f"iteration-{t}" / "model" / "spinlm_train.json")["steps"] for t in (0, 1)]
    assert steps[0] == 8 and steps[1] > 0
    assert read_json(run / "continued-sft" / "model" / "spinlm_sft.json")["steps"] == sum(steps)
    assert "| continued-sft |" in out and "Continued SFT at equal steps" in out
    assert summary[-1]["name"] == "continued-sft" and summary[-1]["metrics"]["nll_per_token"] > 0
