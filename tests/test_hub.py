"""Hub inputs on the offline Hub (tests/offline_hub.py): the real huggingface_hub cache, HF_HUB_OFFLINE=1.

A Hub dataset's split becomes its files through huggingface_hub and spinlm's readers (shards in order, a bad
row named by file and row); subsets from the dataset card's `configs:` block, or `datasets`' default naming
without one; revisions of datasets and models; unknown ids, revisions, subsets and splits named with what
exists; `spinlm validate` plans a Hub model's memory and disk from its config and safetensors headers, or
from config.json alone. Every check runs in a fresh process whose HF_HOME is the fixture (huggingface_hub
reads HF_HOME once, at import).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import offline_hub as oh

ROOT = Path(__file__).resolve().parents[1]


def _python(script: str, env: dict, *args: str) -> dict:
    # cwd outside the checkout: the spinlm imported is the one on PYTHONPATH (or installed), not the cwd's
    proc = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True,
                          timeout=300, cwd=env["HF_HOME"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _spinlm(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spinlm", *args], env=env, capture_output=True, text=True,
                          timeout=300, cwd=env["HF_HOME"])


READ = r"""
import json, sys
from spinlm.data import load_examples
from spinlm.errors import UserError
from spinlm import hub

def err(**kw):
    try:
        load_examples(**kw)
    except UserError as e:
        return str(e)
    return None

out = {}
uc = load_examples("HuggingFaceH4/ultrachat_200k", split="train_sft", counts=(c := {}))
out["uc"] = [len(uc), uc[0].source, uc[-1].source, uc[0].prompt, c["hub"]["commit"], c["hub"]["files"]]
out["spin_main"] = len(load_examples("UCLA-AGI/SPIN_iter0", split="train"))
out["spin_first"] = len(load_examples("UCLA-AGI/SPIN_iter0", split="train", revision=sys.argv[1]))
prefs = load_examples("HuggingFaceH4/ultrafeedback_binarized", split="test_prefs", format="trl", preference=True)
out["prefs"] = [len(prefs), prefs[0].rejected is not None]
out["errors"] = {
    "id": err(source="HuggingFaceH4/no_such_set", split="train"),
    "split": err(source="HuggingFaceH4/ultrachat_200k", split="train"),
    "subset": err(source="HuggingFaceH4/ultrachat_200k", split="train_sft", subset="en"),
    "revision": err(source="UCLA-AGI/SPIN_iter0", split="train", revision="v2"),
}
def model_err(name, rev):
    try:
        hub.model_commit(name, rev)
    except UserError as e:
        return str(e)
out["model_errors"] = [model_err("alignment-handbook/zephyr-7b-sft-full", "0" * 40), model_err("Org/none", None)]
out["commits"] = [hub.model_commit("alignment-handbook/zephyr-7b-sft-full", None),
                  hub.model_commit("alignment-handbook/zephyr-7b-sft-full", sys.argv[2])]
from spinlm.config import ModelConfig
from spinlm.modeling import load_model
import torch
from safetensors.torch import load_file
pinned = load_model("alignment-handbook/zephyr-7b-sft-full", ModelConfig(revision=sys.argv[2], dtype="float32"),
                    dev=torch.device("cpu"))
snap = hub.snapshot_dir("alignment-handbook/zephyr-7b-sft-full", sys.argv[2])
weights = load_file(snap + "/model.safetensors")["lm_head.weight"].float()
out["pinned_loaded"] = bool(torch.equal(pinned.lm_head.weight, weights))
out["snapshot"] = snap
print(json.dumps(out))
"""


def test_hub_datasets_and_revisions(offline_hub):
    out = _python(READ, offline_hub.env(), oh.SPIN_ITER0_FIRST, oh.ZEPHYR_REVISION)
    n, first, last, prompt, commit, files = out["uc"]
    assert n == offline_hub.splits[oh.ULTRACHAT]["train_sft"] == 24 and commit == oh.ULTRACHAT_REVISION
    assert [f.split("-of-")[0] for f in files] == ["data/train_sft-00000", "data/train_sft-00001"]
    # rows numbered within each file, named by it: the first file's first row, the second file's last
    assert first == f"HuggingFaceH4/ultrachat_200k[train_sft]@{commit[:12]}/{files[0]}:1"
    assert last == f"HuggingFaceH4/ultrachat_200k[train_sft]@{commit[:12]}/{files[1]}:12"
    assert prompt[0]["role"] == "user" and len(prompt) == 1  # turn first: the first exchange only
    assert (out["spin_main"], out["spin_first"]) == (16, 8)  # main vs the first upload
    assert out["prefs"] == [8, True]
    e = out["errors"]
    assert "not in the Hugging Face cache" in e["id"] and "HuggingFaceH4/ultrachat_200k" in e["id"]
    assert e["split"].endswith("it has test_gen, test_sft, train_gen, train_sft")
    assert "no subset 'en'; it has default" in e["subset"]
    assert "revision 'v2'" in e["revision"] and oh.SPIN_ITER0_FIRST in e["revision"]
    assert f"main ({oh.SPIN_ITER0_REVISION})" in e["revision"]
    bad_rev, bad_id = out["model_errors"]
    assert oh.ZEPHYR_REVISION in bad_rev and f"main ({oh.ZEPHYR_MAIN})" in bad_rev
    assert "cached models: Qwen/Qwen2.5-0.5B-Instruct, alignment-handbook/zephyr-7b-sft-full" in bad_id
    assert out["commits"] == [oh.ZEPHYR_MAIN, oh.ZEPHYR_REVISION]
    assert out["pinned_loaded"] and out["snapshot"].endswith(oh.ZEPHYR_REVISION)


def test_cli_errors_are_one_line(offline_hub, tmp_path):
    base = ["validate", str(ROOT / "configs/zephyr-7b-ultrachat.yaml"), f"--run.dir={tmp_path / 'run'}",
            "--generation.backend=local", "--train.strategy=fsdp"]  # the recipe's zero3 needs DeepSpeed installed
    for flag, expected in [("--data.train_revision=nope", "revision 'nope' is not in the Hugging Face cache"),
                           ("--model.revision=nope", "cached revisions: main ("),
                           ("--data.eval_split=validation", "no split 'validation'")]:
        proc = _spinlm(offline_hub.env(), *base, flag)
        assert proc.returncode == 2, proc.stderr[-2000:]
        errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
        assert len(errors) == 1 and expected in errors[0] and "Traceback" not in proc.stderr, proc.stderr


def test_validate_plans_a_hub_model(offline_hub, tmp_path):
    """The recipe's own config, its Hub ids resolved offline: a memory and disk plan from the cached config and
    safetensors headers, at the commit asked for."""
    proc = _spinlm(offline_hub.env(), "validate", str(ROOT / "configs/zephyr-7b-ultrachat.yaml"),
                   f"--run.dir={tmp_path / 'run'}", "--generation.backend=local",
                   f"--model.revision={oh.ZEPHYR_REVISION}",
                   "--train.strategy=fsdp")  # the recipe says zero3; fsdp's plan needs no DeepSpeed installed
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert f"model at commit {oh.ZEPHYR_REVISION}:" in out and "(from the cached safetensors headers)" in out
    assert "memory per device (estimate; train.strategy fsdp" in out and "  training " in out
    assert "disk: unknown" not in out and "GiB needed" in out


SIZES = r"""
import json, sys
from spinlm import hub
print(json.dumps({name: hub.model_weights(name, None) for name in sys.argv[1:]}))
"""

SUBSETS = r"""
import json
from spinlm.data import load_examples
from spinlm.errors import UserError

def read(**kw):
    try:
        return [ex.real for ex in load_examples(source="acme/two", **kw)]
    except UserError as e:
        return str(e)

out = {"default": read(split="train"), "short": read(split="train", subset="short"),
       "short_test": read(split="test", subset="short"), "missing": read(split="train", subset="long"),
       "plain": [ex.real for ex in load_examples("acme/plain", split="validation")]}
try:
    load_examples("acme/bad", split="train")
except UserError as e:
    out["bad"] = str(e)
print(json.dumps(out))
"""


def test_subsets_default_naming_and_bad_rows(offline_hub, tmp_path):
    """Repositories of the test's own in a private HF_HOME: a card with two subsets, a repository without a card
    (datasets' default naming), and a bad row in a second shard."""
    cache = tmp_path / "home" / "hub"
    row = lambda text: {"prompt": f"Say {text}.", "response": text}  # noqa: E731
    card = ("---\nconfigs:\n- config_name: full\n  default: true\n  data_files:\n  - split: train\n"
            "    path: full/train-*\n"
            "- config_name: short\n  data_files:\n  - split: train\n    path: short/train-*\n  - split: test\n"
            "    path: short/test.jsonl\n---\n# two subsets\n")
    files = {"full/train-00000-of-00001.parquet": oh._parquet_bytes([row("full one"), row("full two")]),
             "short/train-00000-of-00001.parquet": oh._parquet_bytes([row("short one")]),
             "short/test.jsonl": (json.dumps(row("short test")) + "\n").encode()}
    oh.add_dataset(cache, "acme/two", oh._stand_in_sha("two"), {}, readme=card, extra_files=files)
    oh.add_dataset(cache, "acme/plain", oh._stand_in_sha("plain"), {}, readme=None, extra_files={
        "train.jsonl": (json.dumps(row("t")) + "\n").encode(), "dev.jsonl": (json.dumps(row("v")) + "\n").encode()})
    good, bad = [row("a"), row("b")], [row("c"), {"prompt": "Say d.", "response": ""}]
    oh.add_dataset(cache, "acme/bad", oh._stand_in_sha("bad"), {"train": good + bad}, shards={"train": 2})
    env = {**offline_hub.env(), "HF_HOME": str(tmp_path / "home")}
    out = _python(SUBSETS, env)
    assert out["default"] == ["full one", "full two"] and out["short"] == ["short one"]
    assert out["short_test"] == ["short test"]
    assert out["missing"] == "acme/two: no subset 'long'; it has full, short"
    assert out["plain"] == ["v"]  # dev.jsonl is the validation split, as datasets reads it
    assert "/data/train-00001-of-00002-" in out["bad"] and ".parquet, row 2, field 'response'" in out["bad"]


def test_sizes_without_weights(offline_hub, tmp_path):
    """Offline and without the weights in the cache, the parameter count is estimated from config.json; the
    estimate equals the safetensors headers' exact count for both architectures (Mistral untied, Qwen2 tied
    with q/k/v biases)."""
    exact = _python(SIZES, offline_hub.env(), oh.ZEPHYR, oh.QWEN)
    cache = tmp_path / "home" / "hub"
    for name, revision in ((oh.ZEPHYR, oh.ZEPHYR_MAIN), (oh.QWEN, oh.QWEN_REVISION)):
        snapshot = offline_hub.cache / f"models--{name.replace('/', '--')}" / "snapshots" / revision
        config_only = tmp_path / name
        shutil.copytree(snapshot, config_only, ignore=shutil.ignore_patterns("*.safetensors"))
        oh.add_model_dir(cache, name, revision, config_only)
    estimated = _python(SIZES, {**offline_hub.env(), "HF_HOME": str(tmp_path / "home")}, oh.ZEPHYR, oh.QWEN)
    for name in (oh.ZEPHYR, oh.QWEN):
        assert exact[name]["source"] == "the cached safetensors headers"
        assert estimated[name]["source"].startswith("an estimate from config.json")
        assert estimated[name]["parameters"] == exact[name]["parameters"] > 0
        assert estimated[name]["weights_bytes"] == exact[name]["weights_bytes"] == 2 * exact[name]["parameters"]
