"""Guarded training on the real tiny model: non-finite loss stops with the step named and the last
good checkpoint kept; the grad-norm skip policy; empty generations reported, not trained on."""

from __future__ import annotations

import json
import re

import torch
from safetensors.torch import load_file

from spinlm.cli import main
from spinlm.io import read_json, read_jsonl, write_jsonl
from spinlm.stages.train import epoch_steps

from conftest import COMMON


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_checkpoint(tiny_model, pairs, tmp_path, capsys):
    rows = read_jsonl(pairs)
    seed, batch = 7, 8
    steps = epoch_steps(len(rows), batch, 1, 1, 0, seed, 0)  # the order training will use (run.seed + iteration 0)
    bad = steps[2][0][0][0]  # a pair of optimizer step 3
    rows[bad]["ref_real_logp"] = float("inf")  # e.g. a reference that underflowed
    write_jsonl(tmp_path / "bad.jsonl", rows)
    out = tmp_path / "model"
    code = main(["train", "--model", str(tiny_model), "--pairs", str(tmp_path / "bad.jsonl"), "--out", str(out),
                 f"--run.seed={seed}", f"--train.batch_size={batch}", "--train.checkpoint_every=1",
                 "--train.learning_rate=1e-4", *COMMON])
    err = capsys.readouterr().err
    assert code == 3, err
    assert "optimizer step 3: the loss is inf (not finite)" in err and "Traceback" not in err, err
    kept = out.with_name("model.tmp.checkpoints") / "step-000002"
    assert str(kept) in err and (kept / "complete").exists()
    assert not out.exists(), "a stopped iteration leaves no output that looks complete"


def test_skip_policy_skips_and_counts_every_update_over_the_threshold(tiny_model, pairs, tmp_path):
    out = tmp_path / "model"
    assert main(["train", "--model", str(tiny_model), "--pairs", str(pairs), "--out", str(out),
                 "--train.batch_size=8", "--train.skip_grad_norm_above=1e-12", "--train.learning_rate=1e-3",
                 *COMMON]) == 0
    info = read_json(out / "spinlm_train.json")
    assert info["skipped_steps"] == info["steps"] > 0
    start, end = load_file(str(tiny_model / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all(torch.equal(start[k], end[k]) for k in start), "every update was skipped, so nothing moved"
    # the same run without the policy does move the weights (the test above could fail)
    assert main(["train", "--model", str(tiny_model), "--pairs", str(pairs), "--out", str(tmp_path / "moved"),
                 "--train.batch_size=8", "--train.learning_rate=1e-3", *COMMON]) == 0
    moved = load_file(str(tmp_path / "moved" / "model.safetensors"))
    assert any(not torch.equal(start[k], moved[k]) for k in start)


def test_empty_generations_are_reported_and_not_trained_on(tiny_model, task_data, tmp_path, capsys, caplog):
    gens = tmp_path / "gens.jsonl"
    assert main(["generate", "--model", str(tiny_model), "--data", str(task_data["train"]), "--out", str(gens),
                 "--generation.max_new_tokens=8", *COMMON]) == 0
    rows = read_jsonl(gens)
    rows[1]["generated"], rows[4]["generated"] = "", "  "
    write_jsonl(gens, rows)
    caplog.set_level("WARNING", logger="spinlm")
    assert main(["score", "--model", str(tiny_model), "--generations", str(gens), "--out",
                 str(tmp_path / "pairs.jsonl"), *COMMON]) == 0
    scored = read_jsonl(tmp_path / "pairs.jsonl")
    assert len(scored) == len(rows) - 2 and {rows[1]["id"], rows[4]["id"]}.isdisjoint(r["id"] for r in scored)
    assert "2 of %d generated responses are empty" % len(rows) in caplog.text
    assert json.loads(json.dumps(scored[0]))["ref_real_logp"] < 0


def _same_weights_per_row_and_whole(args: list[str], tiny_model, tmp_path) -> None:
    """Trained with and without packing.backward_per_row: the same weights, moved from the start."""
    assert main([*args, "--out", str(tmp_path / "rows"), "--packing.backward_per_row=true"]) == 0
    assert main([*args, "--out", str(tmp_path / "whole"), "--packing.backward_per_row=false"]) == 0
    a, b = (load_file(str(tmp_path / "rows" / "model.safetensors")),
            load_file(str(tmp_path / "whole" / "model.safetensors")))
    start = load_file(str(tiny_model / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 1e-4


def test_backward_per_packed_row_gives_the_same_update(tiny_model, pairs, tmp_path):
    """packing.backward_per_row splits a micro-batch into its packed rows, one forward and backward
    each: the summed gradients, hence the weights after training, equal one backward per micro-batch."""
    args = ["train", "--model", str(tiny_model), "--pairs", str(pairs), "--train.batch_size=16",
            "--packing.max_tokens=96", "--train.learning_rate=1e-3", "--train.max_steps=3", *COMMON]
    _same_weights_per_row_and_whole(args, tiny_model, tmp_path)
    from spinlm.config import Config
    from spinlm.modeling import load_tokenizer
    from spinlm.packing import pack
    from spinlm.stages.train import pair_items

    cfg = Config()
    cfg.data.max_prompt_length, cfg.data.max_length = 64, 128
    items = pair_items(load_tokenizer(str(tiny_model), cfg.model), read_jsonl(pairs)[:16], cfg)
    assert len(pack([(i["prompt"], [i["real"], i["generated"]]) for i in items], 96)) > 2  # really split


def test_sft_backward_per_packed_row_gives_the_same_update(tiny_model, task_data, tmp_path):
    """The SFT stage follows packing.backward_per_row too (one packed row's activations at a time):
    the weights after training equal one backward per micro-batch."""
    args = ["sft", "--model", str(tiny_model), "--data", str(task_data["train"]), "--sft.batch_size=16",
            "--sft.epochs=1", "--sft.learning_rate=1e-2", "--packing.max_tokens=96", "--data.max_length=128",
            "--data.max_prompt_length=64", "--run.progress=false"]
    _same_weights_per_row_and_whole(args, tiny_model, tmp_path)
    assert read_json(tmp_path / "rows" / "spinlm_sft.json")["steps"] == 3  # 48 examples, 16 a step
    from spinlm.config import Config
    from spinlm.data import load_examples
    from spinlm.modeling import load_tokenizer
    from spinlm.packing import pack
    from spinlm.tokens import Limits, encode_real

    cfg = Config()
    cfg.data.max_prompt_length, cfg.data.max_length = 64, 128
    seqs = encode_real(load_tokenizer(str(tiny_model), cfg.model), load_examples(str(task_data["train"]))[:16],
                       Limits.of(cfg))
    assert len(pack(seqs, 96)) > 2  # really split


def test_sft_stops_on_a_non_finite_loss_and_keeps_the_checkpoint(tiny_model, task_data, tmp_path, capsys):
    """The SFT stage (and so the continued-SFT baseline) guards its steps as SPIN training does: a
    learning rate of 1e30 makes the second step's loss non-finite, and training stops there (exit 3)
    instead of training on NaN weights and marking the stage done."""
    out = tmp_path / "sft"
    code = main(["sft", "--model", str(tiny_model), "--data", str(task_data["train"]), "--out", str(out),
                 "--sft.learning_rate=1e30", "--sft.batch_size=8", "--sft.epochs=1", "--train.checkpoint_every=1",
                 *COMMON])
    err = capsys.readouterr().err
    assert code == 3, err
    found = re.search(r"sft, optimizer step (\d+): the (loss|gradient norm) is (nan|inf|-inf) \(not finite\)", err)
    assert found and "Traceback" not in err, err
    step = int(found.group(1))
    assert step >= 2  # step 1 starts from the given model: finite
    kept = out.with_name("sft.tmp.checkpoints") / f"step-{step - 1:06d}"
    assert str(kept) in err and (kept / "complete").exists(), err
    assert not out.exists(), "a stopped stage leaves no output that looks complete"
