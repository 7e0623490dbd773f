"""Faithful on real models (issue 14): the sampled ids are what is scored, dropout is off in SPIN
training, nothing is selected on the reported data, the continued-SFT baseline sees as many
examples as SPIN, one definition of a dead pair, and rows whose parts disagree are refused.
(Turn-end tokens of real chat templates: tests/test_chat_templates.py.)"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from spinlm import config as config_mod
from spinlm.cli import main
from spinlm.data import load_examples, split_validation
from spinlm.errors import UserError
from spinlm.io import read_json, read_jsonl
from spinlm.logprobs import sequence_logps
from spinlm.metrics import reward_metrics
from spinlm.stages.train import pair_items, train
from spinlm.summary import NO_SELECTION, select_best
from spinlm.tokens import Limits, encode_pair, encode_prompt, encode_real

COMMON = ["--data.max_prompt_length=64", "--data.max_length=128", "--run.progress=false"]
REPO = Path(__file__).resolve().parents[1]


def _rows(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------- 2. train on what was sampled


def test_score_uses_the_sampled_ids_not_the_re_encoded_text(tiny_model, pairs, tmp_path):
    """A generation whose sampled ids are not the canonical encoding of its text (one token per
    character) is scored as sampled: its reference log-prob is that of the sampled ids."""
    tok = AutoTokenizer.from_pretrained(tiny_model)
    gens = read_jsonl(pairs.parent / "gens.jsonl")[:6]
    vocab = tok.get_vocab()
    for g in gens:  # each token spelled with one token per character, where the vocabulary has them
        pieces = [tok.convert_ids_to_tokens(t) for t in tok(g["generated"], add_special_tokens=False)["input_ids"]]
        g["generated_ids"] = [vocab[c] for p in pieces for c in (p if all(c in vocab for c in p) else [p])]
        assert tok.decode(g["generated_ids"]) == g["generated"]
        g["generated_ids"] += [tok.eos_token_id] if g["finish"] == "eos" else []
    canonical = [tok(g["generated"], add_special_tokens=False)["input_ids"] for g in gens]
    assert any(len(c) != len(g["generated_ids"]) - (g["finish"] == "eos") for c, g in zip(canonical, gens))
    _rows(tmp_path / "gens.jsonl", gens)
    assert main(["score", "--model", str(tiny_model), "--generations", str(tmp_path / "gens.jsonl"), "--out",
                 str(tmp_path / "pairs.jsonl"), *COMMON]) == 0
    scored = read_jsonl(tmp_path / "pairs.jsonl")
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    with torch.no_grad():
        for g, row in zip(gens, scored):
            prompt = encode_prompt(tok, g["prompt"])
            sampled, _ = sequence_logps(model, [(prompt, g["generated_ids"])], tok.pad_token_id)
            assert row["ref_generated_logp"] == pytest.approx(sampled.item(), abs=1e-4)
    cfg = config_mod.build(None, COMMON)
    assert [encode_pair(tok, r, Limits.of(cfg))[2] for r in scored] == [g["generated_ids"] for g in gens]


# ---------------------------------------------------------------- 3. dropout off in SPIN training


def _gpt2_with_dropout(tiny_model: Path, out: Path) -> Path:
    tok = AutoTokenizer.from_pretrained(tiny_model)
    config = GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.3,
                        embd_pdrop=0.3, attn_pdrop=0.3, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_dropout_is_off_in_spin_training_by_default(tiny_model, pairs, tmp_path):
    """A GPT-2-style model with dropout: with the default the first step's loss is log 2 (the policy
    is its reference), with train.disable_dropout false it is not (dropout noise at step 0)."""
    gpt2 = _gpt2_with_dropout(tiny_model, tmp_path / "gpt2")
    assert main(["score", "--model", str(gpt2), "--generations", str(pairs.parent / "gens.jsonl"), "--out",
                 str(tmp_path / "pairs.jsonl"), *COMMON]) == 0
    first = {}
    for off in (True, False):
        cfg = config_mod.build(None, [*COMMON, "--train.max_steps=1", "--run.log_every=1", "--train.batch_size=8",
                                      f"--train.disable_dropout={str(off).lower()}"])
        result = train(str(gpt2), tmp_path / "pairs.jsonl", tmp_path / f"out-{off}", cfg, 0)
        first[off] = result["history"][0]
    assert first[True]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert first[True]["rewards/margin"] == pytest.approx(0.0, abs=1e-5)
    assert abs(first[False]["loss"] - math.log(2)) > 1e-3


# ---------------------------------------------------------------- 4. never select on the reported data


def test_split_validation_is_seeded_disjoint_and_capped(task_data):
    examples = load_examples(str(task_data["train"]))
    train, val = split_validation(examples, 0.25, seed=1)
    assert len(val) == 12 and len(train) == 36
    assert {e.id for e in train}.isdisjoint(e.id for e in val)
    assert [e.id for e in train + val if e in train] == [e.id for e in examples if e in train]  # file order kept
    assert [e.id for e in split_validation(examples, 0.25, seed=1)[1]] == [e.id for e in val]
    assert [e.id for e in split_validation(examples, 0.25, seed=2)[1]] != [e.id for e in val]
    assert len(split_validation(examples, 5, seed=1)[1]) == 5
    assert len(split_validation(examples, 0.5, seed=1, cap=7)[1]) == 7
    assert split_validation(examples, 0, seed=1) == (examples, [])
    # which rows are chosen depends on the row, not on the rows around it
    assert {e.id for e in split_validation(examples[:40], 0.25, seed=1)[1]} & {e.id for e in val}


def test_best_is_never_chosen_on_held_out_metrics():
    entries = [{"name": n, "model": n, "metrics": {"accuracy": a}, "val_metrics": {}}
               for n, a in (("sft", 0.2), ("iteration-0", 0.5))]
    assert select_best(entries) is None
    entries[0]["val_metrics"], entries[1]["val_metrics"] = {"accuracy": 0.4}, {"accuracy": 0.3}
    best = select_best(entries)
    assert best["name"] == "sft" and best["split"] == "val" and not best["improved"]


def _run_config(tiny_model, task_data, run_dir, **data) -> dict:
    return {"run": {"dir": str(run_dir), "progress": False, "seed": 5},
            "model": {"name_or_path": str(tiny_model)},
            "data": {"train": str(task_data["train"]), "eval": str(task_data["test"]), "max_train_rows": 24,
                     "max_eval_rows": 8, "max_prompt_length": 64, "max_length": 128, **data},
            "generation": {"max_new_tokens": 8, "batch_size": 8},
            "spin": {"iterations": 1, "beta": 0.1},
            "train": {"learning_rate": 1e-4, "epochs": 1, "batch_size": 2, "gradient_accumulation_steps": 2},
            "sft": {"learning_rate": 1e-4},
            "eval": {"checker": "spinlm.demo.task:check_example", "batch_size": 8, "continued_sft": True}}


@pytest.mark.slow
def test_validation_is_split_off_the_training_rows_and_baselines_are_equal(tiny_model, task_data, tmp_path, caplog,
                                                                          capsys):
    """Without data.val, data.val_size training rows (seeded) become the validation data: logged,
    not generated for or trained on, and what RUN/best selects on; the continued-SFT baseline sees
    as many examples as SPIN did with gradient accumulation 2. With val_size 0 nothing is selected."""
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(_run_config(tiny_model, task_data, tmp_path / "run", val_size=4)))
    caplog.set_level("INFO", logger="spinlm")
    assert main(["run", str(path)]) == 0
    assert "4 of 24 training rows" in caplog.text and "split off as validation data" in caplog.text
    rows = load_examples(str(task_data["train"]), max_rows=24)
    _, val = split_validation(rows, 4, seed=5, cap=8)
    gens = read_jsonl(tmp_path / "run" / "iteration-0" / "generations.jsonl")
    assert len(gens) == 20 and {g["id"] for g in gens}.isdisjoint(e.id for e in val)
    assert read_json(tmp_path / "run" / "best.json")["split"] == "val"
    for name in ("sft", "iteration-0"):
        assert read_json(tmp_path / "run" / name / "metrics.json")["val"]["examples"] == 4
    spin = read_json(tmp_path / "run" / "iteration-0" / "model" / "spinlm_train.json")
    baseline = read_json(tmp_path / "run" / "continued-sft" / "model" / "spinlm_sft.json")
    assert spin["steps"] == baseline["steps"] == 5 and spin["examples"] == baseline["examples"] == 20

    path.write_text(yaml.safe_dump(_run_config(tiny_model, task_data, tmp_path / "none", val_size=0)))
    capsys.readouterr()
    assert main(["run", str(path)]) == 0
    assert NO_SELECTION in capsys.readouterr().out and not (tmp_path / "none" / "best.json").exists()


def test_selection_without_validation_data_is_refused(tiny_model, task_data, tmp_path, capsys):
    cfg = _run_config(tiny_model, task_data, tmp_path / "run", val_size=0)
    cfg["train"]["eval_every"] = 2
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["validate", str(tmp_path / "run.yaml")]) == 2
    err = capsys.readouterr().err
    assert "train.eval_every select on validation data, and there is none" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_continued_sft_is_selected_on_validation_as_spin_is(tiny_model, task_data, tmp_path):
    """The continued-SFT baseline gets SPIN's selection: checks on the validation data at the steps
    SPIN's iterations checked (train.eval_every 2 over iterations of 3 and 2 steps: 2, 3 and 2 + 3),
    by the metric SPIN's checks use (here NLL per token: no checker), and the best checked weights
    are the model it saves, for the per-iteration baselines of the experiments too. (Before: no
    check, the last weights, while SPIN kept its best.)"""
    from spinlm.experiment.spin_vs_sft import baselines
    from spinlm.io import write_json
    from spinlm.rundir import RunLayout

    run = tmp_path / "run"
    cfg = _run_config(tiny_model, task_data, run, val=str(task_data["val"]))
    cfg["eval"].pop("checker")
    cfg["spin"]["iterations"] = 2
    cfg["train"].update(eval_every=2, batch_size=4, gradient_accumulation_steps=1)
    # a learning rate that grows to a destructive one: the validation NLL rises after the first check
    cfg["sft"].update(learning_rate=1.0, warmup_ratio=0.99)
    for t, steps in enumerate([3, 2]):  # what SPIN's iterations took
        write_json(RunLayout(run).train_log(t), {"steps": steps})
    baselines(run, tiny_model, cfg)

    tok = AutoTokenizer.from_pretrained(tiny_model)
    val = load_examples(str(task_data["val"]), max_rows=8)
    lim = Limits.of(config_mod.build(None, COMMON))
    for name, steps, checked in (("continued-sft-0", 3, [2, 3]), ("continued-sft", 5, [2, 3, 5])):
        info = read_json(run / name / "model" / "spinlm_sft.json")
        assert info["steps"] == steps and [c["step"] for c in info["checks"]] == checked
        assert {c["metric"] for c in info["checks"]} == {"nll_per_token"}
        values = [c["value"] for c in info["checks"]]
        assert info["best_check"] == info["checks"][values.index(min(values))]
        assert info["best_check"]["step"] == 2 and values[-1] > values[0] + 1  # the kept weights are not the last
        model = AutoModelForCausalLM.from_pretrained(run / name / "model").eval()
        with torch.no_grad():  # the saved model's validation NLL per token, by plain forwards
            logps, counts = zip(*(sequence_logps(model, [(encode_prompt(tok, ex.prompt), real)], tok.pad_token_id)
                                  for ex, real in zip(val, [r[1][0] for r in encode_real(tok, val, lim)])))
        nll = -sum(x.item() for x in logps) / sum(n.item() for n in counts)
        assert nll == pytest.approx(info["best_check"]["value"], abs=1e-4)
        assert read_json(run / name / "metrics.json")["val"]["nll_per_token"] == pytest.approx(nll, abs=1e-4)
    from spinlm.loop import spin_check_steps

    assert spin_check_steps([3, 2], 2) == [2, 3, 5] and spin_check_steps([3, 2], 0) == []  # no checks: last weights


# ---------------------------------------------------------------- 5. one definition of a dead pair


def test_dead_pairs_are_the_same_in_training_and_in_the_held_out_metrics(tiny_model, pairs):
    """Same text but cut at the length limit (no turn end): a live pair in both; same ids: dead in both."""
    tok = AutoTokenizer.from_pretrained(tiny_model)
    cfg = config_mod.build(None, COMMON)
    rows = read_jsonl(pairs)[:4]
    for r in rows:
        r["generated"], r["finish"] = r["real"] + " ", "length"
        r.pop("generated_ids", None)
    rows[0]["finish"], rows[0]["generated"] = "eos", rows[0]["real"]
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    metrics = reward_metrics(model, tok, rows, cfg, 0.1)
    dead = [i["dead"] for i in pair_items(tok, rows, cfg)]
    assert dead == [True, False, False, False]
    assert metrics["dead_pair_share"] == pytest.approx(sum(dead) / len(dead))


def test_reward_metrics_have_one_definition_in_training_and_held_out(tiny_model, pairs, tmp_path):
    """Reward accuracy, margin and the sides' rewards are over the live pairs, in the training log and
    in the held-out metrics alike, and the dead pairs are a share of their own. Step 1's forward runs
    the start weights, so its logged rewards are the start model's held-out rewards on the same pairs,
    here checked against summed log-probs of plain forwards. (Before: training counted dead pairs
    as failures and averaged their zero margins in; held out, accuracy left them out, the margin not.)"""
    tok = AutoTokenizer.from_pretrained(tiny_model)
    cfg = config_mod.build(None, [*COMMON, "--train.max_steps=1", "--run.log_every=1", "--train.batch_size=8"])
    rows = read_jsonl(pairs)[:8]
    for k, r in enumerate(rows):
        if k in (1, 4, 6):  # dead: the sample is the real response, token for token
            r["generated"], r["finish"], r["ref_generated_logp"] = r["real"], "eos", r["ref_real_logp"]
            r.pop("generated_ids", None)
        else:  # live, with a clear margin of either sign: the stored reference moved by +-5 nats
            r["ref_real_logp"] += -5.0 if k % 2 == 0 else 5.0
    _rows(tmp_path / "pairs.jsonl", rows)
    items = pair_items(tok, rows, cfg)
    live = [not i["dead"] for i in items]
    assert live == [k not in (1, 4, 6) for k in range(8)]
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    with torch.no_grad():
        real = sequence_logps(model, [(i["prompt"], i["real"]) for i in items], tok.pad_token_id)[0]
        gen = sequence_logps(model, [(i["prompt"], i["generated"]) for i in items], tok.pad_token_id)[0]
    beta = cfg.spin.beta
    side_real = [beta * (real[k].item() - r["ref_real_logp"]) for k, r in enumerate(rows)]
    side_gen = [beta * (gen[k].item() - r["ref_generated_logp"]) for k, r in enumerate(rows)]
    margins = [a - b for a, b in zip(side_real, side_gen)]
    over_live = lambda xs: sum(x for x, ok in zip(xs, live) if ok) / sum(live)  # noqa: E731
    expected = {"accuracy": over_live([float(m > 0) for m in margins]), "margin": over_live(margins),
                "real": over_live(side_real), "generated": over_live(side_gen)}
    assert 0 < expected["accuracy"] < 1 and abs(expected["margin"]) > 0.05

    logged = train(str(tiny_model), tmp_path / "pairs.jsonl", tmp_path / "out", cfg, 0)["history"][0]
    held = reward_metrics(model, tok, rows, cfg, beta)
    for key, value in expected.items():
        assert logged[f"rewards/{key}"] == pytest.approx(value, abs=1e-4), key
    for key, name in (("accuracy", "reward_accuracy"), ("margin", "reward_margin"), ("real", "rewards_real"),
                      ("generated", "rewards_generated")):
        assert held[name] == pytest.approx(expected[key], abs=1e-4), name
    assert logged["dead_pairs"] == pytest.approx(3 / 8) and held["dead_pair_share"] == pytest.approx(3 / 8)


# ---------------------------------------------------------------- 6. rows whose parts disagree


CONFLICTS = {
    "spin-prompts-differ": ("spin", {"real": [{"role": "user", "content": "What is 2 plus 3?"},
                                              {"role": "assistant", "content": "5"}],
                                     "generated": [{"role": "user", "content": "What is 4 plus 4?"},
                                                   {"role": "assistant", "content": "8"}]}, "generated[0]"),
    "ultrachat-prompt-column": ("messages", {"prompt": "What is 9 plus 1?",
                                             "messages": [{"role": "user", "content": "What is 2 plus 3?"},
                                                          {"role": "assistant", "content": "5"}]}, "prompt"),
    "trl-chosen-is-another-conversation": ("trl", {"prompt": [{"role": "user", "content": "What is 2 plus 3?"}],
                                                   "chosen": [{"role": "user", "content": "What is 7?"},
                                                              {"role": "assistant", "content": "7"}]},
                                           "chosen[0]"),
}


@pytest.mark.parametrize("case", sorted(CONFLICTS))
def test_rows_whose_parts_disagree_are_an_input_error(case, tmp_path):
    fmt, row, field = CONFLICTS[case]
    good = {"spin": lambda: {**row, "generated": [{"role": "user", "content": "What is 2 plus 3?"},
                                                  {"role": "assistant", "content": "6"}]},
            "messages": lambda: {"messages": row["messages"]},
            "trl": lambda: {"prompt": row["prompt"], "chosen": [{"role": "assistant", "content": "5"}]}}[fmt]()
    path = _rows(tmp_path / "data.jsonl", [good, row])
    assert len(load_examples(str(tmp_path / "data.jsonl"), max_rows=1)) == 1  # the good row reads
    with pytest.raises(UserError) as e:
        load_examples(str(path))
    assert f"{path}" in str(e.value) and "row 2" in str(e.value) and field in str(e.value)


def test_preference_sides_answering_different_prompts_are_refused(tmp_path):
    row = {"prompt": [{"role": "user", "content": "What is 2 plus 3?"}],
           "chosen": [{"role": "assistant", "content": "5"}],
           "rejected": [{"role": "user", "content": "What is 4 plus 4?"}, {"role": "assistant", "content": "8"}]}
    path = _rows(tmp_path / "prefs.jsonl", [row])
    with pytest.raises(UserError) as e:
        load_examples(str(path), preference=True)
    assert str(path) in str(e.value) and "rejected" in str(e.value)


# ---------------------------------------------------------------- 7. the tests need nothing outside the repository


def test_no_test_reads_files_outside_the_repository():
    """The format samples live in tests/data/formats; no test reaches for ../shared."""
    samples = REPO / "tests" / "data" / "formats"
    assert len(list(samples.iterdir())) >= 5
    for path in (REPO / "tests").glob("*.py"):
        if path.name != Path(__file__).name:
            assert "../shared" not in path.read_text() and "/work/shared" not in path.read_text(), path
