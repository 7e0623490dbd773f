"""The shipped recipes (configs/): the paper's values, docs/reproducing.md's commands valid, and the
zephyr recipes' prompt rendering equal to the one the reference code trained on.

The expected values below are the authors' (uclaml/SPIN at a12ba808: configs/config*.yaml,
scripts/finetune*.sh, issues #12 and #36; alignment-handbook 61a11a5
recipes/zephyr-7b-beta/dpo/config_full.yaml for the DPO baseline), written out here so that an edit
of a recipe that drifts from them fails. No test reads the Hub: `spinlm validate` runs on each
reproduce command on the offline Hub (tests/offline_hub.py: tiny stand-ins under the recipes' real ids).
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from doc_blocks import doc_commands, recipe_commands

from spinlm import config
from spinlm.demo.build import build_model
from spinlm.errors import UserError
from spinlm.tokens import encode_response, render_prompt_text

import offline_hub as oh
from chat_formats import FAMILIES, build_family_tokenizer

REPO = Path(__file__).resolve().parents[1]
FORMATS = REPO / "tests" / "data" / "formats"
# Where DeepSpeed is not installed, the recipes' documented alternative (their header and docs/reproducing.md).
NO_DEEPSPEED = [] if importlib.util.find_spec("deepspeed") else ["--train.strategy=fsdp"]

SPIN_ZEPHYR = {
    "model.name_or_path": "alignment-handbook/zephyr-7b-sft-full",
    "model.revision": "ac6e600eefcce74f5e8bae1035d4f66019e93190",
    "data.train": "UCLA-AGI/SPIN_iter0", "data.train_split": "train", "data.max_train_rows": None,
    "data.val": "UCLA-AGI/SPIN_iter0", "data.val_split": "test", "data.val_size": 0,
    "data.max_prompt_length": 512, "data.max_length": 1024, "data.prompt_overflow": "truncate",
    "generation.backend": "local", "generation.max_new_tokens": 256, "generation.temperature": 1.0,
    "generation.top_p": 1.0, "generation.top_k": 0,
    "spin.iterations": 4, "spin.mix_window": 2, "spin.beta": [0.1, 0.1, 0.1, 5.0], "spin.loss_type": "sigmoid",
    "spin.sft_weight": 0.0,
    "train.learning_rate": [5e-7, 5e-7, 1e-7, 1e-7], "train.optimizer": "rmsprop", "train.weight_decay": 0.0,
    "train.epochs": 2, "train.schedule_epochs": 6, "train.warmup_ratio": 0.1, "train.batch_size": 8,
    "train.gradient_accumulation_steps": 1, "train.max_grad_norm": 1.0, "train.gradient_checkpointing": True,
    "train.mixed_precision": "bf16", "train.strategy": "zero3", "train.disable_dropout": True,
    "peft.enabled": False, "run.seed": 42,
}
DPO_ZEPHYR = {
    "model.name_or_path": "alignment-handbook/zephyr-7b-sft-full",
    "model.revision": "ac6e600eefcce74f5e8bae1035d4f66019e93190",
    "data.train": "HuggingFaceH4/ultrafeedback_binarized", "data.train_split": "train_prefs",
    "data.eval_split": "test_prefs", "data.format": "trl", "data.max_prompt_length": 512, "data.max_length": 1024,
    "spin.beta": 0.1, "spin.loss_type": "sigmoid",
    "train.learning_rate": 5e-7, "train.optimizer": "rmsprop", "train.weight_decay": 0.0, "train.epochs": 3,
    "train.schedule_epochs": None, "train.warmup_ratio": 0.1, "train.batch_size": 8,
    "train.gradient_accumulation_steps": 1, "train.gradient_checkpointing": True, "train.mixed_precision": "bf16",
    "train.strategy": "zero3", "train.eval_every": 0, "peft.enabled": False, "run.seed": 42,
}


def _get(cfg, dotted: str):
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


@pytest.mark.parametrize("name, expected", [("zephyr-7b-ultrachat", SPIN_ZEPHYR), ("zephyr-7b-dpo", DPO_ZEPHYR)])
def test_zephyr_recipes_hold_the_published_values(name, expected):
    cfg = config.build(REPO / "configs" / f"{name}.yaml")
    if NO_DEEPSPEED:  # (the floor venv) the recipe's zero3 is refused for that alone
        with pytest.raises(UserError) as refused:
            config.validate(cfg)
        problems = [line for line in str(refused.value).splitlines() if line.lstrip().startswith("- ")]
        assert len(problems) == 1 and "train.strategy zero3 needs DeepSpeed" in problems[0], str(refused.value)
    else:
        config.validate(cfg)
    assert {k: _get(cfg, k) for k in expected} == expected
    text = (REPO / "configs" / f"{name}.yaml").read_text()  # the sources' commits are named
    assert "a12ba808" in text and ("61a11a5" in text or name != "zephyr-7b-dpo")


def test_spin_then_dpo_differs_from_the_dpo_recipe_only_in_start_and_epochs():
    dpo = config.build(REPO / "configs" / "zephyr-7b-dpo.yaml").to_dict()
    then = config.build(REPO / "configs" / "zephyr-7b-spin-then-dpo.yaml").to_dict()
    changed = {f"{s}.{k}" for s in dpo for k in dpo[s] if dpo[s][k] != then[s][k]}
    assert changed == {"run.dir", "model.name_or_path", "model.revision", "train.epochs"}
    assert then["model"]["name_or_path"] == "runs/zephyr-7b-spin/iteration-3/model" and then["train"]["epochs"] == 2


def test_reproduce_commands_validate_on_the_offline_hub(offline_hub, tmp_path):
    """`spinlm validate` on every torchrun command of docs/reproducing.md (read from the page, at full settings,
    planned for its --nproc_per_node processes) and on the qwen recipe's own command, on the offline Hub: the
    recipes' Hub ids and commits resolve, every row reads, exit 0. tests/test_reproduce.py runs the same commands
    scaled down; this checks them unscaled. The spin-then-dpo recipe starts from the SPIN run's iteration-3
    model: a copy of the pinned SFT model stands there."""
    commands = [c for c in doc_commands("docs/reproducing.md", "test_reproduce_commands_run_on_the_offline_hub")
                if c[0] == "torchrun"]
    commands += recipe_commands("configs/qwen2.5-0.5b-ultrachat.yaml")
    validations = []
    for argv in commands:
        args = argv[argv.index("spinlm") + 1:]
        sub, rest = args[0], args[1:]
        recipe = rest[rest.index("--config") + 1] if sub == "dpo" else rest[0]
        overrides = [a for a in rest if re.match(r"--\w+\.\w+=", a)]
        world = ["--world-size", argv[argv.index("--nproc_per_node") + 1]] if argv[0] == "torchrun" else []
        validations.append(["validate", recipe, *overrides, *world, *NO_DEEPSPEED])
    assert [v[1] for v in validations] == [f"configs/{n}.yaml" for n in ("zephyr-7b-ultrachat", "zephyr-7b-dpo",
                                                                         "zephyr-7b-spin-then-dpo",
                                                                         "qwen2.5-0.5b-ultrachat")]
    (tmp_path / "configs").symlink_to(REPO / "configs", target_is_directory=True)
    pinned = offline_hub.cache / "models--alignment-handbook--zephyr-7b-sft-full" / "snapshots" / oh.ZEPHYR_REVISION
    shutil.copytree(pinned, tmp_path / "runs" / "zephyr-7b-spin" / "iteration-3" / "model")
    # one process for the four (each validation is quick; a process's start is not)
    script = ("import json, sys\nfrom spinlm.cli import main\n"
              "print(json.dumps([main(v) for v in json.loads(sys.argv[1])]))")
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(validations)], cwd=tmp_path,
                          env=offline_hub.env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [0, 0, 0, 0], proc.stderr[-3000:]
    assert proc.stdout.count("ok: no problems found") == 4
    assert proc.stdout.count(f"model at commit {oh.ZEPHYR_REVISION}") == 2  # the pinned SFT model, twice
    assert "memory per device (estimate; train.strategy zero3, 8 processes" in proc.stdout or NO_DEEPSPEED


@pytest.fixture(scope="module")
def zephyr_like(tmp_path_factory) -> Path:
    """A tiny Llama with a Zephyr-format tokenizer (EOS `</s>`), standing in for zephyr-7b-sft-full."""
    out = tmp_path_factory.mktemp("zephyr-like")
    texts = [r["content"] for line in (FORMATS / "spin_iter.jsonl").read_text().splitlines()
             for r in json.loads(line)["real"]] * 4
    tok = build_family_tokenizer(FAMILIES["zephyr"], texts, out)
    build_model(tok, out, hidden_size=32, num_layers=2, num_heads=2, max_position_embeddings=2048)
    return out


def test_zephyr_template_renders_the_reference_codes_training_prompt(zephyr_like):
    """The recipes' chat template: the Zephyr format with an empty system turn first, the prompt the
    reference code trained on (uclaml/SPIN spin/run_spin.py inserts {"role": "system", "content": ""})."""
    from transformers import AutoTokenizer

    templates = {config.build(REPO / "configs" / f"{n}.yaml").model.chat_template
                 for n in ("zephyr-7b-ultrachat", "zephyr-7b-dpo", "zephyr-7b-spin-then-dpo")}
    assert len(templates) == 1
    tok = AutoTokenizer.from_pretrained(zephyr_like)
    tok.chat_template = templates.pop()
    user = [{"role": "user", "content": "Name three primary colors."}]
    expected = "<|system|>\n</s>\n<|user|>\nName three primary colors.</s>\n<|assistant|>\n"
    assert render_prompt_text(tok, user) == expected
    system = [{"role": "system", "content": "Be brief."}, *user]
    assert render_prompt_text(tok, system).startswith("<|system|>\nBe brief.</s>\n<|user|>\n")
    ids = encode_response(tok, user, "Red, yellow and blue.")
    assert ids[-1] == tok.eos_token_id and tok.decode(ids[:-1]).strip() == "Red, yellow and blue."
    assert tok.apply_chat_template(user + [{"role": "assistant", "content": "Red."}], tokenize=False) == \
        "<|system|>\n</s>\n<|user|>\nName three primary colors.</s>\n<|assistant|>\nRed.</s>\n"
