"""An offline Hugging Face Hub for tests: a real huggingface_hub cache with tiny stand-ins under real ids.

`build(hf_home)` writes `hf_home/hub/` as huggingface_hub itself lays out what it downloads
(`models--ORG--NAME/` and `datasets--ORG--NAME/`, each with `blobs/<sha256>`, `snapshots/<commit>/<path>`
as relative links into blobs, and `refs/main` holding the commit), so that with `HF_HOME=hf_home` and
`HF_HUB_OFFLINE=1` the real loading code finds them: `from_pretrained("ORG/NAME"[, revision=SHA])`,
`snapshot_download(..., repo_type="dataset")`, `hf_hub_download`, and spinlm's own Hub routes. Nothing is
mocked; only the contents are small.

What it holds (ids as the recipes and README use them; shapes as the real repositories have them):

- `alignment-handbook/zephyr-7b-sft-full`: a 2-layer MistralForCausalLM (bf16 safetensors, as published) with
  a sentencepiece-style tokenizer that adds `<s>` like Llama's, and Zephyr's chat template
  (`<|user|>\\n...</s>\\n<|assistant|>\\n`). Two commits: the revision the SPIN authors pin
  (`ZEPHYR_REVISION`, issue uclaml/SPIN#36) and a later one that `main` points at, with other weights, so a
  test can tell which one was loaded.
- `Qwen/Qwen2.5-0.5B-Instruct`: a 2-layer Qwen2ForCausalLM (tied embeddings), byte-level BPE, ChatML with
  Qwen2.5's default system message, EOS `<|im_end|>`, pad `<|endoftext|>`, and the published generation
  config (sampling defaults, two EOS ids).
- `HuggingFaceH4/ultrachat_200k`: splits train_sft (two shards), test_sft, train_gen, test_gen; columns
  prompt, prompt_id, messages (multi-turn).
- `HuggingFaceH4/ultrafeedback_binarized`: splits train_prefs, test_prefs, train_sft, test_sft, train_gen,
  test_gen; columns prompt, prompt_id, chosen, rejected, messages, score_chosen, score_rejected.
- `UCLA-AGI/SPIN_iter0`: splits train and test; columns generated, real (each [user, assistant]). Two
  commits, as on the Hub (the first upload was replaced on 2024-04-04): `SPIN_ITER0_FIRST` (8 train rows) and
  `SPIN_ITER0_REVISION` = main (16 train rows).

Dataset files follow the Hub's naming (`data/{split}-{shard:05d}-of-{n:05d}-{hash}.parquet`) and each dataset
card has the `configs:` block the Hub writes (`data_files: [{split, path: data/{split}-*}]`). Commits of
repositories whose real hash this file does not know are fixed stand-ins (`_stand_in_sha`). `add_dataset` and
`add_model_dir` let a test add a repository of its own (e.g. to a private HF_HOME).

Row contents are the demo task's problems (spinlm.demo.task), so the tokenizers cover the text.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import string
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

ZEPHYR = "alignment-handbook/zephyr-7b-sft-full"
QWEN = "Qwen/Qwen2.5-0.5B-Instruct"
ULTRACHAT = "HuggingFaceH4/ultrachat_200k"
ULTRAFEEDBACK = "HuggingFaceH4/ultrafeedback_binarized"
SPIN_ITER0 = "UCLA-AGI/SPIN_iter0"


def _stand_in_sha(name: str) -> str:
    """A fixed 40-hex commit for a repository whose real commit hash this file does not pin."""
    return hashlib.sha1(f"spinlm-offline-hub:{name}".encode()).hexdigest()


ZEPHYR_REVISION = "ac6e600eefcce74f5e8bae1035d4f66019e93190"  # the SPIN README's pin
ZEPHYR_MAIN = _stand_in_sha(f"{ZEPHYR}@main")
QWEN_REVISION = _stand_in_sha(QWEN)
ULTRACHAT_REVISION = _stand_in_sha(ULTRACHAT)
ULTRAFEEDBACK_REVISION = _stand_in_sha(ULTRAFEEDBACK)
SPIN_ITER0_REVISION = _stand_in_sha(SPIN_ITER0)
SPIN_ITER0_FIRST = _stand_in_sha(f"{SPIN_ITER0}@first-upload")

# Zephyr's template as published (alignment-handbook), written out: every turn ends with EOS and a newline,
# and the generation prompt is `<|assistant|>` and a newline. No BOS in the template: the tokenizer adds it.
ZEPHYR_TEMPLATE = (
    "{% for message in messages %}\n"
    "{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n"
    "{{ '<|assistant|>' }}\n"
    "{% endif %}\n"
    "{% endfor %}"
)

# ChatML as Qwen2.5 Instruct writes it (tool calls left out): a default system message when none is given.
QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "{%- else %}\n"
    "    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if not (message.role == 'system' and loop.first) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)


@dataclass(frozen=True)
class OfflineHub:
    """What `build` wrote: HF_HOME and the ids and commits a test can ask for."""

    hf_home: Path
    models: dict[str, list[str]] = field(default_factory=dict)  # id -> commits, main's last
    datasets: dict[str, list[str]] = field(default_factory=dict)
    splits: dict[str, dict[str, int]] = field(default_factory=dict)  # dataset id -> split -> rows at main

    @property
    def cache(self) -> Path:
        return self.hf_home / "hub"

    def env(self, base: dict | None = None) -> dict[str, str]:
        """An environment for a subprocess that sees only this Hub, offline."""
        env = dict(os.environ if base is None else base)
        env.update(HF_HOME=str(self.hf_home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                   TRANSFORMERS_OFFLINE="1")
        for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_DATASETS_CACHE"):
            env.pop(key, None)  # these would win over HF_HOME
        return env


# ---------------------------------------------------------------- the cache layout


def _repo_dir(cache: Path, repo_id: str, repo_type: str) -> Path:
    return cache / f"{repo_type}s--{repo_id.replace('/', '--')}"


def _add_snapshot(cache: Path, repo_id: str, repo_type: str, revision: str, files: dict[str, bytes],
                  main: bool = True) -> Path:
    """Write one commit of a repository as huggingface_hub caches it; `main` moves refs/main to it."""
    repo = _repo_dir(cache, repo_id, repo_type)
    snapshot = repo / "snapshots" / revision
    for rel, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, link.parent))
    if main:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(revision)  # no newline, as huggingface_hub writes it
    return snapshot


def add_model_dir(cache: Path, repo_id: str, revision: str, model_dir: Path, main: bool = True) -> Path:
    """A commit of a model repository holding the files of a local model directory."""
    files = {str(p.relative_to(model_dir)): p.read_bytes() for p in sorted(model_dir.rglob("*")) if p.is_file()}
    return _add_snapshot(cache, repo_id, "model", revision, files, main)


def _parquet_bytes(rows: list[dict]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory() as d:
        pq.write_table(pa.Table.from_pylist(rows), f"{d}/x.parquet")
        return Path(f"{d}/x.parquet").read_bytes()


def shard_name(split: str, shard: int, n_shards: int, rows: list[dict]) -> str:
    """The Hub's name for a pushed split's shard: `data/{split}-00000-of-00002-{16 hex}.parquet`."""
    digest = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]
    return f"data/{split}-{shard:05d}-of-{n_shards:05d}-{digest}.parquet"


def dataset_card(splits: Iterable[str], config_name: str = "default", prefix: str = "data", extra: str = "") -> str:
    """A dataset card whose YAML `configs:` block maps each split to `{prefix}/{split}-*`, as push_to_hub writes it."""
    lines = ["---", "configs:", f"- config_name: {config_name}", "  data_files:"]
    for split in splits:
        lines += [f"  - split: {split}", f"    path: {prefix}/{split}-*"]
    return "\n".join(lines) + "\n" + extra + "---\n"


def add_dataset(cache: Path, repo_id: str, revision: str, splits: dict[str, list[dict]], *, shards: dict | None = None,
                readme: str | None = "auto", extra_files: dict[str, bytes] | None = None, main: bool = True) -> Path:
    """A commit of a dataset repository: each split as parquet shard(s) under data/, and a dataset card
    (`readme="auto"`: one with the configs block; None: no README at all; else that text)."""
    files: dict[str, bytes] = {".gitattributes": b"*.parquet filter=lfs diff=lfs merge=lfs -text\n"}
    for split, rows in splits.items():
        n = (shards or {}).get(split, 1)
        size = -(-len(rows) // n)
        for k in range(n):
            part = rows[k * size:(k + 1) * size]
            files[shard_name(split, k, n, part)] = _parquet_bytes(part)
    if readme == "auto":
        readme = dataset_card(splits)
    if readme is not None:
        files["README.md"] = readme.encode()
    files.update(extra_files or {})
    return _add_snapshot(cache, repo_id, "dataset", revision, files, main)


# ---------------------------------------------------------------- tiny models


def _tokenizer(out: Path, texts: list[str], *, template: str, specials: list[str], bos: str | None, eos: str,
               pad: str | None, unk: str | None, sentencepiece: bool, model_max_length: int, vocab_size: int = 700):
    """A BPE tokenizer trained on `texts` rendered by `template`, saved to `out` and reloaded with
    AutoTokenizer. `sentencepiece`: Metaspace pre-tokenizer and a `<s>` added in front of every encoding
    (as Llama/Mistral tokenizers do); otherwise byte-level without BOS (Qwen)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=unk) if unk else models.BPE())
    if sentencepiece:
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        alphabet = list(string.printable)
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()

    def fast():
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad,
                                       unk_token=unk, additional_special_tokens=[s for s in specials
                                                                                 if s not in (bos, eos, pad, unk)],
                                       chat_template=template, clean_up_tokenization_spaces=False,
                                       model_max_length=model_max_length)

    corpus = [fast().apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                                         tokenize=False) for p, r in zip(texts[::2], texts[1::2])]
    tok.train_from_iterator(corpus + [string.printable], trainer=trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet, show_progress=False))
    if sentencepiece:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    out.mkdir(parents=True, exist_ok=True)
    fast().save_pretrained(out)
    return AutoTokenizer.from_pretrained(out)


def _save_model(model, tokenizer, out: Path, generation: dict) -> Path:
    import torch
    from transformers import GenerationConfig

    model.to(torch.bfloat16)  # both checkpoints are published in bf16
    model.generation_config = GenerationConfig(**generation)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def build_zephyr(out: Path, texts: list[str], seed: int = 0) -> Path:
    """A tiny Mistral with Zephyr's tokenizer shape and chat template."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    tok = _tokenizer(out, texts, template=ZEPHYR_TEMPLATE, specials=["<unk>", "<s>", "</s>"], bos="<s>", eos="</s>",
                     pad="</s>", unk="<unk>", sentencepiece=True, model_max_length=2048)
    config = MistralConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768,
                           sliding_window=4096, rope_theta=10000.0, tie_word_embeddings=False,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MistralForCausalLM(config)
    return _save_model(model, tok, out, {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id})


def build_qwen(out: Path, texts: list[str], seed: int = 0) -> Path:
    """A tiny Qwen2 with Qwen2.5 Instruct's tokenizer shape, ChatML template and generation defaults."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = _tokenizer(out, texts, template=QWEN_TEMPLATE, specials=specials, bos=None, eos="<|im_end|>",
                     pad="<|endoftext|>", unk=None, sentencepiece=False, model_max_length=131072)
    endoftext, im_end = tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|im_end|>")
    config = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768,
                         rope_theta=1000000.0, tie_word_embeddings=True, use_sliding_window=False,
                         bos_token_id=endoftext, eos_token_id=im_end)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    return _save_model(model, tok, out, {"bos_token_id": endoftext, "pad_token_id": endoftext,
                                         "eos_token_id": [im_end, endoftext], "do_sample": True,
                                         "repetition_penalty": 1.1, "temperature": 0.7, "top_p": 0.8, "top_k": 20})


# ---------------------------------------------------------------- tiny datasets


def _problems(n: int, seed: int) -> list[dict]:
    from spinlm.demo.task import make_splits

    return make_splits(seed=seed, n_train=n, n_val=1, n_test=1)["train"]


def _user(text):
    return {"content": text, "role": "user"}


def _assistant(text):
    return {"content": text, "role": "assistant"}


def _prompt_id(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()  # as ultrachat_200k's ids are made


def ultrachat_rows(problems: list[dict]) -> list[dict]:
    """UltraChat rows: a two-exchange conversation; `prompt` repeats the first user message."""
    return [{"prompt": p["prompt"], "prompt_id": _prompt_id(p["prompt"]),
             "messages": [_user(p["prompt"]), _assistant(p["response"]), _user("Why?"),
                          _assistant(f"Because {p['answer']} is what the rule gives.")]} for p in problems]


def ultrafeedback_rows(problems: list[dict]) -> list[dict]:
    """UltraFeedback binarized rows: chosen/rejected repeat the prompt as a user turn; messages = chosen."""
    rows = []
    for k, p in enumerate(problems):
        chosen = [_user(p["prompt"]), _assistant(p["response"])]
        rejected = [_user(p["prompt"]), _assistant(f"The answer is {int(p['answer']) + 1 + k % 3}.")]
        rows.append({"prompt": p["prompt"], "prompt_id": _prompt_id(p["prompt"]), "chosen": chosen,
                     "rejected": rejected, "messages": chosen, "score_chosen": 8.0 + k % 2,
                     "score_rejected": 3.0 + k % 3})
    return rows


def spin_rows(problems: list[dict]) -> list[dict]:
    """SPIN_iter0 rows: `generated` (the SFT model's reply) and `real` (UltraChat's), each [user, assistant]."""
    return [{"generated": [_user(p["prompt"]), _assistant(f"I think it is {p['answer'][::-1]}.")],
             "real": [_user(p["prompt"]), _assistant(p["response"])]} for p in problems]


# ---------------------------------------------------------------- the whole Hub


def build(hf_home: Path) -> OfflineHub:
    """Write the offline Hub under `hf_home/hub` (about 2 s, 2 MB) and say what it holds."""
    hf_home = Path(hf_home)
    cache = hf_home / "hub"
    problems = _problems(160, seed=7)
    texts = [x for p in problems for x in (p["prompt"], p["response"])]
    texts += [x for p in problems for x in ("Why?", f"Because {p['answer']} is what the rule gives.")]

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        add_model_dir(cache, ZEPHYR, ZEPHYR_REVISION, build_zephyr(tmp / "zephyr-pinned", texts, seed=0), main=False)
        add_model_dir(cache, ZEPHYR, ZEPHYR_MAIN, build_zephyr(tmp / "zephyr-main", texts, seed=1))
        add_model_dir(cache, QWEN, QWEN_REVISION, build_qwen(tmp / "qwen", texts, seed=0))

    at = iter(range(len(problems)))

    def take(n):
        return [problems[next(at)] for _ in range(n)]

    uc = {"train_sft": take(24), "test_sft": take(8), "train_gen": take(8), "test_gen": take(4)}
    uc = {split: ultrachat_rows(ps) for split, ps in uc.items()}
    add_dataset(cache, ULTRACHAT, ULTRACHAT_REVISION, uc, shards={"train_sft": 2})

    uf_sizes = {"train_prefs": 16, "test_prefs": 8, "train_sft": 8, "test_sft": 4, "train_gen": 4, "test_gen": 4}
    # every split has the same columns on the Hub (the sft/gen ones too)
    uf = {split: ultrafeedback_rows(take(n)) for split, n in uf_sizes.items()}
    add_dataset(cache, ULTRAFEEDBACK, ULTRAFEEDBACK_REVISION, uf)

    spin_problems = take(24)
    add_dataset(cache, SPIN_ITER0, SPIN_ITER0_FIRST,
                {"train": spin_rows(spin_problems[:8]), "test": spin_rows(spin_problems[16:20])}, main=False)
    spin = {"train": spin_rows(spin_problems[:16]), "test": spin_rows(spin_problems[16:])}
    add_dataset(cache, SPIN_ITER0, SPIN_ITER0_REVISION, spin)

    return OfflineHub(
        hf_home=hf_home,
        models={ZEPHYR: [ZEPHYR_REVISION, ZEPHYR_MAIN], QWEN: [QWEN_REVISION]},
        datasets={ULTRACHAT: [ULTRACHAT_REVISION], ULTRAFEEDBACK: [ULTRAFEEDBACK_REVISION],
                  SPIN_ITER0: [SPIN_ITER0_FIRST, SPIN_ITER0_REVISION]},
        splits={ULTRACHAT: {s: len(r) for s, r in uc.items()}, ULTRAFEEDBACK: {s: len(r) for s, r in uf.items()},
                SPIN_ITER0: {s: len(r) for s, r in spin.items()}})


if __name__ == "__main__":  # python tests/offline_hub.py DIR: build one to look at
    import sys

    target = Path(sys.argv[1])
    shutil.rmtree(target / "hub", ignore_errors=True)
    print(build(target))
