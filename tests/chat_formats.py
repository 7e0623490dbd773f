"""Tiny tokenizers carrying the chat-template structures of real checkpoints (tests only).

Each family reproduces what matters to spinlm about a real model's chat format: its special tokens,
where the assistant turn opens and how it ends (turn-end token vs EOS), whether a BOS is written by
the template, and whether a system role exists. The templates follow the structure of the real ones
(written here from their published form, shortened to what these tests exercise). Where the real tokenizer
puts a BOS in front of text by default (every family here but ChatML: Llama/Mistral sentencepiece, Llama-3,
Gemma), this one does too (`adds_bos`), whether or not the template also writes it:

- zephyr:  `<|user|>\\n...</s><|assistant|>\\n...</s>`, plain-text role tags and a sentencepiece-style
           (Metaspace) tokenizer, whose merges can cross the prompt/response boundary;
- chatml:  Qwen2.5's `<|im_start|>role\\n...<|im_end|>\\n` with EOS `<|endoftext|>` (a base checkpoint's);
- llama3:  `<|begin_of_text|><|start_header_id|>role<|end_header_id|>\\n\\n...<|eot_id|>` with EOS
           `<|end_of_text|>` and no pad token;
- gemma:   `<bos><start_of_turn>user\\n...<end_of_turn>\\n<start_of_turn>model\\n`, EOS `<eos>`, no system role;
- mistral: `<s>[INST] ... [/INST]...</s>`, no generation prompt and no system role (v0.1/v0.2's shape);
- mistral_v3: Mistral-7B-Instruct-v0.3's `<s>[INST] ...[/INST] reply</s>`: no generation prompt, and a
           system message folded into the LAST user turn (`[INST] system\n\nuser[/INST]`) only while that
           turn ends the conversation, so with a system message the rendered conversation does not start
           with the rendered prompt (the system text is gone once the reply follows).
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

ALTERNATE = ("{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
             "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
             "{%- endif -%}")


@dataclass(frozen=True)
class Family:
    name: str
    template: str
    bos: str | None
    eos: str
    turn_end: str  # the token that ends an assistant turn
    pad: str | None = None
    extra: tuple[str, ...] = ()
    sentencepiece: bool = False
    system: bool = True  # whether the template accepts a system message
    # how the template writes an assistant turn after the rendered prompt ({content}: the reply, stripped),
    # where a test must not take it from the template's rendering of the whole conversation (mistral_v3)
    reply: str | None = None
    # whether the tokenizer puts the BOS in front of text by default, as the real one does (Llama/Mistral
    # sentencepiece tokenizers, Llama-3's and Gemma's: a TemplateProcessing post-processor)
    adds_bos: bool = False

    @property
    def template_bos(self) -> bool:
        """Whether the template writes the BOS itself ({{ bos_token }})."""
        return "bos_token" in self.template

    def special_tokens(self) -> list[str]:
        return list(dict.fromkeys([t for t in (self.pad, self.bos, self.eos, self.turn_end) if t] + list(self.extra)))


FAMILIES = {
    "zephyr": Family(
        "zephyr",
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%}{{ '<|user|>\n' + message['content'] + eos_token }}"
        "{%- elif message['role'] == 'system' -%}{{ '<|system|>\n' + message['content'] + eos_token }}"
        "{%- elif message['role'] == 'assistant' -%}{{ '<|assistant|>\n' + message['content'] + eos_token }}"
        "{%- endif -%}"
        "{%- if loop.last and add_generation_prompt -%}{{ '<|assistant|>' }}{%- endif -%}"
        "{%- endfor -%}",
        bos="<s>", eos="</s>", turn_end="</s>", sentencepiece=True, adds_bos=True),
    "chatml": Family(
        "chatml",
        "{%- if messages[0]['role'] != 'system' -%}"
        "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{%- endif -%}"
        "{%- for message in messages -%}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}",
        bos=None, eos="<|endoftext|>", turn_end="<|im_end|>", pad="<|endoftext|>",
        extra=("<|im_start|>",)),
    "llama3": Family(
        "llama3",
        "{{- bos_token -}}"
        "{%- for message in messages -%}"
        "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
        " + '<|eot_id|>' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}{%- endif -%}",
        bos="<|begin_of_text|>", eos="<|end_of_text|>", turn_end="<|eot_id|>",
        extra=("<|start_header_id|>", "<|end_header_id|>"), adds_bos=True),
    "gemma": Family(
        "gemma",
        "{{ bos_token }}"
        "{%- if messages[0]['role'] == 'system' -%}{{ raise_exception('System role not supported') }}{%- endif -%}"
        "{%- for message in messages -%}" + ALTERNATE +
        "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}"
        "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
        "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}",
        bos="<bos>", eos="<eos>", turn_end="<end_of_turn>", pad="<pad>", extra=("<start_of_turn>",), system=False,
        adds_bos=True),
    "mistral": Family(
        "mistral",
        "{{ bos_token }}"
        "{%- for message in messages -%}" + ALTERNATE +
        "{%- if message['role'] == 'user' -%}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{%- elif message['role'] == 'assistant' -%}{{ message['content'] + eos_token }}"
        "{%- else -%}{{ raise_exception('Only user and assistant roles are supported!') }}"
        "{%- endif -%}"
        "{%- endfor -%}",
        bos="<s>", eos="</s>", turn_end="</s>", extra=("[INST]", "[/INST]"), system=False, adds_bos=True),
    # the structure of mistralai/Mistral-7B-Instruct-v0.3's tokenizer_config.json chat_template (its tool
    # calling left out): the system message goes into the last user message, and only `if loop.last`
    "mistral_v3": Family(
        "mistral_v3",
        "{%- if messages[0]['role'] == 'system' -%}"
        "{%- set system_message = messages[0]['content'] -%}{%- set loop_messages = messages[1:] -%}"
        "{%- else -%}{%- set loop_messages = messages -%}{%- endif -%}"
        "{{- bos_token -}}"
        "{%- for message in loop_messages -%}" + ALTERNATE +
        "{%- if message['role'] == 'user' -%}"
        "{%- if loop.last and system_message is defined -%}"
        "{{- '[INST] ' + system_message + '\n\n' + message['content'] + '[/INST]' -}}"
        "{%- else -%}{{- '[INST] ' + message['content'] + '[/INST]' -}}{%- endif -%}"
        "{%- elif message['role'] == 'assistant' -%}{{- ' ' + message['content'] | trim + eos_token -}}"
        "{%- else -%}{{- raise_exception('Only user and assistant roles are supported, with the exception of an "
        "initial optional system message!') -}}"
        "{%- endif -%}"
        "{%- endfor -%}",
        bos="<s>", eos="</s>", turn_end="</s>", extra=("[INST]", "[/INST]"), reply=" {content}</s>",
        adds_bos=True),
}


def build_family_tokenizer(family: Family, texts: list[str], out_dir: Path, vocab_size: int = 600):
    """A BPE tokenizer trained on `texts` rendered in the family's chat format, saved to `out_dir`
    and reloaded with AutoTokenizer (the path every spinlm stage takes)."""
    specials = family.special_tokens()
    tok = Tokenizer(models.BPE())
    if family.sentencepiece:
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        alphabet = list(string.printable)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=family.bos, eos_token=family.eos,
                                   pad_token=family.pad, additional_special_tokens=specials,
                                   chat_template=family.template, clean_up_tokenization_spaces=False)
    corpus = [fast.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                                       tokenize=False) for p, r in zip(texts[::2], texts[1::2])]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(corpus + [string.printable], trainer=trainer)
    if family.adds_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{family.bos} $A", pair=f"{family.bos} $A {family.bos} $B",
            special_tokens=[(family.bos, tok.token_to_id(family.bos))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=family.bos, eos_token=family.eos,
                                   pad_token=family.pad, additional_special_tokens=specials,
                                   chat_template=family.template, clean_up_tokenization_spaces=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)
