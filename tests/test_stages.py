"""Stage-level tests on a real tiny Llama: prompt ids, log-probs, generation seeds."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from spinlm import config
from spinlm.data import load_examples
from spinlm.generation.local import generate, row_seed
from spinlm.io import read_jsonl
from spinlm.logprobs import sequence_logps
from spinlm.stages.generate import generate_file
from spinlm.stages.score import score_files
from spinlm.stages.train import train
from spinlm.tokens import encode_prompt, render_prompt_text


def _cfg(tiny_model, tmp_path, *extra):
    cfg = config.build(None, [f"--model.name_or_path={tiny_model}", f"--run.dir={tmp_path}", "--run.progress=false",
                              "--generation.max_new_tokens=12", "--data.max_length=128", "--data.max_prompt_length=64",
                              "--train.epochs=1", "--train.batch_size=2", "--train.learning_rate=1e-3", *extra])
    config.validate(cfg, need=("model",))
    return cfg


def _plain_logp(model, prompt: list[int], response: list[int]) -> float:
    """Reference computation: one unpadded sequence, full log-softmax, sum over the response."""
    ids = torch.tensor([prompt + response])
    logits = model(input_ids=ids).logits[0].float()
    logps = torch.log_softmax(logits, -1)
    return sum(logps[len(prompt) - 1 + k, tok].item() for k, tok in enumerate(response))


def test_batched_logps_equal_plain_per_sequence(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    seqs = [(torch.randint(5, 200, (int(p),), generator=g).tolist(),
             torch.randint(5, 200, (int(r),), generator=g).tolist())
            for p, r in [(3, 7), (11, 2), (1, 1), (20, 15)]]
    with torch.no_grad():
        sums, counts = sequence_logps(model, seqs, pad_id=0)
    assert counts.tolist() == [7, 2, 1, 15]
    for (p, r), s in zip(seqs, sums.tolist()):
        assert s == pytest.approx(_plain_logp(model, p, r), abs=1e-4)


def test_prompt_ids_identical_in_generate_score_and_train(tiny_model, task_data, tmp_path, monkeypatch):
    """Instrument the loaded models: every full-sequence forward of each stage (generate's
    prefill, score, train) must start with the prompt ids that encode_prompt gives."""
    import spinlm.generation.local
    import spinlm.modeling
    import spinlm.stages.score
    import spinlm.training.steps

    cfg = _cfg(tiny_model, tmp_path)
    examples = load_examples(str(task_data["train"]), max_rows=3)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    expected = [encode_prompt(tok, ex.prompt, cfg.data.max_prompt_length) for ex in examples]
    assert expected[0] == tok(render_prompt_text(tok, examples[0].prompt), add_special_tokens=False)["input_ids"]
    seen: dict[str, list[list[int]]] = {}

    def record(stage):
        def hook(module, args, kwargs):
            ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
            if ids.shape == mask.shape:  # full sequences, not a cached decoding step
                seen.setdefault(stage, []).extend(
                    [t for t, a in zip(r, m) if a] for r, m in zip(ids.tolist(), mask.tolist()))
        return hook

    def instrumented(stage):
        def load(*args, **kwargs):
            model = spinlm.modeling.load_model(*args, **kwargs)
            model.register_forward_pre_hook(record(stage), with_kwargs=True)
            return model
        return load

    for module, stage in ((spinlm.generation.local, "generate"), (spinlm.training.steps, "train")):
        monkeypatch.setattr(module, "load_model", instrumented(stage))
    monkeypatch.setattr(spinlm.stages.score, "inference_model",
                        lambda path, cfg: (instrumented("score")(path, cfg.model).eval(), None))
    generate_file(str(tiny_model), examples, tmp_path / "gen.jsonl", cfg, 0)
    score_files(str(tiny_model), [tmp_path / "gen.jsonl"], tmp_path / "pairs.jsonl", cfg)
    train(str(tiny_model), tmp_path / "pairs.jsonl", tmp_path / "model", cfg, 0)
    assert set(seen) == {"generate", "score", "train"}
    for stage, rows in seen.items():
        prefixes = [next((e for e in expected if r[: len(e)] == e), None) for r in rows]
        assert None not in prefixes, f"{stage}: a forward row does not start with a rendered prompt"
        assert {tuple(p) for p in prefixes} == {tuple(e) for e in expected}, stage
    assert len(seen["generate"]) == 3 and len(seen["score"]) == 6  # 3 prompts; 3 real + 3 generated


def test_per_row_seeds_do_not_depend_on_batch_composition(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model)
    prompts = [encode_prompt(tok, [{"role": "user", "content": f"What is {i} plus {i + 3}?"}]) for i in range(6)]
    seeds = [row_seed(7, 0, f"row{i}") for i in range(6)]
    kw = dict(max_new_tokens=10, temperature=1.0, top_p=1.0)
    together = generate(model, tok, prompts, batch_size=6, seeds=seeds, progress=False, **kw)
    alone = [generate(model, tok, [p], batch_size=1, seeds=[s], progress=False, **kw)[0]
             for p, s in zip(prompts, seeds)]
    assert [r["text"] for r in together] == [r["text"] for r in alone]
    other = generate(model, tok, prompts, batch_size=6, seeds=[s + 1 for s in seeds], progress=False, **kw)
    assert [r["text"] for r in other] != [r["text"] for r in together]
    for r in together:
        assert r["finish"] in ("eos", "length")
        assert (r["finish"] == "length") == (r["tokens"] == 10)


def test_generate_records_finish_and_ignores_checkpoint_sampling_defaults(tiny_model, task_data, tmp_path):
    from transformers import GenerationConfig

    model_dir = tmp_path / "m"
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    # A checkpoint that ships sampling defaults (the reference code's HF path inherited them).
    model.generation_config = GenerationConfig(do_sample=True, top_k=1, temperature=0.01,
                                               eos_token_id=model.config.eos_token_id)
    model.save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(model_dir)
    cfg = _cfg(tiny_model, tmp_path)
    examples = load_examples(str(task_data["train"]), max_rows=8)
    generate_file(str(model_dir), examples, tmp_path / "a.jsonl", cfg, 0)
    generate_file(str(tiny_model), examples, tmp_path / "b.jsonl", cfg, 0)
    a, b = read_jsonl(tmp_path / "a.jsonl"), read_jsonl(tmp_path / "b.jsonl")
    assert [r["generated"] for r in a] == [r["generated"] for r in b]
    assert {r["finish"] for r in a} <= {"eos", "length"}
    assert all(set(r) >= {"id", "prompt", "real", "generated", "finish", "generated_tokens", "iteration"} for r in a)
    assert json.dumps(a[0]["prompt"]) == json.dumps(examples[0].prompt)


def test_length_batches_respect_row_and_token_budgets():
    from spinlm.generation.local import length_batches

    lengths = [5, 40, 12, 12, 33, 7, 80, 1, 19, 25]
    batches = length_batches(lengths, max_new_tokens=20, batch_size=4, batch_tokens=150)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(lengths, reverse=True)  # longest first, order kept
    for b in batches:
        assert len(b) <= 4
        assert len(b) == 1 or len(b) * (max(lengths[i] for i in b) + 20) <= 150
    assert len(batches[0]) == 1 and len(batches[-1]) == 4  # long prompts get small batches


def test_schedule_epochs_stops_partway_down_a_longer_schedule(tiny_model, pairs, tmp_path):
    """train.schedule_epochs 3 with train.epochs 1 (the released SPIN scripts' 6-epoch schedule stopped
    early): one epoch of steps runs, each at the learning rate of a 3-epoch linear schedule with warm-up,
    computed here from the formula; without the key the same epoch decays to 0."""
    peak, warmup = 1e-3, 0.1
    runs = {}
    for name, extra in (("long", ["--train.schedule_epochs=3"]), ("plain", [])):
        cfg = _cfg(tiny_model, tmp_path / name, "--run.log_every=1", f"--train.warmup_ratio={warmup}", *extra)
        runs[name] = train(str(tiny_model), pairs, tmp_path / name / "model", cfg, 0)
    long, plain = runs["long"], runs["plain"]
    per_epoch = plain["steps"]
    assert per_epoch >= 4 and long["steps"] == per_epoch and long["schedule_steps"] == 3 * per_epoch

    def expected(step: int, horizon: int) -> float:  # transformers' linear schedule, written out
        w = int(warmup * horizon)
        return peak * (step / w if step < w else max(0.0, (horizon - step) / (horizon - w)))

    assert [r["lr"] for r in long["history"]] == pytest.approx([expected(s, 3 * per_epoch)
                                                               for s in range(1, per_epoch + 1)])
    assert long["history"][-1]["lr"] == pytest.approx(peak * (2 * per_epoch) / (3 * per_epoch - int(0.3 * per_epoch)))
    assert plain["history"][-1]["lr"] == 0.0 and plain["schedule_steps"] == per_epoch
    # the first steps differ only by the schedule: the warm-up of the longer one is longer
    assert long["history"][0]["lr"] < plain["history"][0]["lr"]


def test_schedule_shorter_than_training_is_refused():
    from spinlm.errors import UserError

    cfg = config.build(None, ["--model.name_or_path=m", "--data.train=d.jsonl", "--train.epochs=2",
                              "--train.schedule_epochs=1"])
    with pytest.raises(UserError, match="train.schedule_epochs must be at least train.epochs"):
        config.validate(cfg)
