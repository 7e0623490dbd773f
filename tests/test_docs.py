"""The documentation's commands and links: every shell block in README.md and docs/ is either run by a
test, which reads the commands from the page (tests/doc_blocks.py), or says why it cannot run here."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from doc_blocks import NOT_RUN, PAGES, ROOT, RUN_BY, doc_commands, shell_blocks

from conftest import COMMON


def test_every_shell_block_is_run_by_a_test_or_says_why_not():
    problems, n = [], 0
    for page in PAGES:
        for marker, _ in shell_blocks(page):
            n += 1
            where = page.relative_to(ROOT)
            if m := RUN_BY.search(marker):
                source = (ROOT / m[1]).read_text() if (ROOT / m[1]).exists() else ""
                body = re.search(rf"\ndef {m[2]}\(.*?(?=\n(?:def |@|class )|\Z)", source, re.S)
                if body is None:
                    problems.append(f"{where}: {m[1]}::{m[2]} does not exist")
                elif "doc_commands(" not in body[0]:
                    problems.append(f"{where}: {m[1]}::{m[2]} does not read its commands with doc_commands()")
            elif not NOT_RUN.search(marker):
                problems.append(f"{where}: a ```bash block without a marker line before it: {marker!r}")
    assert n >= 10 and not problems, "\n".join(problems)


def test_the_marker_check_catches_an_unmarked_block(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("text\n```bash\nspinlm run x.yaml\n```\n<!-- commands not run in tests: GPUs -->\n```bash\n"
                    "ls\n```\n")
    markers = [marker for marker, _ in shell_blocks(page)]
    assert markers == ["text", "<!-- commands not run in tests: GPUs -->"]
    assert not NOT_RUN.search(markers[0]) and not RUN_BY.search(markers[0]) and NOT_RUN.search(markers[1])


def test_relative_links_in_the_docs_resolve():
    missing = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if not re.match(r"[a-z]+://|mailto:", target) and not (page.parent / target).exists():
                missing.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not missing, "\n".join(missing)


def test_readme_stage_commands(tiny_model, task_data, tmp_path, monkeypatch):
    """README's "One stage at a time", as written, on the tiny model and task data (sizes cut by flags)."""
    from spinlm.cli import main

    shutil.copytree(tiny_model, tmp_path / "BASE")
    for name in ("train", "val"):
        shutil.copy(task_data[name], tmp_path / f"{name}.jsonl")
    monkeypatch.chdir(tmp_path)
    commands = doc_commands("README.md", "test_readme_stage_commands")
    assert [c[:2] for c in commands] == [["spinlm", s] for s in ("sft", "generate", "score", "train", "evaluate")]
    small = {"sft": ["--sft.epochs=1"], "generate": ["--generation.max_new_tokens=8"], "train": ["--train.max_steps=2"]}
    for argv in commands:
        assert main([*argv[1:], *COMMON, *small.get(argv[1], [])]) == 0, argv
    for out in ("sft-model", "gen0.jsonl", "pairs0.jsonl", "iter0-model", "metrics.json"):
        assert (tmp_path / out).exists(), out
    assert (tmp_path / "iter0-model" / "model.safetensors").exists()


def _yaml_block(page: Path, after: str) -> str:
    """The first ```yaml block after the heading `after`."""
    text = page.read_text()
    start = text.index("```yaml\n", text.index(after)) + len("```yaml\n")
    return text[start:text.index("```", start)]


# Size only: the page's commands with fewer rows, steps, tokens and iterations, so that they run on CPU in a
# minute; what they mean (Hub ids, the revision, the splits, the stages) is unchanged.
SMALL = ["--data.max_train_rows=12", "--data.max_eval_rows=4", "--data.max_prompt_length=64", "--data.max_length=128",
         "--spin.iterations=1", "--train.max_steps=2", "--train.batch_size=4", "--generation.max_new_tokens=8",
         "--generation.batch_size=8", "--eval.batch_size=8", "--run.progress=false"]


def test_readme_own_model(offline_hub, tmp_path):
    """README's "Your own model in one page" end to end on the offline Hub (tiny stand-ins under the page's Hub
    ids): the YAML as printed, then each command: validate prints a memory and disk plan for the Hub model,
    run trains an iteration from the Hub ids, report writes its page, push prepares the model card."""
    (tmp_path / "my-run.yaml").write_text(_yaml_block(ROOT / "README.md", "## Your own model in one page"))
    cfg = yaml.safe_load((tmp_path / "my-run.yaml").read_text())
    assert cfg["model"]["name_or_path"] in offline_hub.models and cfg["data"]["train"] in offline_hub.datasets
    outputs = []
    for argv in doc_commands("README.md", "test_readme_own_model"):
        assert argv[0] == "spinlm"
        extra = SMALL if argv[1] in ("validate", "run") else []
        done = subprocess.run([sys.executable, "-m", "spinlm", *argv[1:], *extra], env=offline_hub.env(),
                              cwd=tmp_path, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, (argv, done.stderr[-3000:])
        outputs.append((argv[1], done.stdout + done.stderr))
    said = dict(outputs)
    assert "memory" in said["validate"].lower() and "disk" in said["validate"].lower()
    run = tmp_path / "runs" / "my-run"
    summary = json.loads((run / "summary.json").read_text())
    assert "iteration-0" in json.dumps(summary)
    assert (run / "iteration-0" / "model" / "model.safetensors").exists() and (run / "best").exists()
    assert (run / "report" / "README.md").exists()
    info = json.loads((run / "run_info.json").read_text())
    assert cfg["model"]["name_or_path"] in json.dumps(info)  # the Hub model's identity is recorded
