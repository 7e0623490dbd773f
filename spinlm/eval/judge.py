"""Judged evaluation: a judge model grades a model's answers to multi-turn questions.

    spinlm judge --model MODEL --questions question.jsonl --judge-prompts judge_prompts.jsonl \
        --reference-answers gpt-4.jsonl --judge-url URL --judge-model NAME --out DIR      # MT-Bench
    spinlm judge --model MODEL --questions mt_bench.jsonl --judge-url URL --judge-model NAME --out DIR
    spinlm judge --model MODEL --pairwise --model-b OTHER --questions ... --judge-url ... --out DIR

Two protocols. With `--judge-prompts` (FastChat's judge_prompts.jsonl): MT-Bench as FastChat's
llm_judge runs it, spinlm.eval.mt_bench holds its rules and docs/evaluation.md the how-to. Without:
spinlm's quick judge, described below, whose outputs say "not MT-Bench": its own prompt wording,
greedy answers of eval.max_new_tokens, prompts cut at data.max_prompt_length. The answering, the
caching and the HTTP are shared.

1. Answers: the model answers turn 1 of every question, then turn 2 with the first exchange as
   context, and so on, generated here with spinlm's generate path and chat template (greedy;
   `--sample` uses generation.temperature / top_p / top_k with a seed per question and turn).
   Kept in `DIR/answers-{a,b}.log` (a RowLog: a re-run resumes) and `DIR/answers-{a,b}.jsonl`.
2. Judgments: each turn is sent to the judge, an OpenAI-compatible chat endpoint
   (`--judge-url`, `--judge-model`; the API key comes from the variable `--api-key-env` names and is
   never logged or written), with the versioned instructions of `spinlm.eval.judge_prompts`.
   `--concurrency` requests in flight, retries with backoff on connection errors, 429 and 5xx,
   `--timeout-s` per request: the openai client does the HTTP (`pip install 'spinlm[server]'`),
   through spinlm.generation.client. Every reply is appended to `DIR/judgments.log` as it arrives, keyed by
   the exact request, so a re-run asks only what is missing.
3. Scores: single mode parses a grade `[[N]]` (1-10, the last one in the reply); pairwise mode
   asks each comparison in both orders (A/B swapped) to cancel position bias and parses `[[A]]`,
   `[[B]]` or `[[C]]` (tie). A reply without a parsable verdict is counted and listed, never
   scored. Pairwise: a comparison whose two orders disagree counts as a tie (MT-Bench's rule).
   `DIR/judge.json` holds the averages per category and turn and overall (single), or the
   win / tie / loss rates of model A against model B (pairwise), with the template version.

Questions (both protocols): MT-Bench's JSON lines (`question_id`, `category`, `turns`: a list of strings, optional
`reference`: a list of strings, one per turn), from a local file or a Hub dataset id.
"""

from __future__ import annotations

import logging
import re
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from spinlm.config import Config
from spinlm.data import _open_source
from spinlm.errors import UserError, where
from spinlm.eval import judge_prompts as prompts
from spinlm.eval import mt_bench
from spinlm.generation.client import api_key, base_url, chat, endpoint, require_openai
from spinlm.io import RowLog, fingerprint, write_json, write_jsonl
from spinlm.progress import bar as progress_bar
from spinlm.tokens import ENCODING

log = logging.getLogger("spinlm")

CACHE_FORMAT = "spinlm-judge-cache-1"  # the judgments log: keys are digests of the requests
_GRADE = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")
_VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]")


@dataclass
class Question:
    id: str
    category: str
    turns: list[str]
    reference: list[str] | None  # per turn, where given


@dataclass
class Judge:
    """Where and how to ask the judge."""

    url: str
    model: str
    api_key_env: str | None = None
    concurrency: int = 8
    timeout_s: float = 120.0
    retries: int = 4
    max_tokens: int = 1024


# ---------------------------------------------------------------- questions


def load_questions(source: str, split: str = "train", max_rows: int | None = None) -> list[Question]:
    """MT-Bench-format questions from a JSONL/JSON/parquet file or a Hub dataset id."""
    name, rows, _ = _open_source(source, split)
    questions, seen = [], set()
    for file, row_no, row in rows:
        q = _question(row, file, row_no)
        if q.id in seen:
            raise UserError(f"{where(file, row_no, 'question_id')}: {q.id!r} repeats an earlier question's id")
        seen.add(q.id)
        questions.append(q)
        if max_rows and len(questions) >= max_rows:
            break
    if not questions:
        raise UserError(f"{name}: no questions (the file or split is empty)")
    return questions


def _question(row, name: str, row_no: int) -> Question:
    def bad(fld, msg):
        return UserError(f"{where(name, row_no, fld)}: {msg}")

    if not isinstance(row, dict):
        raise bad(None, "expected an object with question_id, category and turns")
    qid = row.get("question_id")
    if qid is None or isinstance(qid, bool) or not isinstance(qid, (str, int)):
        raise bad("question_id", f"expected a string or integer id, got {qid!r}")
    turns = row.get("turns")
    if not (isinstance(turns, list) and turns and all(isinstance(t, str) and t.strip() for t in turns)):
        raise bad("turns", "expected a non-empty list of non-empty strings (the user's turns)")
    category = row.get("category", "general")
    if not isinstance(category, str) or not category.strip():
        raise bad("category", f"expected a non-empty string, got {category!r}")
    reference = row.get("reference")
    if reference is not None and not (isinstance(reference, list) and all(isinstance(r, str) for r in reference)):
        raise bad("reference", "expected a list of strings (one reference answer per turn)")
    return Question(str(qid), category, turns, reference or None)


# ---------------------------------------------------------------- answers


@dataclass
class AnswerPlan:
    """How the answers are generated: per question a temperature (None: greedy), and the lengths."""

    temperatures: list[float | None]  # one per question
    top_p: float
    top_k: int
    max_new_tokens: int
    max_prompt_length: int | None  # None: the prompt is never cut (MT-Bench)
    key: str  # the fingerprint of everything that shapes the answers: a change starts the answers afresh
    strip: bool = False  # gen_model_answer.py strips each answer (output.strip()) before the next turn sees it


def quick_plan(cfg: Config, questions: list[Question], model_path: str, sample: bool) -> AnswerPlan:
    """The quick judge's answers: greedy, or generation.* sampling with --sample; prompts cut at
    data.max_prompt_length."""
    max_new = cfg.eval.max_new_tokens or cfg.generation.max_new_tokens
    g = cfg.generation
    key = fingerprint("judge-answers", model_path, [(q.id, q.turns) for q in questions], max_new, sample,
                      g.temperature, g.top_p, g.top_k, cfg.run.seed, cfg.data.max_prompt_length,
                      cfg.model.dtype, cfg.model.chat_template, ENCODING)
    return AnswerPlan([g.temperature if sample else None] * len(questions), g.top_p, g.top_k, max_new,
                      cfg.data.max_prompt_length, key)


def mt_bench_plan(cfg: Config, questions: list[Question], model_path: str) -> AnswerPlan:
    """gen_model_answer.py get_model_answers: the category's temperature (greedy below 1e-4), judge.top_k
    (transformers 4.x's default there), judge.max_new_tokens (its --max-new-token, 1024), no prompt cut."""
    j = cfg.judge
    temps = [mt_bench.temperature(q.category, j.temperatures, j.default_temperature) for q in questions]
    key = fingerprint("mt-bench-answers", model_path, [(q.id, q.turns) for q in questions], temps, j.top_k,
                      j.max_new_tokens, cfg.run.seed, cfg.model.dtype, cfg.model.chat_template, ENCODING)
    return AnswerPlan(temps, 1.0, j.top_k, j.max_new_tokens, None, key, strip=True)


def answer(model_path: str, questions: list[Question], cfg: Config, out_dir: Path, label: str,
           plan: AnswerPlan) -> list[list[str]]:
    """The model's answers to every turn of every question (answers[q][k]), resumable per turn."""
    with RowLog(out_dir / f"answers-{label}.log", plan.key) as rowlog:
        model = tokenizer = None
        for k in range(max(len(q.turns) for q in questions)):
            todo = [i for i, q in enumerate(questions) if len(q.turns) > k and f"{k}:{i}" not in rowlog.done]
            if not todo:
                continue
            if model is None:
                model, tokenizer = _load(model_path, cfg)
            for temp in dict.fromkeys(plan.temperatures[i] for i in todo):  # one generate call per temperature
                group = [i for i in todo if plan.temperatures[i] == temp]
                texts = _generate_turn(model, tokenizer, questions, group, k, rowlog.done, cfg, plan, temp)
                rowlog.add([(f"{k}:{i}", r) for i, r in zip(group, texts)])
        answers = [[rowlog.done[f"{k}:{i}"]["text"] for k in range(len(q.turns))] for i, q in enumerate(questions)]
        finish = [[rowlog.done[f"{k}:{i}"]["finish"] for k in range(len(q.turns))] for i, q in enumerate(questions)]
    # `choices` is FastChat's answer format (common.py load_model_answers): the file reads in FastChat too
    write_jsonl(out_dir / f"answers-{label}.jsonl",
                [{"question_id": q.id, "category": q.category, "turns": q.turns, "answers": a, "finish": f,
                  "temperature": t, "max_new_tokens": plan.max_new_tokens, "model": str(model_path),
                  "model_id": str(model_path), "choices": [{"index": 0, "turns": a}]}
                 for q, a, f, t in zip(questions, answers, finish, plan.temperatures)])
    return answers


def _load(model_path: str, cfg: Config):
    from spinlm.modeling import load_model, load_tokenizer

    return load_model(model_path, cfg.model).eval(), load_tokenizer(model_path, cfg.model)


def _generate_turn(model, tokenizer, questions, todo, k, done, cfg, plan: AnswerPlan, temp) -> list[dict]:
    """Turn k's answers for the questions `todo`, each prompted with its earlier exchanges."""
    from spinlm.generation.local import generate, row_seed
    from spinlm.tokens import encode_prompt

    prompts_ = []
    for i in todo:
        messages = []
        for j in range(k):
            messages += [{"role": "user", "content": questions[i].turns[j]},
                         {"role": "assistant", "content": done[f"{j}:{i}"]["text"]}]
        messages.append({"role": "user", "content": questions[i].turns[k]})
        prompts_.append(encode_prompt(tokenizer, messages, plan.max_prompt_length))
    seeds = None if temp is None else [row_seed(cfg.run.seed, k, questions[i].id) for i in todo]
    results = generate(model, tokenizer, prompts_, max_new_tokens=plan.max_new_tokens, batch_size=cfg.eval.batch_size,
                       batch_tokens=cfg.generation.batch_tokens, seeds=seeds, temperature=temp or 1.0,
                       top_p=plan.top_p, top_k=plan.top_k, progress=cfg.run.progress, desc=f"answer turn {k + 1}")
    return [{"text": r["text"].strip() if plan.strip else r["text"], "finish": r["finish"]} for r in results]


# ---------------------------------------------------------------- asking the judge


def _job(judge: Judge, messages: list[dict], **meta) -> dict:
    key = fingerprint(judge.model, judge.max_tokens, messages)
    return {"key": key, "messages": messages, **meta}


def single_jobs(judge: Judge, questions: list[Question], answers: list[list[str]]) -> list[dict]:
    return [_job(judge, prompts.single_messages(q.turns[: k + 1], answers[i][: k + 1], _reference(q, k)),
                 question_id=q.id, category=q.category, turn=k + 1)
            for i, q in enumerate(questions) for k in range(len(q.turns))]


def pairwise_jobs(judge: Judge, questions: list[Question], answers_a: list[list[str]],
                  answers_b: list[list[str]]) -> list[dict]:
    """Every comparison twice: model a shown first ("ab"), then model b shown first ("ba")."""
    jobs = []
    for i, q in enumerate(questions):
        for k in range(len(q.turns)):
            a, b, ref = answers_a[i][: k + 1], answers_b[i][: k + 1], _reference(q, k)
            for order, (first, second) in (("ab", (a, b)), ("ba", (b, a))):
                jobs.append(_job(judge, prompts.pairwise_messages(q.turns[: k + 1], first, second, ref),
                                 question_id=q.id, category=q.category, turn=k + 1, order=order))
    return jobs


def _reference(q: Question, k: int) -> str | None:
    return q.reference[k] if q.reference and k < len(q.reference) and q.reference[k].strip() else None


def ask(judge: Judge, jobs: list[dict], cache_path: Path, progress: bool = True) -> dict[str, str]:
    """The judge's reply to every job, from the cache or asked now (concurrently, each reply
    appended to the cache as it arrives); key -> reply text."""
    ep = endpoint(base_url(judge.url), judge.model, judge.api_key_env, judge.timeout_s, judge.retries,
                  key_setting="--api-key-env", role="judge server", retries_setting="--retries")
    with RowLog(cache_path, CACHE_FORMAT) as cache:
        todo = list({j["key"]: j for j in jobs if j["key"] not in cache.done}.values())
        if len(todo) < len(jobs):
            log.info("judge: %d of %d judgments from the cache %s", len(jobs) - len(todo), len(jobs), cache_path)
        bar = progress_bar(len(todo), "judge", progress)
        pool = ThreadPoolExecutor(max_workers=judge.concurrency, thread_name_prefix="spinlm-judge")
        try:
            futures = {pool.submit(chat, ep, j["messages"], judge.max_tokens): j["key"] for j in todo}
            for future in as_completed(futures):
                cache.add([(futures[future], {"reply": future.result()})])
                bar.update(1)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)  # on an error, what finished is already cached
            bar.close()
        ep.client.close()  # not on an error: a request still in flight is abandoned, not cut off
        return {key: row["reply"] for key, row in cache.done.items()}


# ---------------------------------------------------------------- verdicts


def parse_grade(reply: str) -> float | None:
    """The last [[N]] of the reply with 1 <= N <= 10, else None."""
    found = _GRADE.findall(reply)
    value = float(found[-1]) if found else None
    return value if value is not None and 1 <= value <= 10 else None


def parse_verdict(reply: str) -> str | None:
    """'A', 'B' or 'C' (tie) from the last [[X]] of the reply, else None."""
    found = _VERDICT.findall(reply)
    return found[-1] if found else None


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _unparsable(rows: list[dict]) -> dict:
    bad = [r for r in rows if r["unparsable"]]
    return {"count": len(bad), "examples": [{k: r.get(k) for k in ("question_id", "turn", "order")} |
                                            {"reply": r["reply"][:300]} for r in bad[:20]]}


def summarize_single(jobs: list[dict], replies: dict[str, str]) -> tuple[dict, list[dict]]:
    rows = []
    for j in jobs:
        grade = parse_grade(replies[j["key"]])
        rows.append({"question_id": j["question_id"], "category": j["category"], "turn": j["turn"], "grade": grade,
                     "unparsable": grade is None, "reply": replies[j["key"]]})
    scored = [r for r in rows if r["grade"] is not None]
    summary = {"judgments": len(rows), "scored": len(scored), "unparsable": _unparsable(rows),
               "overall": _mean([r["grade"] for r in scored]),
               "per_category": {c: _mean([r["grade"] for r in scored if r["category"] == c])
                                for c in sorted({r["category"] for r in rows})},
               "per_turn": {str(t): _mean([r["grade"] for r in scored if r["turn"] == t])
                            for t in sorted({r["turn"] for r in rows})}}
    return summary, rows


def _winner(order: str, verdict: str | None) -> str | None:
    """A position verdict of one order -> 'a', 'b' or 'tie' (None: unparsable)."""
    if verdict is None:
        return None
    if verdict == "C":
        return "tie"
    first_is_a = order == "ab"
    return "a" if (verdict == "A") == first_is_a else "b"


def summarize_pairwise(jobs: list[dict], replies: dict[str, str]) -> tuple[dict, list[dict]]:
    rows = []
    for j in jobs:
        verdict = parse_verdict(replies[j["key"]])
        rows.append({"question_id": j["question_id"], "category": j["category"], "turn": j["turn"],
                     "order": j["order"], "verdict": verdict, "winner": _winner(j["order"], verdict),
                     "unparsable": verdict is None, "reply": replies[j["key"]]})
    games: dict[tuple, dict] = {}
    for r in rows:
        games.setdefault((r["question_id"], r["turn"]), {"category": r["category"]})[r["order"]] = r["winner"]
    outcomes, inconsistent = [], 0
    for g in games.values():
        if g["ab"] is None or g["ba"] is None:
            continue  # counted among the unparsable replies
        inconsistent += g["ab"] != g["ba"]
        outcomes.append((g["category"], g["ab"] if g["ab"] == g["ba"] else "tie"))
    parsed = [r for r in rows if r["verdict"] in ("A", "B")]
    summary = {"judgments": len(rows), "comparisons": len(games), "scored": len(outcomes),
               "unparsable": _unparsable(rows), "inconsistent_orders": inconsistent,
               **_rates([o for _, o in outcomes]),
               "per_category": {c: _rates([o for cat, o in outcomes if cat == c])
                                for c in sorted({c for c, _ in outcomes})},
               "first_position_preferred": _mean([float(r["verdict"] == "A") for r in parsed])}
    return summary, rows


def _rates(outcomes: list[str]) -> dict:
    n = len(outcomes)
    return {k: (sum(o == v for o in outcomes) / n if n else None)
            for k, v in (("win_rate", "a"), ("tie_rate", "tie"), ("loss_rate", "b"))}


# ---------------------------------------------------------------- the command


QUICK_LABEL = "spinlm quick judge (not MT-Bench)"
MT_BENCH_LABEL = "MT-Bench (FastChat llm_judge protocol)"


@dataclass
class MTBenchFiles:
    """FastChat's files, brought by the user: judge_prompts.jsonl and, optionally, reference answers."""

    judge_prompts: str
    reference_answers: str | None = None


def judge_run(cfg: Config, questions: list[Question], judge: Judge, out_dir: Path, model_b: str | None = None,
              sample: bool = False, mt: MTBenchFiles | None = None) -> dict:
    """Answer (one model, or two for pairwise), judge, write DIR/judge.json and DIR/judgments.jsonl.
    With `mt`: MT-Bench as FastChat runs it; without: spinlm's quick judge (not MT-Bench)."""
    require_openai("spinlm judge")  # a missing client or key fails before any model is loaded
    api_key(judge.api_key_env, "--api-key-env")
    if mt is not None:
        return _mt_bench_run(cfg, questions, judge, out_dir, model_b, mt)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_a = cfg.model.name_or_path
    answers_a = answer(model_a, questions, cfg, out_dir, "a", quick_plan(cfg, questions, model_a, sample))
    if model_b:
        answers_b = answer(model_b, questions, cfg, out_dir, "b", quick_plan(cfg, questions, model_b, sample))
        jobs = pairwise_jobs(judge, questions, answers_a, answers_b)
    else:
        jobs = single_jobs(judge, questions, answers_a)
    replies = ask(judge, jobs, out_dir / "judgments.log", cfg.run.progress)
    summary, rows = (summarize_pairwise if model_b else summarize_single)(jobs, replies)
    summary = {"protocol": QUICK_LABEL, "mode": "pairwise" if model_b else "single",
               "template_version": prompts.TEMPLATE_VERSION,
               "judge_model": judge.model, "judge_url": judge.url, "model_a": str(model_a),
               "model_b": str(model_b) if model_b else None, "questions": len(questions),
               "sampling": "configured (generation.*)" if sample else "greedy", **summary}
    return _write(out_dir, summary, rows)


def _write(out_dir: Path, summary: dict, rows: list[dict]) -> dict:
    write_jsonl(out_dir / "judgments.jsonl", rows)
    write_json(out_dir / "judge.json", summary)
    if summary["unparsable"]["count"]:
        log.warning("judge: %d of %d replies had no parsable verdict; they are listed in %s and not scored",
                    summary["unparsable"]["count"], summary["judgments"], out_dir / "judge.json")
    return summary


def _mt_bench_run(cfg: Config, questions: list[Question], judge: Judge, out_dir: Path, model_b: str | None,
                  mt: MTBenchFiles) -> dict:
    """gen_model_answer.py, then gen_judgment.py, then show_result.py, for one model (single) or model A
    against model B (pairwise; FastChat's --mode pairwise-baseline with B as the baseline)."""
    mode = "pairwise" if model_b else "single"
    categories = cfg.judge.reference_categories
    judge_prompts = mt_bench.load_judge_prompts(mt.judge_prompts, mode)  # every file checked before any model
    from_file = mt_bench.load_reference_answers(mt.reference_answers) if mt.reference_answers else None
    refs = mt_bench.references(questions, categories, from_file, mt.reference_answers or "the questions file")
    out_dir.mkdir(parents=True, exist_ok=True)
    model_a = cfg.model.name_or_path
    answers_a = answer(model_a, questions, cfg, out_dir, "a", mt_bench_plan(cfg, questions, model_a))
    if model_b:
        answers_b = answer(model_b, questions, cfg, out_dir, "b", mt_bench_plan(cfg, questions, model_b))
        requests = mt_bench.pairwise_requests(questions, answers_a, answers_b, judge_prompts, refs, categories,
                                              mt.judge_prompts)
    else:
        requests = mt_bench.single_requests(questions, answers_a, judge_prompts, refs, categories, mt.judge_prompts)
    jobs = [{"key": fingerprint(judge.model, judge.max_tokens, r["messages"]), **r} for r in requests]
    replies = ask(judge, jobs, out_dir / "judgments.log", cfg.run.progress)
    if model_b:
        rows = _pair_rows(jobs, replies, str(model_a), str(model_b), judge.model)
        stats = mt_bench.summarize_pairwise(rows)
    else:
        rows = [{"question_id": j["question_id"], "model": str(model_a), "judge": [judge.model, j["prompt"]],
                 "user_prompt": j["user_prompt"], "judgment": replies[j["key"]],
                 "score": mt_bench.parse_rating(replies[j["key"]]), "turn": j["turn"], "category": j["category"]}
                for j in jobs]
        stats = mt_bench.summarize_single(rows)
    j = cfg.judge
    summary = {"protocol": MT_BENCH_LABEL, "mode": mode, "judge_prompts": mt.judge_prompts,
               "judge_prompts_digest": fingerprint(sorted((p.name, p.system_prompt, p.prompt_template)
                                                          for p in judge_prompts.values())),
               "reference_answers": mt.reference_answers, "judge_model": judge.model, "judge_url": judge.url,
               "judge_temperature": 0.0, "judge_max_tokens": judge.max_tokens, "model_a": str(model_a),
               "model_b": str(model_b) if model_b else None, "questions": len(questions),
               "answer_generation": {"max_new_tokens": j.max_new_tokens, "temperatures": j.temperatures,
                                     "default_temperature": j.default_temperature, "top_k": j.top_k,
                                     "prompt_cut": None},
               **stats}
    return _write(out_dir, summary, rows)


def _pair_rows(jobs: list[dict], replies: dict[str, str], model_1: str, model_2: str, judge_model: str) -> list[dict]:
    """FastChat's pairwise judgment rows (common.py play_a_match_pair): game g1 shows model 1 as A, g2
    shows model 2 as A; each winner is named model_1 / model_2 / tie / error."""
    names = {"g1": {"A": "model_1", "B": "model_2"}, "g2": {"A": "model_2", "B": "model_1"}}
    games: dict[tuple, dict] = {}
    for j in jobs:
        reply = replies[j["key"]]
        winner = mt_bench.parse_winner(reply, j["output_format"])
        g = games.setdefault((j["question_id"], j["turn"]), {
            "question_id": j["question_id"], "model_1": model_1, "model_2": model_2,
            "judge": [judge_model, j["prompt"]], "turn": j["turn"], "category": j["category"]})
        g.update({f"{j['game']}_winner": names[j["game"]].get(winner, winner),
                  f"{j['game']}_user_prompt": j["user_prompt"], f"{j['game']}_judgment": reply})
    return list(games.values())
