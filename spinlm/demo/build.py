"""Build a tokenizer and a tiny Llama model from scratch, entirely offline.

The demo (and the package's own tests) need a real Hugging Face model directory
without any download: `build_tiny` writes one in about a second.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from spinlm.errors import UserError

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

# User/system turns end with <|end|>; an assistant turn ends with the EOS token, so
# render(prompt, add_generation_prompt=True) + response + EOS == render(full chat),
# token for token: generation, scoring and training all see one rendering.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "<|assistant|>{{ message['content'] }}{{ eos_token }}"
    "{%- elif message['role'] in ['system', 'user'] -%}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{%- else -%}"
    "{{ raise_exception('unknown role: ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)


def _train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE whose pre-tokenizer splits every digit apart (learnable arithmetic)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    # No post-processor: no BOS/EOS is added behind the chat template's back.
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def build_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 512):
    """Train a tokenizer on `texts`, save it to `out_dir`, and return it reloaded.

    The returned object is what `AutoTokenizer.from_pretrained(out_dir)` gives, so
    callers exercise exactly the reload path the rest of the package uses.
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise UserError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (bytes + special tokens)")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=_train_bpe(texts, vocab_size),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=SPECIAL_TOKENS[3:],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return AutoTokenizer.from_pretrained(out)


def build_model(
    tokenizer: Any,
    out_dir: str | os.PathLike,
    *,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 256,
    seed: int = 0,
) -> Path:
    """Write a freshly initialised Llama (weights + config + tokenizer) to `out_dir`.

    Initialisation is seeded inside `fork_rng`, so the caller's global RNG state is
    left untouched. Returns the directory, loadable with `from_pretrained`.
    """
    if hidden_size % num_heads:
        raise UserError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or _default_intermediate(hidden_size),
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # The saved tokenizer should know the context limit, so truncation elsewhere is sane.
    tokenizer.model_max_length = max_position_embeddings
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def _default_intermediate(hidden_size: int) -> int:
    """Llama's ~8/3 MLP ratio (SwiGLU has three matrices), rounded up to a multiple of 32."""
    return -(-hidden_size * 8 // 3 // 32) * 32


def build_tiny(out_dir: str | os.PathLike, texts: Iterable[str], *, vocab_size: int = 512, **model_kw: Any) -> Path:
    """Tokenizer and model into one directory: a complete model dir for tests and the demo."""
    tokenizer = build_tokenizer(texts, out_dir, vocab_size=vocab_size)
    return build_model(tokenizer, out_dir, **model_kw)
