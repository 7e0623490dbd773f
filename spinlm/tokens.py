"""Prompt rendering and response encoding: the one path from text to token ids.

generate, score, train, sft and evaluate all call `encode_prompt` / `encode_response` /
`encode_pair`, so the model is trained on exactly the prompts it generated from (the reference
code used a different prompt for generation than for training).

A prompt's ids start with exactly one BOS where the tokenizer adds one by default or the template
writes one, and none otherwise (`prompt_bos`: Zephyr's `<s>`, which its template does not write, as
the SFT model was trained; never a second one behind a template's `{{ bos_token }}`). Everything else
is tokenized without special tokens: the template writes them.

A response's tokens are what the model's own chat template renders for the whole conversation
minus the rendered prompt, up to and including the template's turn-end token: Gemma's
`<end_of_turn>`, ChatML's `<|im_end|>` (Qwen), Llama-3's `<|eot_id|>`, or the EOS token where the
template ends an assistant turn with it (Zephyr, Mistral). What a template renders after the turn
end (ChatML's and Gemma's newline) is never generated, because generation stops at the turn end,
so it is not trained either. Generation stops on the same tokens (`stop_ids`).

Where the template's tokens of the whole conversation do not start with the prompt's tokens (a
tokenizer that merges across the boundary, e.g. a sentencepiece space), the response text that
follows the rendered prompt is tokenized on its own instead (`Encoding.fallback` counts these):
the model then sees the prompt exactly as it was generated from.

A template that folds the system message into the last user turn (Mistral-7B-Instruct-v0.3 and
later Mistral templates: the system text goes inside the `[INST] ... [/INST]` of the last user
message only while that message ends the conversation) renders it in the prompt but drops it once
the reply follows, so the conversation does not start with the prompt. There the reply's rendering
is taken from the same conversation without its system message, where it does, and put after the
prompt as it was generated from (`_conversation_text`). A template whose rendered conversation starts
with the rendered prompt text neither way cannot be split; that is an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from spinlm.errors import UserError

_PROBE = "SPINLM-PROBE-7c1f"  # an assistant reply that no template changes, to find the turn end


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


# The version of how text becomes token ids (prompt and responses). Fingerprints of work files that hash
# text rather than token ids include it, so a partial file from another encoding is not resumed.
# 2: a prompt starts with the BOS the tokenizer adds by default (`prompt_bos`).
ENCODING = 2


def _ids(tokenizer, text: str) -> list[int]:
    # no special tokens behind the template's back: the BOS rule is applied once, to the prompt (`encode_prompt`)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts a BOS in front of text by default (Llama, Mistral, Gemma and Llama-3
    tokenizers do; Qwen's, without a BOS token, does not)."""
    cached = getattr(tokenizer, "_spinlm_adds_bos", None)
    if cached is None:
        bos = tokenizer.bos_token_id
        ids = list(tokenizer("x")["input_ids"]) if bos is not None else []
        cached = tokenizer._spinlm_adds_bos = bool(ids) and ids[0] == bos
    return cached


def prompt_bos(tokenizer, ids: list[int]) -> list[int]:
    """The rendered prompt's ids with exactly one BOS in front where the tokenizer adds one by default or the
    template wrote one, and none otherwise.

    Why: a chat model was trained on its template's text tokenized with the tokenizer's defaults. Zephyr's
    template writes no BOS and its (Llama-style) tokenizer adds `<s>`: alignment-handbook's SFT of
    zephyr-7b-sft-full (TRL 0.7.4 SFTTrainer, packed text tokenized with the defaults), FastChat's MT-Bench
    answers and vLLM's text prompts all put one `<s>` first. Templates that write the BOS themselves
    (`{{ bos_token }}`: Mistral, Llama-3, Gemma) get no second one, the double BOS that TRL and transformers
    avoid by tokenizing a rendered chat with add_special_tokens=False (transformers' apply_chat_template with
    tokenize=True; TRL's DPO/SFT collators). Tokenizers without a BOS (Qwen's ChatML) get none."""
    bos = tokenizer.bos_token_id
    if bos is None or not adds_bos(tokenizer) or ids[:1] == [bos]:
        return ids
    return [bos] + ids


def encode_prompt(tokenizer, messages: list[dict], max_prompt_length: int | None = None) -> list[int]:
    """Token ids of a rendered prompt, a BOS first where `prompt_bos` says; an over-long prompt keeps
    its last tokens behind that BOS (the model never saw a prompt start without it)."""
    ids = prompt_bos(tokenizer, _ids(tokenizer, render_prompt_text(tokenizer, messages)))
    if max_prompt_length is not None and len(ids) > max_prompt_length:
        head = ids[:1] if ids[:1] == [tokenizer.bos_token_id] and max_prompt_length > 1 else []
        ids = head + ids[len(ids) - max_prompt_length + len(head):]
    return ids


def turn_end_ids(tokenizer) -> list[int]:
    """The special token(s) the chat template writes right after an assistant reply's content
    (the first special token of what follows the reply), or [] if it writes none."""
    cached = getattr(tokenizer, "_spinlm_turn_end", None)
    if cached is not None:
        return cached
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
    try:
        full = tokenizer.apply_chat_template(chat, tokenize=False)
    except Exception:  # a template that refuses this tiny conversation: fall back to EOS below
        full = ""
    tail = full[full.rfind(_PROBE) + len(_PROBE):] if _PROBE in full else ""
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    found = next(([t] for t in _ids(tokenizer, tail) if t in special), [])
    tokenizer._spinlm_turn_end = found
    return found


def stop_ids(tokenizer, generation_config=None) -> list[int]:
    """Every token that ends a response: the template's turn end, the tokenizer's EOS and the
    checkpoint's eos ids (e.g. Llama-3 Instruct lists both <|eot_id|> and <|end_of_text|>)."""
    ids = getattr(generation_config, "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return sorted(set(ids) | set(turn_end_ids(tokenizer)) | {tokenizer.eos_token_id})


@dataclass
class Encoding:
    """How responses were encoded: by the template's full rendering, or (fallback) on their own."""

    template: int = 0
    fallback: int = 0


def encode_response(tokenizer, prompt: list[dict], text: str, complete: bool = True,
                    counts: Encoding | None = None) -> list[int]:
    """Token ids of `text` as the assistant's reply to `prompt`: the template's rendering of the whole
    conversation minus the rendered prompt, cut after the first stop token (the turn end). A
    response that did not end (`complete=False`: a generation that hit max_new_tokens) is cut
    before it. A template without any turn-end token gets the EOS token appended."""
    prompt_text = render_prompt_text(tokenizer, prompt)
    full_text = _conversation_text(tokenizer, prompt, prompt_text, text)
    prompt_ids, full_ids = _ids(tokenizer, prompt_text), _ids(tokenizer, full_text)
    if full_ids[: len(prompt_ids)] == prompt_ids:
        ids = full_ids[len(prompt_ids):]
        if counts is not None:
            counts.template += 1
    else:
        ids = _ids(tokenizer, full_text[len(prompt_text):])
        if counts is not None:
            counts.fallback += 1
    stops = set(turn_end_ids(tokenizer) or [tokenizer.eos_token_id]) | {tokenizer.eos_token_id}
    end = next((k for k, t in enumerate(ids) if t in stops), None)
    if end is None:  # the template writes no stop token after a reply
        ids = ids + [tokenizer.eos_token_id] if complete else ids
    else:
        ids = ids[: end + 1] if complete else ids[:end]
    return ids


def _conversation_text(tokenizer, prompt: list[dict], prompt_text: str, text: str) -> str:
    """The rendered prompt followed by the template's rendering of the reply `text`: the whole
    conversation as the template renders it, where that starts with `prompt_text` (every template
    but those below, unchanged); else, for a prompt with a system message, `prompt_text` followed by
    what the template renders after the prompt in the conversation without the system message
    (a template that folds the system text into the last user turn only while it ends the
    conversation, as Mistral-7B-Instruct-v0.3's does: the model generated after the prompt with the
    system text, and its reply is rendered the same way with or without one)."""
    reply = [{"role": "assistant", "content": text}]
    full_text = tokenizer.apply_chat_template(prompt + reply, tokenize=False)
    if full_text.startswith(prompt_text):
        return full_text
    bare = [m for m in prompt if m["role"] != "system"]
    if bare and len(bare) < len(prompt):
        bare_prompt = render_prompt_text(tokenizer, bare)
        bare_full = tokenizer.apply_chat_template(bare + reply, tokenize=False)
        if bare_full.startswith(bare_prompt):
            return prompt_text + bare_full[len(bare_prompt):]
    raise UserError("model.chat_template: the conversation rendered with the assistant reply does not start with "
                    "the prompt rendered with add_generation_prompt=True (nor does it without the system message), "
                    "so the reply's tokens cannot be told apart (prompt renders as "
                    f"{prompt_text[-80:]!r}, the conversation as {full_text[:len(prompt_text) + 40][-120:]!r}); "
                    "set model.chat_template to a template whose generation prompt is a prefix of the rendered "
                    "conversation")


@dataclass
class Limits:
    max_prompt_length: int
    max_length: int

    @classmethod
    def of(cls, cfg) -> "Limits":
        """The data section's limits of a Config."""
        return cls(cfg.data.max_prompt_length, cfg.data.max_length)


def encode_example(tokenizer, prompt: list[dict], responses: list[tuple[str, bool]], limits: Limits,
                   counts: Encoding | None = None):
    """(prompt_ids, [response_ids...]) with responses cut so prompt + response <= max_length.

    `responses` holds (text, complete) pairs: a generation that hit max_new_tokens has no turn end.
    """
    prompt_ids = encode_prompt(tokenizer, prompt, limits.max_prompt_length)
    room = limits.max_length - len(prompt_ids)
    return prompt_ids, [encode_response(tokenizer, prompt, text, done, counts)[:room] for text, done in responses]


def encode_pair(tokenizer, row: dict, limits: Limits,
                counts: Encoding | None = None) -> tuple[list[int], list[int], list[int]]:
    """(prompt, real, generated) token ids of a generations row; the one encoding of a pair. The
    generated side is the sampled ids the row stores (`generated_ids`), so what is scored and
    trained is what was sampled; a row without them (older files, a server that returns text
    only, given preference pairs) encodes its text."""
    prompt_ids = encode_prompt(tokenizer, row["prompt"], limits.max_prompt_length)
    room = limits.max_length - len(prompt_ids)
    real_ids = encode_response(tokenizer, row["prompt"], row["real"], True, counts)
    sampled = row.get("generated_ids")
    generated_ids = list(sampled) if sampled is not None else encode_response(
        tokenizer, row["prompt"], row["generated"], row["finish"] == "eos", counts)
    return prompt_ids, real_ids[:room], generated_ids[:room]


def encode_real(tokenizer, examples, limits: Limits) -> list[tuple[list[int], list[list[int]]]]:
    """(prompt, [real]) token-id groups of examples (spinlm.data.Example)."""
    out = []
    for ex in examples:
        prompt, (real,) = encode_example(tokenizer, ex.prompt, [(ex.real, True)], limits)
        out.append((prompt, [real]))
    return out


def pair_groups(tokenizer, rows: list[dict], limits: Limits) -> list[tuple[list[int], list[list[int]]]]:
    """(prompt, [real, generated]) token-id groups of generation rows."""
    groups = []
    for row in rows:
        prompt, real, generated = encode_pair(tokenizer, row, limits)
        groups.append((prompt, [real, generated]))
    return groups


def is_dead(real_ids: list[int], generated_ids: list[int]) -> bool:
    """A dead pair: the sample is the real response token for token (its SPIN gradient is zero).
    The one definition, for training and for the held-out metrics."""
    return list(real_ids) == list(generated_ids)
