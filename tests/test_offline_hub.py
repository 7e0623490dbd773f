"""The offline Hub fixture (tests/offline_hub.py) is what the real loading code finds under HF_HUB_OFFLINE=1.

Checked in a fresh process with only HF_HOME pointing at the fixture: transformers resolves the ids and the
pinned revision through huggingface_hub's cache, the two Zephyr commits hold different weights, the templates
render as the real checkpoints' do, and huggingface_hub finds each dataset's split files.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import offline_hub as oh

PROBE = r"""
import json, sys
from huggingface_hub import snapshot_download
from transformers import AutoModelForCausalLM, AutoTokenizer
import pyarrow.parquet as pq
Z, PIN = sys.argv[1], sys.argv[2]
out = {}
for rev in ("main", PIN):
    m = AutoModelForCausalLM.from_pretrained(Z, revision=rev, dtype="auto")  # as saved (transformers 4.x: fp32)
    out[rev] = [type(m).__name__, str(m.dtype), m.lm_head.weight.float().sum().item()]
chat = [{"role": "user", "content": "What is twice 12?"}, {"role": "assistant", "content": "The answer is 24."}]
z = AutoTokenizer.from_pretrained(Z, revision=PIN)
q = AutoTokenizer.from_pretrained("Qwen/Qwen2.5-0.5B-Instruct")
out["zephyr"] = [z.apply_chat_template(chat, tokenize=False), z("x").input_ids[0] == z.bos_token_id]
out["qwen"] = [q.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True), q.eos_token, q.pad_token]
out["qwen_class"] = type(AutoModelForCausalLM.from_pretrained("Qwen/Qwen2.5-0.5B-Instruct")).__name__
root = snapshot_download("HuggingFaceH4/ultrachat_200k", repo_type="dataset", allow_patterns=["data/train_sft-*"])
import pathlib
files = sorted(pathlib.Path(root).glob("data/train_sft-*.parquet"))
out["ultrachat"] = [[f.name for f in files], sum(pq.read_table(f).num_rows for f in files),
                    pq.read_table(files[0]).column_names]
spin = snapshot_download("UCLA-AGI/SPIN_iter0", repo_type="dataset")
out["spin"] = [pathlib.Path(spin).name, pq.read_table(next(pathlib.Path(spin).glob("data/train-*"))).to_pylist()[0]]
print(json.dumps(out))
"""


def test_real_loaders_find_the_stand_ins_offline(offline_hub):
    proc = subprocess.run([sys.executable, "-c", PROBE, oh.ZEPHYR, oh.ZEPHYR_REVISION], env=offline_hub.env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["main"][:2] == out[oh.ZEPHYR_REVISION][:2] == ["MistralForCausalLM", "torch.bfloat16"]
    assert out["main"][2] != out[oh.ZEPHYR_REVISION][2]  # refs/main and the pin are different commits
    assert out["zephyr"] == ["<|user|>\nWhat is twice 12?</s>\n<|assistant|>\nThe answer is 24.</s>\n", True]
    assert out["qwen"] == ["<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
                           "<|im_end|>\n<|im_start|>user\nWhat is twice 12?<|im_end|>\n<|im_start|>assistant\n",
                           "<|im_end|>", "<|endoftext|>"]
    assert out["qwen_class"] == "Qwen2ForCausalLM"
    names, rows, columns = out["ultrachat"]
    assert [re.sub("[0-9a-f]{16}", "H", n) for n in names] == ["train_sft-00000-of-00002-H.parquet",
                                                              "train_sft-00001-of-00002-H.parquet"]
    assert rows == offline_hub.splits[oh.ULTRACHAT]["train_sft"] and columns == ["prompt", "prompt_id", "messages"]
    assert out["spin"][0] == oh.SPIN_ITER0_REVISION == offline_hub.datasets[oh.SPIN_ITER0][-1]
    assert sorted(out["spin"][1]) == ["generated", "real"]
    assert [m["role"] for m in out["spin"][1]["real"]] == ["user", "assistant"]


def test_layout_is_huggingface_hubs(offline_hub):
    """blobs + relative links in snapshots + refs/main, as huggingface_hub writes its cache."""
    repo = offline_hub.cache / "models--alignment-handbook--zephyr-7b-sft-full"
    assert (repo / "refs" / "main").read_text() == oh.ZEPHYR_MAIN
    link = repo / "snapshots" / oh.ZEPHYR_REVISION / "model.safetensors"
    assert link.is_symlink() and not link.readlink().is_absolute() and link.resolve().parent == repo / "blobs"
    card = (offline_hub.cache / "datasets--HuggingFaceH4--ultrafeedback_binarized" / "snapshots"
            / oh.ULTRAFEEDBACK_REVISION / "README.md").read_text()
    assert "- split: train_prefs\n    path: data/train_prefs-*" in card
