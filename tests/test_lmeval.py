"""`spinlm lm-eval`: a local lm-eval task on the tiny model, offline; the presets name real tasks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from spinlm.cli import main

pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def task_manager():
    from lm_eval.tasks import TaskManager

    return TaskManager()  # indexing lm-eval's task YAML files takes a few seconds: once


@pytest.fixture
def local_task(tmp_path) -> Path:
    """A 5-row multiple-choice task over a local JSONL file, in its own include directory."""
    rows = [{"question": f"Which colour is number {i}?", "choices": ["red", "green", "blue"], "label": i % 3}
            for i in range(5)]
    data = tmp_path / "colours.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for name in ("spinlm_colours", "spinlm_colours_b"):  # two tasks: run with two shot counts
        (tasks / f"{name}.yaml").write_text(
            f"task: {name}\n"
            "dataset_path: json\n"
            f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
            "output_type: multiple_choice\n"
            "test_split: test\n"
            "fewshot_split: test\n"
            'doc_to_text: "{{question}}"\n'
            'doc_to_choice: "{{choices}}"\n'
            "doc_to_target: label\n"
            "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
            "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n")
    return tasks


def test_local_tasks_offline(tiny_model, local_task, tmp_path, capsys, monkeypatch):
    """Two local tasks with different shot counts: one simple_evaluate call each, one model load."""
    from spinlm.eval import lmeval

    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["HF_DATASETS_OFFLINE"] == "1"
    calls, run_group = [], lmeval.run_group

    def recording(lm, manager, benches, shots, *rest):
        calls.append(([b.task for b in benches], shots))
        return run_group(lm, manager, benches, shots, *rest)

    monkeypatch.setattr(lmeval, "run_group", recording)
    out = tmp_path / "results.json"
    args = ["lm-eval", "--model", str(tiny_model), "--tasks", "spinlm_colours:0,spinlm_colours_b:1",
            "--include-path", str(local_task), "--limit", "4", "--batch-size", "4", "--out", str(out)]
    assert main(args) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert calls == [(["spinlm_colours"], 0), (["spinlm_colours_b"], 1)]
    results = json.loads(out.read_text())
    assert set(results["tasks"]) == {"spinlm_colours", "spinlm_colours_b"}
    for name, shots in (("spinlm_colours", 0), ("spinlm_colours_b", 1)):
        task = results["tasks"][name]
        assert task["metric"] == "acc" and task["num_fewshot"] == shots and task["samples"] == 4  # the first metric
        assert 0.0 <= task["value"] <= 1.0
        assert task["stderr"] is None or task["stderr"] >= 0
    assert results["lm_eval_results"]["spinlm_colours_b"]["acc_norm,none"] is not None
    assert results["average"] == pytest.approx(sum(t["value"] for t in results["tasks"].values()) / 2)
    assert results["lm_eval_version"] and results["preset"] is None


def test_presets_name_registered_tasks(task_manager):
    from spinlm.eval.lmeval import PRESETS, check_tasks

    known = set(task_manager.all_tasks)
    for name, benches in PRESETS.items():
        missing = [b.task for b in benches if b.task not in known]
        assert not missing, (name, missing)
        check_tasks(task_manager, benches)
    paper = {b.task: (b.shots, b.metric) for b in PRESETS["open_llm"]}
    assert paper == {"arc_challenge": (25, "acc_norm"), "truthfulqa_mc2": (0, "acc"), "winogrande": (5, "acc"),
                     "gsm8k": (5, "exact_match"), "hellaswag": (10, "acc_norm"), "mmlu": (5, "acc")}


def test_user_errors(tiny_model, tmp_path, capsys):
    out = str(tmp_path / "r.json")
    assert main(["lm-eval", "--model", str(tiny_model), "--out", out]) == 2
    assert "either --preset or --tasks" in capsys.readouterr().err
    assert main(["lm-eval", "--model", str(tiny_model), "--preset", "leaderboard", "--out", out]) == 2
    assert "open_llm" in capsys.readouterr().err
    assert main(["lm-eval", "--model", str(tmp_path / "nope"), "--preset", "open_llm", "--out", out]) == 2
    assert "no such model directory" in capsys.readouterr().err
    assert main(["lm-eval", "--model", str(tiny_model), "--tasks", "arc_chalenge", "--out", out]) == 2
    assert "did you mean 'arc_challenge'" in capsys.readouterr().err
    assert not Path(out).exists()


def test_missing_lm_eval_is_a_user_error(tiny_model, tmp_path, monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError("No module named 'lm_eval'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    assert main(["lm-eval", "--model", str(tiny_model), "--preset", "open_llm", "--out", str(tmp_path / "r")]) == 2
    assert "pip install 'spinlm[lmeval]'" in capsys.readouterr().err


def test_preset_runs_with_the_papers_harness_settings(tiny_model, local_task, tmp_path, monkeypatch):
    """A preset's own settings reach lm-eval: the paper's stop strings for a generating task (applied by
    lm-eval itself, merged into the task's), and the hf backend without a BOS token (46c7966's behaviour)."""
    from spinlm.eval import lmeval

    data = tmp_path / "sums.jsonl"
    data.write_text("".join(json.dumps({"question": f"{i} plus 1?", "answer": str(i + 1)}) + "\n" for i in range(4)))
    (local_task / "spinlm_sums.yaml").write_text(
        "task: spinlm_sums\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "output_type: generate_until\ntest_split: test\nfewshot_split: test\n"
        'doc_to_text: "Q: {{question}}\\nA:"\ndoc_to_target: "{{answer}}"\n'
        'generation_kwargs:\n  until: ["Q:"]\n  max_gen_toks: 4\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    monkeypatch.setitem(lmeval.PRESETS, "tiny", [
        lmeval.Benchmark("spinlm_colours", 1, "acc"),
        lmeval.Benchmark("spinlm_sums", 1, "exact_match", until=("\n\n", "Question:"))])
    loaded, load_lm = [], lmeval.load_lm
    monkeypatch.setattr(lmeval, "load_lm", lambda *a: loaded.append(load_lm(*a)) or loaded[-1])
    s = lmeval.lm_eval_run(str(tiny_model), tmp_path / "r.json", preset="tiny", limit=2,
                           include_path=str(local_task), batch_size="2")
    applied = s["generation_kwargs"]["spinlm_sums"]
    assert applied["until"] == ["\n\n", "Question:"] and applied["max_gen_toks"] == 4  # updated, not replaced
    assert "spinlm_colours" not in s["generation_kwargs"] and set(s["tasks"]) == {"spinlm_colours", "spinlm_sums"}
    assert s["model_args"] == {"add_bos_token": False} and loaded[0].add_bos_token is False
    assert s["harness_of_the_paper"].startswith("lm-evaluation-harness 46c796644913")
    assert s["apply_chat_template"] is False


def test_open_llm_preset_pins_gsm8k_stops():
    from spinlm.eval.lmeval import PAPER_MODEL_ARGS, PRESETS

    gsm8k = next(b for b in PRESETS["open_llm"] if b.task == "gsm8k")
    assert gsm8k.until == ("\n\n", "Question:") and gsm8k.filter == "strict-match"
    assert all(b.until is None for b in PRESETS["open_llm"] if b.task != "gsm8k")
    assert PAPER_MODEL_ARGS == {"add_bos_token": False}
