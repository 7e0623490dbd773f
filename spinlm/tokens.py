"""Prompt rendering and response encoding: the one path from text to token ids.

generate, score, train, sft and evaluate all call `encode_prompt` / `encode_response`, so
the model is trained on exactly the prompts it generated from (the reference code used a
different prompt for generation than for training).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import UserError


def set_chat_template(tokenizer, chat_template: str | None, source: str) -> None:
    """Install the configured template (text or a .jinja path); require one to exist."""
    if chat_template:
        path = Path(chat_template)
        is_file = len(chat_template) < 4096 and "{" not in chat_template and path.is_file()
        tokenizer.chat_template = path.read_text(encoding="utf-8") if is_file else chat_template
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"{source}: the tokenizer has no chat template; set model.chat_template to a Jinja "
            "template (text or a .jinja file) so prompts can be rendered"
        )


def render_prompt_text(tokenizer, messages: list[dict]) -> str:
    """The prompt as the model sees it: chat template with the assistant turn opened."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompt(tokenizer, messages: list[dict], max_prompt_length: int | None = None) -> list[int]:
    """Token ids of a rendered prompt; over-long prompts keep their last tokens."""
    text = render_prompt_text(tokenizer, messages)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if max_prompt_length is not None and len(ids) > max_prompt_length:
        ids = ids[-max_prompt_length:]
    return list(ids)


def encode_response(tokenizer, text: str, add_eos: bool = True) -> list[int]:
    """Token ids of a response; EOS is part of the response so its probability is learned."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if add_eos:
        ids.append(tokenizer.eos_token_id)
    return ids


@dataclass
class Limits:
    max_prompt_length: int
    max_length: int

    @classmethod
    def of(cls, cfg) -> "Limits":
        """The data section's limits of a Config."""
        return cls(cfg.data.max_prompt_length, cfg.data.max_length)


def encode_example(tokenizer, prompt: list[dict], responses: list[tuple[str, bool]], limits: Limits):
    """(prompt_ids, [response_ids...]) with responses cut so prompt + response <= max_length.

    `responses` holds (text, add_eos) pairs: a generation that hit max_new_tokens has no EOS.
    """
    prompt_ids = encode_prompt(tokenizer, prompt, limits.max_prompt_length)
    room = limits.max_length - len(prompt_ids)
    return prompt_ids, [encode_response(tokenizer, text, eos)[:room] for text, eos in responses]
