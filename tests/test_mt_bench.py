"""`spinlm judge --judge-prompts`: MT-Bench as FastChat's llm_judge runs it, against a real loopback judge
server (scripted by the test) grading the answers of the real tiny model.

The question, judge-prompt and reference files are written here in FastChat's formats with this test's
own wording (no FastChat text); what is asserted is the protocol: which prompt judges which turn, how
it is filled, the judge's temperature and budget, the answers' temperatures and budget, the parsing and
FastChat's sums."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import torch

from spinlm.cli import main
from spinlm.config import Config
from spinlm.eval.mt_bench import game_outcome, parse_rating, parse_winner
from spinlm.io import read_json, read_jsonl

from conftest import scripted_server

MAX_NEW = 8
ARGS = ["--run.progress=false", "--eval.batch_size=1", f"--judge.max_new_tokens={MAX_NEW}", "--retries=1"]

QUESTIONS = [
    {"question_id": 1, "category": "writing", "turns": ["Write a line about rain.", "Now make it rhyme."]},
    {"question_id": 2, "category": "math", "turns": ["What is 3 times 4?", "And plus 5?"], "reference": ["12", "17"]},
    {"question_id": 3, "category": "reasoning", "turns": ["Is a bat a bird?"]},  # reference from the file
    {"question_id": 4, "category": "trivia", "turns": ["Name a river.", "Another one.", "A third."]},
]
REFERENCES = [{"question_id": 3, "model_id": "ref", "choices": [{"index": 0, "turns": ["No, it is a mammal."]}]}]

# name -> (type, system prompt, template): this test's own wording, FastChat's names and fields
PROMPTS = {
    "single-v1": ("single", "SYS plain", "[S1] Q: {question}\nA: {answer}\nRate it as [[rating]]."),
    "single-math-v1": ("single", "SYS ref", "[S1M] Q: {question}\nRef: {ref_answer_1}\nA: {answer}"),
    "single-v1-multi-turn": ("single", "SYS mt", "[S2] Q1: {question_1}\nA1: {answer_1}\nQ2: {question_2}\n"
                             "A2: {answer_2}"),
    "single-math-v1-multi-turn": ("single", "SYS mt ref", "[S2M] Q1: {question_1}\nR1: {ref_answer_1}\n"
                                  "A1: {answer_1}\nQ2: {question_2}\nR2: {ref_answer_2}\nA2: {answer_2}"),
    "pair-v2": ("pairwise", "", "[P1] Q: {question}\n<A>{answer_a}</A>\n<B>{answer_b}</B>"),
    "pair-math-v1": ("pairwise", "SYS pair ref", "[P1M] Q: {question}\nRef: {ref_answer_1}\n<A>{answer_a}</A>\n"
                     "<B>{answer_b}</B>"),
    "pair-v2-multi-turn": ("pairwise", "SYS pair mt", "[P2] {question_1} | {question_2}\n"
                           "<A>{answer_a_1} | {answer_a_2}</A>\n<B>{answer_b_1} | {answer_b_2}</B>"),
    "pair-math-v1-multi-turn": ("pairwise", "SYS pair mt ref", "[P2M] {question_1} | {question_2} "
                                "({ref_answer_1} | {ref_answer_2})\n<A>{answer_a_1} | {answer_a_2}</A>\n"
                                "<B>{answer_b_1} | {answer_b_2}</B>"),
}


def _files(tmp_path, prompts=PROMPTS, questions=QUESTIONS):
    def jsonl(name, rows):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return tmp_path / name

    rows = [{"name": n, "type": t, "system_prompt": s, "prompt_template": p, "description": "test prompt",
             "category": "math" if "math" in n else "general",
             "output_format": "[[rating]]" if t == "single" else "[[A]]"} for n, (t, s, p) in prompts.items()]
    return jsonl("question.jsonl", questions), jsonl("judge_prompts.jsonl", rows), jsonl("ref.jsonl", REFERENCES)


def _argv(model, files, url, out, *extra):
    questions, prompts, refs = files
    return ["judge", "--model", str(model), "--questions", str(questions), "--judge-prompts", str(prompts),
            "--reference-answers", str(refs), "--judge-url", url + "/v1", "--judge-model", "judge-1",
            "--out", str(out), *ARGS, *extra]


def _reply(text: str):
    return 200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                              "finish_reason": "stop"}]}


def _greedy(model_dir, turns: list[str], answers: list[str]) -> str:
    """The last turn's greedy answer, by transformers' own generate on the rendered conversation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spinlm.tokens import encode_prompt, stop_ids

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    messages = []
    for q, a in zip(turns, answers):
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    messages.append({"role": "user", "content": turns[len(answers)]})
    ids = torch.tensor([encode_prompt(tok, messages)])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=MAX_NEW,
                         eos_token_id=stop_ids(tok, model.generation_config), pad_token_id=tok.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    stops = set(stop_ids(tok, model.generation_config))
    new = new[:next((k for k, t in enumerate(new) if t in stops), len(new))]
    return tok.decode(new, skip_special_tokens=True).strip()


def test_parsing_follows_fastchat():
    assert parse_rating("first [[3]] then [[9]]") == 3  # the first, not the last
    assert parse_rating("Rating: [7]") == 7 and parse_rating("[[8.5]]") == 8.5
    assert parse_rating("fine, 7/10") == -1 and parse_rating("") == -1
    assert parse_winner("[[B]] ... on reflection [[A]]", "[[A]]") == "A"  # [[A]] is looked for first
    assert parse_winner("[[C]]", "[[A]]") == "tie" and parse_winner("A is better", "[[A]]") == "error"
    assert parse_winner("[[8, 8.05]]", "[[rating_a,rating_b]]") == "tie"
    assert parse_winner("[9,3]", "[[rating_a,rating_b]]") == "A" and parse_winner("[[2,5]]", "[[rating_a,rating_b]]") \
        == "B"
    assert game_outcome("model_1", "model_1") == "model_1" and game_outcome("model_1", "model_2") == "tie"
    assert game_outcome("tie", "model_1") == "tie" and game_outcome("model_2", "error") is None


def test_defaults_are_fastchats():
    j = Config().judge
    assert j.max_new_tokens == 1024 and j.default_temperature == 0.7 and j.top_k == 50
    assert j.temperatures == {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
                              "reasoning": 0.0, "stem": 0.1, "humanities": 0.1, "arena-hard-200": 0.0}
    assert j.reference_categories == ["math", "reasoning", "coding", "arena-hard-200"]


def _single_judge(n, headers, body):
    content = body["messages"][-1]["content"]
    tag = re.match(r"\[(\w+)\]", content).group(1)
    if tag == "S2M":
        return _reply("I would rather not say.")  # no rating: -1
    if tag == "S2":
        return _reply("Early [[3]], later [[9]].")
    if tag == "S1M":
        return _reply("Rating: [7]" if "3 times 4" in content else "[[10]]")
    return _reply("Good. [[8]]" if "rain" in content else "[[6.5]]")


def test_single_grading_protocol(other_model, tmp_path, capsys):
    files = _files(tmp_path)
    with scripted_server(_single_judge) as (url, state):  # (the unperturbed tiny model's greedy answers are empty)
        code = main(_argv(other_model, files, url, tmp_path / "out"))
    out = capsys.readouterr()
    assert code == 0, out.err
    answers = {r["question_id"]: r for r in read_jsonl(tmp_path / "out" / "answers-a.jsonl")}

    # the answers: each category's temperature, the configured budget, every turn, turn 2 after turn 1's answer
    assert {q: r["temperature"] for q, r in answers.items()} == {"1": 0.7, "2": None, "3": None, "4": 0.7}
    assert all(r["max_new_tokens"] == MAX_NEW and len(r["answers"]) == len(r["turns"]) for r in answers.values())
    for qid in ("2", "3"):  # temperature 0: greedy, turn by turn with the earlier answers in the context
        q = answers[qid]
        for k in range(len(q["turns"])):
            assert q["answers"][k] and q["answers"][k] == _greedy(other_model, q["turns"], q["answers"][:k]), (qid, k)
    sampled = [answers[q]["answers"][0] != _greedy(other_model, answers[q]["turns"], []) for q in ("1", "4")]
    assert any(sampled)  # 0.7 is sampled, not greedy (the tiny model's next-token distribution is broad)
    assert answers["1"]["choices"] == [{"index": 0, "turns": answers["1"]["answers"]}]  # FastChat's answer format

    # the judge requests: temperature 0, FastChat's budget, the right prompt filled, references for math/reasoning
    bodies = [b for _, _, b in state["requests"]]
    assert len(bodies) == 6  # q1 t1+t2, q2 t1+t2, q3 t1, q4 t1 (three turns: only turn 1 is judged)
    assert all(b["temperature"] == 0 and b["max_tokens"] == 2048 and b["model"] == "judge-1" for b in bodies)
    a = {q: r["answers"] for q, r in answers.items()}
    expected = [
        ("SYS plain", PROMPTS["single-v1"][2].format(question="Write a line about rain.", answer=a["1"][0])),
        ("SYS mt", PROMPTS["single-v1-multi-turn"][2].format(
            question_1="Write a line about rain.", answer_1=a["1"][0], question_2="Now make it rhyme.",
            answer_2=a["1"][1])),
        ("SYS ref", PROMPTS["single-math-v1"][2].format(question="What is 3 times 4?", ref_answer_1="12",
                                                        answer=a["2"][0])),
        ("SYS mt ref", PROMPTS["single-math-v1-multi-turn"][2].format(
            question_1="What is 3 times 4?", ref_answer_1="12", answer_1=a["2"][0], question_2="And plus 5?",
            ref_answer_2="17", answer_2=a["2"][1])),
        ("SYS ref", PROMPTS["single-math-v1"][2].format(question="Is a bat a bird?",
                                                        ref_answer_1="No, it is a mammal.", answer=a["3"][0])),
        ("SYS plain", PROMPTS["single-v1"][2].format(question="Name a river.", answer=a["4"][0])),
    ]
    sent = sorted((b["messages"][0]["content"], b["messages"][1]["content"]) for b in bodies)
    assert all([m["role"] for m in b["messages"]] == ["system", "user"] for b in bodies)
    assert sent == sorted(expected)

    # the sums: -1 left out and counted, first [[N]] taken, backup [N] read
    s = read_json(tmp_path / "out" / "judge.json")
    assert s["protocol"] == "MT-Bench (FastChat llm_judge protocol)" and s["mode"] == "single"
    assert s["judgments"] == 6 and s["scored"] == 5 and s["unparsable"]["count"] == 1
    assert s["unparsable"]["examples"][0]["question_id"] == "2" and s["unparsable"]["examples"][0]["turn"] == 2
    assert s["overall"] == pytest.approx((8 + 3 + 7 + 10 + 6.5) / 5)
    assert s["per_turn"] == {"1": pytest.approx((8 + 7 + 10 + 6.5) / 4), "2": 3.0}
    assert s["per_category"] == {"math": 7.0, "reasoning": 10.0, "trivia": 6.5, "writing": 5.5}
    assert s["judge_temperature"] == 0 and s["answer_generation"]["max_new_tokens"] == MAX_NEW
    rows = read_jsonl(tmp_path / "out" / "judgments.jsonl")  # FastChat's model_judgment rows
    assert sorted(r["score"] for r in rows) == [-1, 3, 6.5, 7, 8, 10]
    assert {tuple(r["judge"]) for r in rows} == {("judge-1", n) for n in PROMPTS if n.startswith("single")}
    assert "MT-Bench (FastChat llm_judge protocol): average grade 6.90 over 5 turns" in out.out
    assert "not MT-Bench" not in out.out


def _block(content: str, who: str) -> str:
    return content.split(f"<{who}>")[1].split(f"</{who}>")[0]


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def test_pairwise_both_orders(tiny_model, other_model, tmp_path, capsys):
    files = _files(tmp_path)

    def position_blind(n, headers, body):  # prefers the smaller digest; cannot decide the math follow-ups
        content = body["messages"][-1]["content"]
        if content.startswith("[P2M]"):
            return _reply("Both have merits.")
        a, b = _digest(_block(content, "A")), _digest(_block(content, "B"))
        return _reply("[[A]]" if a < b else "[[B]]" if b < a else "[[C]]")

    with scripted_server(position_blind) as (url, state):
        assert main(_argv(tiny_model, files, url, tmp_path / "out", "--pairwise", "--model-b", str(other_model))) == 0
    bodies = [b for _, _, b in state["requests"]]
    assert len(bodies) == 2 * 6 and all(b["temperature"] == 0 and b["max_tokens"] == 2048 for b in bodies)
    # an empty system prompt sends no system message (FastChat's to_openai_api_messages)
    assert all(len(b["messages"]) == 1 for b in bodies if b["messages"][-1]["content"].startswith("[P1]"))
    assert all(b["messages"][0] == {"role": "system", "content": "SYS pair ref"} for b in bodies
               if b["messages"][-1]["content"].startswith("[P1M]"))
    a = {r["question_id"]: r["answers"] for r in read_jsonl(tmp_path / "out" / "answers-a.jsonl")}
    b = {r["question_id"]: r["answers"] for r in read_jsonl(tmp_path / "out" / "answers-b.jsonl")}
    assert a != b
    shown = sorted((_block(x["messages"][-1]["content"], "A"), _block(x["messages"][-1]["content"], "B"))
                   for x in bodies)
    games = [(q, t) for q in a for t in ((1, 2) if len(a[q]) == 2 else (1,))]
    both_orders = []
    for q, t in games:
        ans = (a[q][0], b[q][0]) if t == 1 else (f"{a[q][0]} | {a[q][1]}", f"{b[q][0]} | {b[q][1]}")
        both_orders += [ans, ans[::-1]]  # each comparison asked twice, A and B swapped
    assert shown == sorted(both_orders)

    s = read_json(tmp_path / "out" / "judge.json")
    assert s["protocol"] == "MT-Bench (FastChat llm_judge protocol)" and s["mode"] == "pairwise"
    assert s["comparisons"] == 6 and s["dropped"] == 1 and s["scored"] == 5 and s["unparsable"]["count"] == 2
    kept = [(q, t) for q, t in games if not (q == "2" and t == 2)]
    outcomes = []
    for q, t in kept:
        x, y = (a[q][0], b[q][0]) if t == 1 else (f"{a[q][0]} | {a[q][1]}", f"{b[q][0]} | {b[q][1]}")
        outcomes.append("a" if _digest(x) < _digest(y) else "b" if _digest(y) < _digest(x) else "tie")
    assert s["inconsistent_orders"] == 0
    assert s["win_rate"] == pytest.approx(outcomes.count("a") / 5)
    assert s["loss_rate"] == pytest.approx(outcomes.count("b") / 5)
    assert s["tie_rate"] == pytest.approx(outcomes.count("tie") / 5)
    assert s["win_rate_adjusted"] == pytest.approx((outcomes.count("a") + 0.5 * outcomes.count("tie")) / 5)
    rows = read_jsonl(tmp_path / "out" / "judgments.jsonl")
    assert {r["g1_winner"] for r in rows} <= {"model_1", "model_2", "tie", "error"}

    with scripted_server(lambda n, h, body: _reply("[[A]]")) as (url, state):  # pure position bias
        assert main(_argv(tiny_model, files, url, tmp_path / "biased", "--pairwise",
                          "--model-b", str(other_model))) == 0
    s = read_json(tmp_path / "biased" / "judge.json")
    assert s["tie_rate"] == 1.0 and s["inconsistent_orders"] == 6 and s["first_position_preferred"] == 1.0
    assert "MT-Bench (FastChat llm_judge protocol): A vs B: win 0.000, tie 1.000, loss 0.000" in capsys.readouterr().out


def test_user_errors(tiny_model, tmp_path, capsys):
    url = "http://127.0.0.1:9"
    no_math = {k: v for k, v in PROMPTS.items() if k != "single-math-v1"}
    files = _files(tmp_path, prompts=no_math)
    assert main(_argv(tiny_model, files, url, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "no prompt named single-math-v1" in err and "Traceback" not in err

    files = _files(tmp_path)
    questions, prompts, _ = files
    argv = ["judge", "--model", str(tiny_model), "--questions", str(questions), "--judge-prompts", str(prompts),
            "--judge-url", url, "--judge-model", "j", "--out", str(tmp_path / "out"), *ARGS]
    assert main(argv) == 2  # question 3 (reasoning) has no reference without the file
    assert "question 3 (reasoning) needs a reference answer" in capsys.readouterr().err

    bad_refs = tmp_path / "bad_ref.jsonl"
    bad_refs.write_text(json.dumps({"question_id": 3, "choices": "No."}) + "\n")
    assert main([*argv, "--reference-answers", str(bad_refs)]) == 2
    assert f"{bad_refs}, row 1, field 'choices'" in capsys.readouterr().err

    assert main([*argv, "--sample"]) == 2
    assert "MT-Bench samples each category" in capsys.readouterr().err
    assert main(_argv(tiny_model, files, url, tmp_path / "out", "--judge.temperatures={writing: -1}")) == 2
    assert "judge.temperatures: writing must be >= 0" in capsys.readouterr().err
    assert not (tmp_path / "out" / "answers-a.jsonl").exists()  # every check before any model is loaded
