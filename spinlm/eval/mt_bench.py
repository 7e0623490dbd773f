"""MT-Bench as FastChat's llm_judge runs it: its file formats, its judge requests, its parsing and its sums.

    spinlm judge --model MODEL --questions question.jsonl --judge-prompts judge_prompts.jsonl \
        [--reference-answers reference_answer/gpt-4.jsonl] --judge-url URL --judge-model gpt-4 --out DIR

The user brings FastChat's files (fastchat/llm_judge/data/); no FastChat text is in spinlm. Every rule
here names the FastChat function it follows (lm-sys/FastChat, read 2026-12-07 at 0e6d3e4b):

- answers (judge.py generates them): every turn of every question, turn 2 seeing turn 1's answer, sampled
  at the category's temperature (common.py `temperature_config`, 0.7 for other categories; below 1e-4
  greedy), at most 1024 new tokens, no prompt cut (gen_model_answer.py `get_model_answers`).
- judge requests: turn 1 with the `single-v1` prompt, turn 2 (questions of exactly two turns) with
  `single-v1-multi-turn`; categories in NEED_REF_CATS use `single-math-v1(-multi-turn)`, filled with
  the reference answers (gen_judgment.py `make_judge_single`, `make_match_single`; common.py
  `run_judge_single`). Pairwise likewise with the `pair-*` prompts, each comparison asked twice with the
  answers swapped (common.py `play_a_match_pair`, `run_judge_pair`). A system message holding the
  prompt's system_prompt, then the filled template as the user message; temperature 0
  (`chat_completion_openai`).
- parsing: the first `[[N]]`, else the first `[N]`; none: score -1 (`run_judge_single`). Pairwise:
  `[[A]]`, else `[[B]]`, else `[[C]]` (tie), else "error" (`run_judge_pair`).
- sums (show_result.py): single, the mean of the scores other than -1, per turn and overall;
  pairwise, games with an "error" in either order dropped, a game whose two orders disagree or that is
  a tie counts as a tie, win rate = wins / games, win_rate_adjusted = (wins + ties / 2) / games.
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass
from pathlib import Path

from spinlm.errors import UserError, where

# gen_judgment.py make_judge_single / make_judge_pairwise: which prompt judges which turn and category.
SINGLE_PROMPTS = {"default": "single-v1", "math": "single-math-v1", "default-mt": "single-v1-multi-turn",
                  "math-mt": "single-math-v1-multi-turn"}
PAIR_PROMPTS = {"default": "pair-v2", "math": "pair-math-v1", "default-mt": "pair-v2-multi-turn",
                "math-mt": "pair-math-v1-multi-turn"}
GREEDY_BELOW = 1e-4  # gen_model_answer.py get_model_answers: do_sample = temperature >= 1e-4
JUDGE_MAX_TOKENS = 2048  # common.py run_judge_single / run_judge_pair: OpenAI judges get max_tokens=2048
TIE_DELTA = 0.1  # common.py: two ratings this close are a tie ("[[rating_a,rating_b]]" prompts)
_ONE = re.compile(r"\[\[(\d+\.?\d*)\]\]")  # common.py one_score_pattern
_ONE_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")  # one_score_pattern_backup
_TWO = re.compile(r"\[\[(\d+\.?\d*),\s?(\d+\.?\d*)\]\]")  # two_score_pattern
_TWO_BACKUP = re.compile(r"\[(\d+\.?\d*),\s?(\d+\.?\d*)\]")  # two_score_pattern_backup
_FORMATS = {"single": ("[[rating]]",), "pairwise": ("[[A]]", "[[rating_a,rating_b]]")}


@dataclass(frozen=True)
class JudgePrompt:
    """One line of FastChat's judge_prompts.jsonl."""

    name: str
    type: str  # "single" or "pairwise"
    system_prompt: str
    prompt_template: str
    output_format: str


# ---------------------------------------------------------------- the files


def _jsonl(path: str, what: str) -> list[tuple[int, dict]]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{path}: no such {what} file")
    rows = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}, line {n}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}, line {n}: expected a JSON object")
        rows.append((n, row))
    return rows


def load_judge_prompts(path: str, mode: str) -> dict[str, JudgePrompt]:
    """The four prompts `mode` ("single" or "pairwise") needs, from FastChat's judge_prompts.jsonl format."""
    found = {}
    for n, row in _jsonl(path, "judge prompts"):
        for key in ("name", "type", "system_prompt", "prompt_template", "output_format"):
            if not isinstance(row.get(key), str):
                raise UserError(f"{where(path, n, key)}: expected a string, as in FastChat's judge_prompts.jsonl")
        found[row["name"]] = JudgePrompt(row["name"], row["type"], row["system_prompt"], row["prompt_template"],
                                         row["output_format"])
    needed = SINGLE_PROMPTS if mode == "single" else PAIR_PROMPTS
    missing = [name for name in needed.values() if name not in found]
    if missing:
        raise UserError(f"{path}: no prompt named {', '.join(missing)} (MT-Bench's {mode} grading uses "
                        f"{', '.join(needed.values())})")
    prompts = {role: found[name] for role, name in needed.items()}
    for p in prompts.values():
        if p.type != mode:
            raise UserError(f"{path}: prompt '{p.name}' has type {p.type!r}; expected {mode!r}")
        if p.output_format not in _FORMATS[mode]:
            raise UserError(f"{path}: prompt '{p.name}' has output_format {p.output_format!r}; FastChat reads "
                            f"{' or '.join(_FORMATS[mode])} for {mode} prompts")
    return prompts


def load_reference_answers(path: str) -> dict[str, list[str]]:
    """question id -> reference turns, from FastChat's answer format (reference_answer/gpt-4.jsonl):
    question_id and choices[0].turns, as common.py load_model_answers reads them."""
    refs = {}
    for n, row in _jsonl(path, "reference answers"):
        qid = row.get("question_id")
        if qid is None or isinstance(qid, bool) or not isinstance(qid, (str, int)):
            raise UserError(f"{where(path, n, 'question_id')}: expected a string or integer id, got {qid!r}")
        choices = row.get("choices")
        turns = choices[0].get("turns") if isinstance(choices, list) and choices and \
            isinstance(choices[0], dict) else None
        if not (isinstance(turns, list) and all(isinstance(t, str) for t in turns)):
            raise UserError(f"{where(path, n, 'choices')}: expected [{{\"turns\": [strings]}}], FastChat's answer "
                            "format")
        refs[str(qid)] = turns
    return refs


def references(questions, categories: list[str], from_file: dict[str, list[str]] | None,
               source: str) -> dict[str, list[str]]:
    """The reference turns of every question whose category needs one: from the reference answers file
    where given (what gen_judgment.py uses), else the question's own `reference`; common.py check_data
    refuses a question without one, and so does this."""
    refs = {}
    for q in questions:
        if q.category not in categories:
            continue
        ref = (from_file or {}).get(q.id) or q.reference
        judged = min(len(q.turns), 2)
        if not ref or len(ref) < (judged if len(q.turns) == 2 else 1):
            raise UserError(f"question {q.id} ({q.category}) needs a reference answer for each judged turn "
                            f"(judge.reference_categories) and {source} has none: give "
                            "--reference-answers (FastChat's data/mt_bench/reference_answer/gpt-4.jsonl) or a "
                            "'reference' list in the question")
        refs[q.id] = ref
    return refs


# ---------------------------------------------------------------- judge requests


def temperature(category: str, temperatures: dict[str, float], default: float) -> float | None:
    """The answers' sampling temperature for a category; None: greedy (gen_model_answer.py get_model_answers)."""
    t = temperatures.get(category, default)
    return None if t < GREEDY_BELOW else t


def _fill(prompt: JudgePrompt, path: str, **fields) -> str:
    """str.format as common.py does (extra fields ignored); a field the protocol does not fill is a user error."""
    wanted = {name for _, name, _, _ in string.Formatter().parse(prompt.prompt_template) if name}
    unknown = sorted(wanted - set(fields))
    if unknown:
        raise UserError(f"{path}: prompt '{prompt.name}' uses {{{unknown[0]}}}, which MT-Bench does not fill for "
                        f"it (it fills {', '.join(sorted(fields))})")
    return prompt.prompt_template.format(**fields)


def _messages(prompt: JudgePrompt, user: str) -> list[dict]:
    """Conversation.to_openai_api_messages of FastChat's chatgpt template with the prompt's system message:
    no system message when it is empty."""
    system = [{"role": "system", "content": prompt.system_prompt}] if prompt.system_prompt else []
    return [*system, {"role": "user", "content": user}]


def _ref_fields(ref: list[str] | None, multi_turn: bool) -> dict:
    if ref is None:
        return {}
    return {"ref_answer_1": ref[0], **({"ref_answer_2": ref[1]} if multi_turn else {})}


def _role(q, categories: list[str], multi_turn: bool) -> str:
    return ("math" if q.category in categories else "default") + ("-mt" if multi_turn else "")


def _turns(q) -> list[int]:
    """gen_judgment.py make_match_*: turn 1 always; turn 2 only for questions of exactly two turns."""
    return [1, 2] if len(q.turns) == 2 else [1]


def single_requests(questions, answers, prompts: dict[str, JudgePrompt], refs: dict[str, list[str]],
                    categories: list[str], path: str) -> list[dict]:
    """One request per judged turn: {question_id, category, turn, prompt, user_prompt, messages}."""
    out = []
    for q, a in zip(questions, answers):
        for turn in _turns(q):
            mt = turn == 2
            prompt = prompts[_role(q, categories, mt)]
            fields = dict(question_1=q.turns[0], question_2=q.turns[1], answer_1=a[0], answer_2=a[1]) if mt \
                else dict(question=q.turns[0], answer=a[0])
            user = _fill(prompt, path, **fields, **_ref_fields(refs.get(q.id), mt))
            out.append({"question_id": q.id, "category": q.category, "turn": turn, "prompt": prompt.name,
                        "output_format": prompt.output_format, "user_prompt": user,
                        "messages": _messages(prompt, user)})
    return out


def pairwise_requests(questions, answers_1, answers_2, prompts: dict[str, JudgePrompt], refs: dict[str, list[str]],
                      categories: list[str], path: str) -> list[dict]:
    """Two requests per judged turn: game g1 shows model 1 as A, game g2 shows model 2 as A."""
    out = []
    for q, a1, a2 in zip(questions, answers_1, answers_2):
        for turn in _turns(q):
            mt = turn == 2
            prompt = prompts[_role(q, categories, mt)]
            for game, (a, b) in (("g1", (a1, a2)), ("g2", (a2, a1))):
                fields = dict(question_1=q.turns[0], question_2=q.turns[1], answer_a_1=a[0], answer_b_1=b[0],
                              answer_a_2=a[1], answer_b_2=b[1]) if mt \
                    else dict(question=q.turns[0], answer_a=a[0], answer_b=b[0])
                user = _fill(prompt, path, **fields, **_ref_fields(refs.get(q.id), mt))
                out.append({"question_id": q.id, "category": q.category, "turn": turn, "game": game,
                            "prompt": prompt.name, "output_format": prompt.output_format, "user_prompt": user,
                            "messages": _messages(prompt, user)})
    return out


# ---------------------------------------------------------------- verdicts


def parse_rating(judgment: str) -> float:
    """common.py run_judge_single: the FIRST [[N]], else the first [N]; -1 when there is none."""
    match = _ONE.search(judgment) or _ONE_BACKUP.search(judgment)
    return float(match.group(1)) if match else -1.0


def parse_winner(judgment: str, output_format: str) -> str:
    """common.py run_judge_pair: 'A', 'B', 'tie' or 'error' (the first of [[A]], [[B]], [[C]] present, in
    that order of precedence; or two ratings within TIE_DELTA of each other)."""
    if output_format == "[[A]]":
        for mark, winner in (("[[A]]", "A"), ("[[B]]", "B"), ("[[C]]", "tie")):
            if mark in judgment:
                return winner
        return "error"
    match = _TWO.search(judgment) or _TWO_BACKUP.search(judgment)
    if not match:
        return "error"
    a, b = float(match.group(1)), float(match.group(2))
    return "tie" if abs(a - b) <= TIE_DELTA else "A" if a > b else "B"


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize_single(rows: list[dict]) -> dict:
    """show_result.py display_result_single: scores of -1 left out, means per turn and overall (and per
    category, as FastChat's radar plot shows)."""
    kept = [r for r in rows if r["score"] != -1]
    failed = [r for r in rows if r["score"] == -1]
    return {"judgments": len(rows), "scored": len(kept),
            "unparsable": {"count": len(failed), "examples": [
                {"question_id": r["question_id"], "turn": r["turn"], "reply": r["judgment"][:300]}
                for r in failed[:20]]},
            "overall": _mean([r["score"] for r in kept]),
            "per_turn": {str(t): _mean([r["score"] for r in kept if r["turn"] == t])
                         for t in sorted({r["turn"] for r in rows})},
            "per_category": {c: _mean([r["score"] for r in kept if r["category"] == c])
                             for c in sorted({r["category"] for r in rows})}}


def game_outcome(g1_winner: str, g2_winner: str) -> str | None:
    """show_result.py display_result_pairwise for one game (winners named model_1 / model_2 / tie /
    error): 'model_1', 'model_2' or 'tie'; None when either order is an error (the game is dropped)."""
    if "error" in (g1_winner, g2_winner):
        return None
    return "tie" if g1_winner == "tie" or g1_winner != g2_winner else g1_winner


def summarize_pairwise(rows: list[dict]) -> dict:
    """show_result.py display_result_pairwise, for model_1 against model_2."""
    outcomes = [(r["category"], game_outcome(r["g1_winner"], r["g2_winner"])) for r in rows]
    kept = [(c, o) for c, o in outcomes if o is not None]
    errors = [r for r in rows if game_outcome(r["g1_winner"], r["g2_winner"]) is None]

    def rates(games: list[str]) -> dict:
        n = len(games)
        win, loss, tie = (games.count(k) for k in ("model_1", "model_2", "tie"))
        return {"win_rate": win / n if n else None, "loss_rate": loss / n if n else None,
                "tie_rate": tie / n if n else None, "win_rate_adjusted": (win + 0.5 * tie) / n if n else None}

    verdicts = [float(w == shown_first) for r in rows
                for w, shown_first in ((r["g1_winner"], "model_1"), (r["g2_winner"], "model_2"))
                if w in ("model_1", "model_2")]
    return {"judgments": 2 * len(rows), "comparisons": len(rows), "scored": len(kept), "dropped": len(errors),
            "unparsable": {"count": sum((r["g1_winner"] == "error") + (r["g2_winner"] == "error") for r in rows),
                           "examples": [
                {"question_id": r["question_id"], "turn": r["turn"], "g1_winner": r["g1_winner"],
                 "g2_winner": r["g2_winner"]} for r in errors[:20]]},
            "inconsistent_orders": sum(r["g1_winner"] != r["g2_winner"] for r in rows
                                       if game_outcome(r["g1_winner"], r["g2_winner"]) is not None),
            **rates([o for _, o in kept]),
            "per_category": {c: rates([o for cat, o in kept if cat == c]) for c in sorted({c for c, _ in kept})},
            "first_position_preferred": _mean(verdicts)}
