"""Real chat formats: responses end the way the template ends an assistant turn, in every stage.

For each family of tests/chat_formats.py (Zephyr, ChatML with a separate EOS, Llama-3, Gemma, Mistral,
Mistral v0.3) a tiny Llama is trained by `spinlm run` (SFT, then one SPIN iteration) while every forward
of every stage is recorded. The expected token ids are computed here from the template itself: the prompt
is the template's rendering with the assistant turn opened, a real response is the template's rendering
of the whole conversation minus the prompt, up to and including the turn-end token (nothing after
it, e.g. ChatML's newline), and a generated response is the ids that were sampled. Mistral v0.3 folds a
system message into the last user turn only while it ends the conversation: there a real response is
the prompt's rendering followed by the assistant turn as that template writes it (` reply</s>`).
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import spinlm.generation.local
import spinlm.generation.server
import spinlm.modeling
import spinlm.stages.evaluate
import spinlm.stages.score
import spinlm.training.steps
from spinlm.cli import main
from spinlm.demo.build import build_model
from spinlm.demo.task import make_splits
from spinlm.errors import UserError
from spinlm.io import read_jsonl
from spinlm.tokens import Encoding, Limits, encode_pair, encode_prompt, encode_response, stop_ids, turn_end_ids

from chat_formats import FAMILIES, build_family_tokenizer

SYSTEM = "You are a careful calculator. Answer in one sentence."
# (family, whether prompts carry a system message): every family without, those with a system role with one
CASES = [(name, False) for name in sorted(FAMILIES)] + [(name, True) for name in sorted(FAMILIES)
                                                        if FAMILIES[name].system]
SLOW_CASES = [(name, False) for name in sorted(FAMILIES)] + [("mistral_v3", True)]


@pytest.fixture(scope="module")
def splits():
    return make_splits(seed=0, n_train=40, n_val=8, n_test=8)


def _family_model(name, splits, tmp_path):
    texts = [x for r in splits["train"] for x in (r["prompt"], r["response"])]
    tok = build_family_tokenizer(FAMILIES[name], texts, tmp_path / "model")
    build_model(tok, tmp_path / "model", hidden_size=64, num_layers=2, num_heads=2, max_position_embeddings=256)
    return tok, tmp_path / "model"


def _messages(prompt: str, system: bool) -> list[dict]:
    return ([{"role": "system", "content": SYSTEM}] if system else []) + [{"role": "user", "content": prompt}]


def _bos(tok, family, ids):
    """The BOS rule for a family, written out: one BOS first where the template writes it (Llama-3, Gemma,
    Mistral) or where only the tokenizer adds it (Zephyr: the <s> its SFT saw), none for ChatML."""
    if family.template_bos:
        assert ids[0] == tok.bos_token_id  # the template's own BOS, taken as it is
        return ids
    return [tok.bos_token_id] + ids if family.adds_bos else ids


def _template_ids(tok, family, prompt, response=None):
    """What the template renders: the prompt (assistant turn opened), or prompt + response cut after the turn end
    (for a family with a fixed `reply` form: the rendered prompt, then the reply in that form), BOS as `_bos`."""
    head = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    if response is None:
        return _bos(tok, family, tok(head, add_special_tokens=False)["input_ids"])
    if family.reply:
        text = head + family.reply.replace("{content}", response.strip())
    else:
        text = tok.apply_chat_template(prompt + [{"role": "assistant", "content": response}], tokenize=False)
    ids = _bos(tok, family, tok(text, add_special_tokens=False)["input_ids"])
    prompt_len = len(_template_ids(tok, family, prompt))
    end = ids.index(tok.convert_tokens_to_ids(family.turn_end), prompt_len)
    return ids[: end + 1]


def _one_bos(tok, family, ids):
    """ids start with exactly one BOS where the family's tokenizer adds one or its template writes one."""
    bos = tok.bos_token_id
    if family.adds_bos or family.template_bos:
        assert ids[0] == bos and ids[1] != bos, tok.convert_ids_to_tokens(ids[:3])
    else:
        assert bos is None or ids[0] != bos


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_a_prompt_starts_with_one_bos_as_the_tokenizer_and_template_say(name, splits, tmp_path):
    """Zephyr's template writes no BOS and its tokenizer adds <s> (as zephyr-7b-sft-full was trained): the prompt
    gets one; Llama-3's, Gemma's and Mistral's templates write theirs and the tokenizer would add another: one;
    ChatML has none. Also where the prompt is cut to max_prompt_length, and on the server's text path."""
    family = FAMILIES[name]
    tok, _ = _family_model(name, splits, tmp_path)
    assert (tok("x")["input_ids"][0] == tok.bos_token_id) == family.adds_bos  # like the real tokenizer
    prompt = _messages(splits["train"][0]["prompt"], False)
    ids = encode_prompt(tok, prompt)
    _one_bos(tok, family, ids)
    assert ids == _template_ids(tok, family, prompt)
    cut = encode_prompt(tok, prompt, 6)  # the BOS stays in front of the prompt's last tokens
    assert len(cut) == 6 and cut[-5:] == ids[-5:]
    _one_bos(tok, family, cut)
    # a server that takes only text prompts tokenizes them with the tokenizer's defaults (vLLM's /v1/completions,
    # transformers serve): what it gets must give these ids back
    text = spinlm.generation.server._prompt(tok, ids, as_text=True)
    assert tok(text)["input_ids"] == ids


@pytest.mark.parametrize("name,system", CASES)
def test_turn_end_and_stop_tokens(name, system, splits, tmp_path):
    family = FAMILIES[name]
    tok, _ = _family_model(name, splits, tmp_path)
    turn_end = tok.convert_tokens_to_ids(family.turn_end)
    assert turn_end_ids(tok) == [turn_end]
    assert set(stop_ids(tok)) == {turn_end, tok.eos_token_id}
    counts = Encoding()
    for r in splits["train"][:10]:
        prompt = _messages(r["prompt"], system)
        if family.reply and not system:  # the fixed reply form is what the template renders after the prompt
            full = tok.apply_chat_template(prompt + [{"role": "assistant", "content": r["response"]}], tokenize=False)
            head = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            assert full == head + family.reply.replace("{content}", r["response"].strip())
        row = {"prompt": prompt, "real": r["response"], "generated": "The answer is 1", "finish": "length"}
        p, real, cut = encode_pair(tok, row, Limits(128, 256), counts)
        assert p == _template_ids(tok, family, prompt)
        _one_bos(tok, family, p)
        assert real[-1] == turn_end and turn_end not in cut  # a generation that hit the limit has no turn end
        if family.sentencepiece:  # merges cross the boundary: the response text is tokenized on its own (as TRL
            # does), which may add the tokenizer's dummy-prefix space at its start
            full = tok.apply_chat_template(prompt + [{"role": "assistant", "content": r["response"]}], tokenize=False)
            suffix = full[len(tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)):]
            assert tok.decode(real).lstrip() == suffix.lstrip()
        else:
            assert p + real == _template_ids(tok, family, prompt, r["response"])
    assert (counts.fallback > 0) == family.sentencepiece and counts.template + counts.fallback == 20


def test_dpo_pairs_and_judge_answers_start_with_the_prompts_bos(splits, tmp_path, monkeypatch):
    """The stages `spinlm run` does not cover: a DPO pair is scored, and a judge's (multi-turn) answer generated,
    from Zephyr prompts with the one <s> the tokenizer adds (every forward of the model recorded)."""
    import spinlm.dpo
    import spinlm.eval.judge
    from spinlm import config
    from spinlm.data import Example

    family = FAMILIES["zephyr"]
    tok, model = _family_model("zephyr", splits, tmp_path)
    seen, load_model = [], spinlm.modeling.load_model

    def instrumented(*args, **kwargs):
        m = load_model(*args, **kwargs)

        def hook(module, a, kw):
            ids, mask = kw["input_ids"], kw.get("attention_mask")
            if mask is None and ids.shape[1] > 1:  # generate drops the all-ones mask of a batch of one
                mask = torch.ones_like(ids)
            if mask is not None and ids.shape == mask.shape:  # whole sequences, not a cached decoding step
                seen.extend([t for t, keep in zip(r, k) if keep] for r, k in zip(ids.tolist(), mask.tolist()))
        m.register_forward_pre_hook(hook, with_kwargs=True)
        return m
    monkeypatch.setattr(spinlm.modeling, "load_model", instrumented)  # score's and the judge's loads
    cfg = config.build(None, [f"--model.name_or_path={model}", "--run.progress=false", "--packing.enabled=false",
                              "--generation.max_new_tokens=3", "--data.max_prompt_length=64", "--data.max_length=128"])
    rows = splits["train"][:3]
    examples = [Example(_messages(r["prompt"], False), r["response"], str(i), f"pairs.jsonl:{i + 1}",
                        rejected="The answer is 1") for i, r in enumerate(rows)]
    spinlm.dpo.scored_pairs(str(model), examples, tmp_path / "pairs.jsonl", cfg, "score")
    prompts = [_template_ids(tok, family, ex.prompt) for ex in examples]
    # each pair's real and rejected response, after its prompt's ids
    assert sorted(next((i for i, p in enumerate(prompts) if s[:len(p)] == p), -1) for s in seen) == [0, 0, 1, 1, 2, 2]
    seen.clear()
    questions = [spinlm.eval.judge.Question("q1", "math", [rows[0]["prompt"], rows[1]["prompt"]], None)]
    plan = spinlm.eval.judge.quick_plan(cfg, questions, str(model), sample=False)
    answers = spinlm.eval.judge.answer(str(model), questions, cfg, tmp_path / "judge", "m", plan)
    second = [{"role": "user", "content": rows[0]["prompt"]}, {"role": "assistant", "content": answers[0][0]},
              {"role": "user", "content": rows[1]["prompt"]}]
    assert seen == [_template_ids(tok, family, _messages(rows[0]["prompt"], False)), _template_ids(tok, family, second)]
    for ids in seen:
        _one_bos(tok, family, ids)


def test_resuming_a_run_started_by_the_older_encoding_warns(tmp_path, caplog):
    """A run started before prompts got their BOS (its run_info.json has no `encoding`) is resumed with a
    warning: its finished stages keep the old token ids. A run of this encoding resumes quietly."""
    import logging

    from spinlm import config
    from spinlm.io import read_json, write_json
    from spinlm.rundir import open_run, release_lock
    from spinlm.tokens import ENCODING

    cfg = config.build(None, [f"--run.dir={tmp_path / 'run'}", "--run.progress=false"])
    for info, warned in (({"spinlm": "old"}, True), (None, False)):
        run = open_run(cfg, force=False)
        release_lock(run / ".lock")
        assert read_json(run / "run_info.json")["encoding"] == ENCODING
        if info is not None:
            write_json(run / "run_info.json", info)  # as an earlier spinlm wrote it
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="spinlm"):
            release_lock(open_run(cfg, force=False) / ".lock")
        assert ("encoded prompts differently (encoding 1, now 2" in caplog.text) == warned, caplog.text


def _config(model, data, run_dir, system=False):
    limits = {"max_prompt_length": 96, "max_length": 160} if system else {"max_prompt_length": 64, "max_length": 128}
    return {
        "run": {"dir": str(run_dir), "progress": False, "seed": 3},
        "model": {"name_or_path": str(model)},
        "data": {"train": str(data["train"]), "val": str(data["val"]), "eval": str(data["test"]),
                 **limits},  # the system message's tokens are not cut from a prompt
        "sft": {"enabled": True, "learning_rate": 3e-3, "epochs": 25, "batch_size": 8},
        "generation": {"max_new_tokens": 16, "batch_size": 16},
        "spin": {"iterations": 1, "beta": 0.1},
        "train": {"learning_rate": 1e-4, "epochs": 1, "batch_size": 4},
        "packing": {"enabled": False},  # plain sequences: every recorded forward row is one (prompt, response)
        "eval": {"checker": "spinlm.demo.task:check_example", "batch_size": 8},
    }


def test_mistral_v3_system_prompt_is_in_the_prompt_and_not_the_response(splits, tmp_path):
    family = FAMILIES["mistral_v3"]
    tok, _ = _family_model("mistral_v3", splits, tmp_path)
    r = splits["train"][0]
    prompt, real = encode_pair(tok, {"prompt": _messages(r["prompt"], True), "real": r["response"],
                                     "generated": "x", "finish": "eos"}, Limits(64, 128))[:2]
    # as Mistral's own inference renders it: the system text inside the last [INST], then the reply
    text = f"<s>[INST] {SYSTEM}\n\n{r['prompt']}[/INST] {r['response']}</s>"
    assert prompt + real == tok(text, add_special_tokens=False)["input_ids"]
    assert SYSTEM not in tok.decode(real) and tok.decode(real).strip() == r["response"] + family.eos
    # the reply's tokens are the same with and without the system message
    bare = encode_pair(tok, {"prompt": _messages(r["prompt"], False), "real": r["response"], "generated": "x",
                             "finish": "eos"}, Limits(64, 128))
    assert bare[1] == real and len(prompt) > len(bare[0])


def test_a_template_that_cannot_be_split_is_an_error(splits, tmp_path):
    tok, _ = _family_model("chatml", splits, tmp_path)
    # the generation prompt opens a turn the conversation never writes: no prefix, with or without a system message
    tok.chat_template = (FAMILIES["chatml"].template.replace("'<|im_start|>assistant\n'", "'<|im_start|>bot\n'"))
    for system in (False, True):
        with pytest.raises(UserError, match="model.chat_template: .* does not start with the prompt"):
            encode_response(tok, _messages("Compute 1 + 1.", system), "2")


@pytest.mark.slow
@pytest.mark.parametrize("name,system", SLOW_CASES)
def test_every_stage_sees_the_templates_tokens(name, system, splits, tmp_path, monkeypatch):
    family = FAMILIES[name]
    tok, model = _family_model(name, splits, tmp_path)
    turn_end = tok.convert_tokens_to_ids(family.turn_end)
    data = {}
    for split, rows in splits.items():
        data[split] = tmp_path / f"{split}.jsonl"
        if system:  # conversations whose prompt starts with a system message (UltraChat-style `messages`)
            rows = [{"messages": _messages(r["prompt"], True) + [{"role": "assistant", "content": r["response"]}],
                     "answer": r["answer"]} for r in rows]
        data[split].write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen: dict[str, set] = {}

    def instrumented(stage):
        def load(*args, **kwargs):
            m = spinlm.modeling.load_model(*args, **kwargs)

            def hook(module, a, kw):
                ids, mask = kw["input_ids"], kw.get("attention_mask")
                if mask is not None and ids.shape == mask.shape:  # whole sequences, not a cached decoding step
                    seen.setdefault(stage, set()).update(
                        tuple(t for t, keep in zip(r, k) if keep) for r, k in zip(ids.tolist(), mask.tolist()))
            m.register_forward_pre_hook(hook, with_kwargs=True)
            return m
        return load

    for module, stage in ((spinlm.generation.local, "generate"), (spinlm.training.steps, "train")):
        monkeypatch.setattr(module, "load_model", instrumented(stage))
    # their model: inference_model
    for module, stage in ((spinlm.stages.score, "score"), (spinlm.stages.evaluate, "evaluate")):
        monkeypatch.setattr(module, "inference_model",
                            lambda path, cfg, stage=stage: (instrumented(stage)(path, cfg.model).eval(), None))
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(_config(model, data, tmp_path / "run", system)))
    assert main(["run", str(cfg_path)]) == 0
    for stage, rows in seen.items():  # every forward of every stage: the prompt's one BOS first (ChatML: none)
        for r in rows:
            _one_bos(tok, family, list(r))

    def msgs(r):
        return _messages(r["prompt"], system)

    prompts = {s: {tuple(_template_ids(tok, family, msgs(r))) for r in rows} for s, rows in splits.items()}
    reals = {s: {tuple(_template_ids(tok, family, msgs(r), r["response"])) for r in rows} for s, rows in splits.items()}
    gens = read_jsonl(tmp_path / "run" / "iteration-0" / "generations.jsonl")
    eval_gens = read_jsonl(tmp_path / "run" / "iteration-0" / "eval-generations.jsonl")
    # generation stops on the template's turn end, and the sampled ids are kept with it
    stopped = [g for g in gens if g["finish"] == "eos"]
    assert len(stopped) >= len(gens) // 2, "SFT taught the model to end its turn"
    for g in gens:
        assert (g["generated_ids"][-1] in stop_ids(tok)) == (g["finish"] == "eos")
        body = g["generated_ids"][:-1] if g["finish"] == "eos" else g["generated_ids"]
        assert tok.decode(body, skip_special_tokens=True) == g["generated"] and len(body) == g["generated_tokens"]
    assert any(g["generated_ids"][-1] == turn_end for g in stopped)
    prompt_of = {g["id"]: tuple(_template_ids(tok, family, g["prompt"])) for g in gens + eval_gens}
    sampled = {prompt_of[g["id"]] + tuple(g["generated_ids"]) for g in gens if g["generated"].strip()}
    eval_sampled = {prompt_of[g["id"]] + tuple(g["generated_ids"]) for g in eval_gens if g["generated"].strip()}

    # a pair whose generated response is empty is reported, not scored or trained on
    scored = [g for g in gens + eval_gens if g["generated"].strip()]
    if family.sentencepiece:  # the boundary is tokenized apart: the sampled ids are scored as sampled, and a real
        # response is the prompt's template ids, then ids that spell the template's text of the response
        def suffix(g):
            head = tok.apply_chat_template(g["prompt"], tokenize=False, add_generation_prompt=True)
            return tok.apply_chat_template(g["prompt"] + [{"role": "assistant", "content": g["real"]}],
                                           tokenize=False)[len(head):]
        assert sampled | eval_sampled <= seen["score"]
        want = {(prompt_of[g["id"]], suffix(g).lstrip()) for g in scored}
        spelled = {r: (r[: len(p)], tok.decode(list(r[len(p):])).lstrip()) for r in seen["score"]
                   for p in {prompt_of[g["id"]] for g in scored} if r[: len(p)] == p}
        assert want <= set(spelled.values())
        assert all(r in sampled | eval_sampled or spelled.get(r) in want for r in seen["score"])
        return
    assert seen["generate"] == prompts["train"] | prompts["test"]
    real_ids = {tuple(_template_ids(tok, family, g["prompt"], g["real"])) for g in scored}
    assert real_ids <= reals["train"] | reals["test"]
    assert seen["score"] == real_ids | sampled | eval_sampled
    # SFT on the real responses, its checks on validation, then SPIN on real and sampled responses
    assert seen["train"] == reals["train"] | reals["val"] | sampled
    # held-out NLL (real responses), greedy prefill (prompts), reward metrics (held-out pairs)
    assert seen["evaluate"] == reals["test"] | prompts["test"] | reals["val"] | prompts["val"] | eval_sampled
