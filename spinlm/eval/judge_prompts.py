"""The judge's instructions for `spinlm judge`, versioned: every output records TEMPLATE_VERSION.

The idea is MT-Bench's (Zheng et al. 2023, "Judging LLM-as-a-Judge"): a strong model grades
one answer on a 1-10 scale (single-answer grading), or compares two answers to the same
question (pairwise), explaining first and ending with a verdict in double square brackets so
that it can be parsed. The wording here is spinlm's own. Multi-turn questions are judged turn
by turn: the judge sees the conversation up to the turn being judged and grades only the
assistant's last reply in it. A question's optional reference answer (MT-Bench has them for
math, reasoning and coding) is shown to the judge for that turn.

Change the wording only together with TEMPLATE_VERSION: cached judgments are keyed by the
exact messages sent, so a new wording is judged afresh, and results of different versions
must not be compared as if they were one measurement.
"""

from __future__ import annotations

TEMPLATE_VERSION = "spinlm-judge-1"

SYSTEM = "You are a careful and impartial evaluator of the replies of AI assistants."

SINGLE = """Read the conversation between a user and an AI assistant below. Grade only the assistant's \
last reply, using the earlier turns as context. Consider whether it is correct, whether it actually \
helps the user, whether it stays on the question, and whether it is as thorough, precise and clearly \
written as the question calls for. Length is not a merit in itself.{reference}

Write a brief justification first. Then give your grade as a whole number from 1 (useless or wrong) \
to 10 (excellent), written in double square brackets, for example: Grade: [[6]]

<conversation>
{conversation}
</conversation>"""

PAIRWISE = """Read the two conversations below. In both, a user asks the same questions; the replies \
come from two different AI assistants, called A and B. Decide whose last reply serves the user better, \
using the earlier turns as context. Consider correctness, helpfulness, relevance, and depth and clarity \
where the question calls for them. Neither the order in which the assistants are shown, nor the length \
of their replies, nor their names should influence you.{reference}

Write a brief comparison first. Then give your verdict in double square brackets: [[A]] if A's reply \
is better, [[B]] if B's reply is better, [[C]] if neither is better.

<conversation of assistant A>
{conversation_a}
</conversation of assistant A>

<conversation of assistant B>
{conversation_b}
</conversation of assistant B>"""

REFERENCE = """ A reference answer to the last question follows; use it to check correctness, and do \
not reward a reply merely for resembling it.

<reference answer>
{reference}
</reference answer>"""


def conversation(questions: list[str], answers: list[str]) -> str:
    """The turns as the judge reads them: 'User:' / 'Assistant:' blocks."""
    parts = []
    for q, a in zip(questions, answers):
        parts += [f"User: {q}", f"Assistant: {a}"]
    return "\n\n".join(parts)


def single_messages(questions: list[str], answers: list[str], reference: str | None) -> list[dict]:
    """Chat messages asking for a 1-10 grade of the last answer."""
    ref = REFERENCE.format(reference=reference) if reference else ""
    text = SINGLE.format(reference=ref, conversation=conversation(questions, answers))
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]


def pairwise_messages(questions: list[str], answers_a: list[str], answers_b: list[str],
                      reference: str | None) -> list[dict]:
    """Chat messages asking which last answer is better, A's or B's (or neither: C)."""
    ref = REFERENCE.format(reference=reference) if reference else ""
    text = PAIRWISE.format(reference=ref, conversation_a=conversation(questions, answers_a),
                           conversation_b=conversation(questions, answers_b))
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]
