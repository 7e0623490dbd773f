"""`spinlm report RUN`: README.md with the table, the verdict and PNG plots; model cards."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from spinlm.cli import main
from spinlm.io import read_json

pytest.importorskip("matplotlib")
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tiny_model, task_data, tmp_path_factory) -> Path:
    """A tiny 2-iteration run (SFT 1 epoch, 16 training rows, 8 new tokens)."""
    tmp = tmp_path_factory.mktemp("report")
    run = tmp / "run"
    cfg = {
        "run": {"dir": str(run), "progress": False, "seed": 5, "log_every": 1},
        "model": {"name_or_path": str(tiny_model)},
        "data": {"train": str(task_data["train"]), "eval": str(task_data["test"]), "max_train_rows": 16,
                 "max_eval_rows": 8, "max_prompt_length": 64, "max_length": 96},
        "sft": {"enabled": True, "epochs": 1, "learning_rate": 1e-3, "batch_size": 8},
        "generation": {"max_new_tokens": 8, "batch_size": 16},
        "spin": {"iterations": 2, "mix_window": 1, "beta": 0.1},
        "train": {"learning_rate": 1e-4, "epochs": 1, "batch_size": 8},
        "eval": {"checker": "spinlm.demo.task:check_example", "batch_size": 8},
    }
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", str(tmp / "cfg.yaml")]) == 0
    assert all((run / name / "model" / "README.md").exists() for name in ("sft", "iteration-0", "iteration-1"))
    return run


def _expected_verdict(summary: list[dict]) -> list[str]:
    """The verdict lines, recomputed from summary.json's numbers: the model chosen on validation (the
    start included, ties to the earlier) and the last iteration against the start, on held-out data."""
    start, iters = summary[0]["metrics"], summary[1:]
    val = [e["val_metrics"]["accuracy"] for e in summary]
    k = val.index(max(val))
    chosen = summary[k]["name"]
    lines = [f"- **Chosen on validation** (RUN/best: validation accuracy, the start included; the held-out "
             f"numbers below are reported, never used to choose): {chosen} ({val[k]:.4f} vs the start's {val[0]:.4f})."]
    for key, label, higher, fmt in (("accuracy", "Task accuracy", True, ".3f"),
                                    ("nll_per_token", "NLL per token", False, ".4f")):
        parts = []
        for what, e in ((f"chosen on validation ({chosen}{', the start itself' if k == 0 else ''})", summary[k]),
                        (f"last iteration ({iters[-1]['name']})", iters[-1])):
            v = e["metrics"][key]
            better = v > start[key] if higher else v < start[key]
            parts.append(f"{what} {format(v, fmt)} ({format(v - start[key], '+' + fmt)}: "
                         f"{'improved' if better else 'no improvement'})")
        lines.append(f"- **{label}** (held-out, {'higher' if higher else 'lower'} is better): SFT start "
                     f"{format(start[key], fmt)}; {parts[0]}; {parts[1]}.")
    return lines


def test_report_readme_plots_and_verdict(run_dir, capsys):
    assert main(["report", str(run_dir)]) == 0
    readme = run_dir / "report" / "README.md"
    assert f"wrote {readme}" in capsys.readouterr().out
    text = readme.read_text()
    summary = read_json(run_dir / "summary.json")
    assert [e["name"] for e in summary] == ["sft", "iteration-0", "iteration-1"]
    for line in _expected_verdict(summary):
        assert line in text, line
    assert "| iteration-1 |" in text and "| model | accuracy | NLL/token |" in text
    moved = text.split("## What each objective moved")[1].split("\n## ")[0]  # issue 19, item 3
    history = read_json(run_dir / "iteration-1" / "model" / "spinlm_train.json")["history"]
    row = next(line for line in moved.splitlines() if line.startswith("| iteration-1 | spin |"))
    assert f"{history[0]['logp/real_per_token']:.4g} -> {history[-1]['logp/real_per_token']:.4g}" in row
    assert "terms/" not in moved  # SPIN's loss is one term of the margin

    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert set(images) == {"metrics.png", "training.png", "sft.png"}
    for link in re.findall(r"(?<!!)\[[^\]]*\]\(([^)]+)\)", text) + images:  # every link resolves
        assert (readme.parent / link).exists(), link
    import matplotlib.image

    for name in images:
        path = readme.parent / name
        assert path.read_bytes()[:8] == PNG, name
        pixels = matplotlib.image.imread(path)
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100, name


def test_model_cards(run_dir):
    assert main(["report", str(run_dir)]) == 0
    summary = {e["name"]: e["metrics"] for e in read_json(run_dir / "summary.json")}
    for name in ("sft", "iteration-0", "iteration-1"):
        card = (run_dir / name / "model" / "README.md").read_text()
        _, front, body = card.split("---\n", 2)
        meta = yaml.safe_load(front)
        assert meta["library_name"] == "transformers"
        assert meta["tags"] == ["spinlm", "spin", "self-play", "self-play-fine-tuning"]
        assert meta["pipeline_tag"] == "text-generation" and "license" not in meta  # the tiny model has no card
        assert "base_model" not in meta  # the run started from a local directory, not a Hub id
        assert f"| nll_per_token | {summary[name]['nll_per_token']:.4g} |" in body
        assert f"| accuracy | {summary[name]['accuracy']:.4g} |" in body
        assert "```yaml" in body and "max_train_rows: 16" in body
    card1 = (run_dir / "iteration-1" / "model" / "README.md").read_text()
    assert "Iteration 1 of" in card1 and str(run_dir / "iteration-0" / "model") in card1
    assert "| beta | 0.1 |" in card1 and "spin:" in card1


def test_report_custom_out_dir(run_dir, tmp_path):
    out = tmp_path / "elsewhere"
    assert main(["report", str(run_dir), "--out", str(out)]) == 0
    text = (out / "README.md").read_text()
    for link in re.findall(r"\]\(([^)]+)\)", text):
        assert (out / link).exists(), link


def test_bad_run_dirs_exit_2(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    run = tmp_path / "run"
    run.mkdir()
    assert main(["report", str(run)]) == 2
    assert f"{run / 'config.yaml'}: not found" in capsys.readouterr().err
    (run / "config.yaml").write_text("spin: {iterations: 1}\n")
    (run / "summary.json").write_text('[{"name": "sft", "metr')
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"{run / 'summary.json'}: cannot be read as JSON" in err and "Traceback" not in err
    (run / "summary.json").write_text('{"name": "sft"}')
    assert main(["report", str(run)]) == 2
    assert "expected a list of entries" in capsys.readouterr().err


def test_missing_matplotlib_is_a_user_error(run_dir, monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert main(["report", str(run_dir)]) == 2
    assert "pip install 'spinlm[report]'" in capsys.readouterr().err


def test_help_of_report_and_lm_eval(capsys):
    for cmd, words in (("report", ("RUN_DIR", "--out")), ("lm-eval", ("--preset", "--tasks", "--include-path"))):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        assert all(w in text for w in words), cmd


def _entry(name: str, test: float, val: float | None, nll: float = 0.2) -> dict:
    return {"name": name, "model": name, "metrics": {"accuracy": test, "nll_per_token": nll},
            "val_metrics": {"accuracy": val} if val is not None else {}}


def test_verdict_compares_the_model_chosen_on_validation_never_a_max_over_test():
    """Validation prefers iteration-0, the held-out (test) split iteration-1: the verdict reports
    iteration-0's gain, the choice RUN/best makes, and calls no model "best" by its test numbers.
    (Before: it reported iteration-1's gain as the "best iteration", a choice made on test.)"""
    from spinlm.report.report import verdict
    from spinlm.summary import select_best

    entries = [_entry("sft", 0.5, 0.90), _entry("iteration-0", 0.6, 0.95), _entry("iteration-1", 0.8, 0.91),
               _entry("iteration-2", 0.7, 0.92)]
    assert select_best(entries)["name"] == "iteration-0"
    text = "\n".join(verdict(entries))
    assert "chosen on validation (iteration-0) 0.600 (+0.100: improved)" in text
    assert "Chosen on validation** (RUN/best: validation accuracy" in text and "iteration-0 (0.9500 vs" in text
    assert "iteration-1" not in text and "0.800" not in text  # the test maximum enters nowhere
    assert "last iteration (iteration-2) 0.700 (+0.200: improved)" in text
    assert not re.search(r"\bbest\b(?!\))", text.replace("RUN/best", ""))  # "best" only as RUN/best
    # validation prefers the start: no improvement, whatever the test split says
    entries[0]["val_metrics"]["accuracy"] = 0.99
    text = "\n".join(verdict(entries))
    assert "chosen on validation (sft, the start itself) 0.500 (+0.000: no improvement)" in text
    # without validation data nothing is chosen, and the test split does not stand in for it
    text = "\n".join(verdict([_entry("sft", 0.5, None), _entry("iteration-0", 0.6, None),
                               _entry("iteration-1", 0.8, None), _entry("iteration-2", 0.7, None)]))
    assert "No model was chosen" in text and "iteration-1" not in text


def test_continued_sft_is_the_baseline_not_an_iteration(tmp_path):
    """A run with eval.continued_sft (the demo's): the verdict compares iterations only and names the
    baseline on lines of its own, chosen on validation as RUN/best is (the start included: a baseline
    below the start on validation gives way to it, as an iteration does); its model card says what it is."""
    from spinlm.report.cards import card_text
    from spinlm.report.report import verdict

    entries = [_entry("sft", 0.5, 0.90, 0.3), _entry("iteration-0", 0.6, 0.95), _entry("continued-sft", 0.9, 0.93, 0.1)]
    lines = verdict(entries)
    assert "last iteration (iteration-0) 0.600 (+0.100: improved)" in lines[1]
    assert "continued-sft" not in "".join(lines[:3])
    assert lines[3].startswith("- **Continued SFT at equal steps** (the baseline, not an iteration; selected on "
                               "validation as SPIN's iterations are")
    assert lines[3].endswith("task accuracy 0.900, nll per token 0.1000. Validation accuracy 0.9300 vs the start's "
                             "0.9000, so the choice RUN/best makes keeps it.")
    assert lines[4] == ("- **SPIN's choice vs the baseline's** (both chosen on validation, the start included: "
                        "iteration-0 vs continued-sft): task accuracy 0.600 vs 0.900 (SPIN behind); nll per token "
                        "0.2000 vs 0.1000 (SPIN behind).")
    entries[2]["val_metrics"]["accuracy"] = 0.85  # below the start on validation: the start stands for it
    lines = verdict(entries)
    assert lines[3].endswith("so the choice RUN/best makes keeps the start.")
    assert "iteration-0 vs sft): task accuracy 0.600 vs 0.500 (SPIN ahead)" in lines[4]
    run = {"dir": tmp_path, "config": {"model": {"name_or_path": "base"}, "data": {"train": "t.jsonl"}},
           "models": [{"name": "sft", "model": tmp_path / "sft" / "model"}]}
    card = card_text(run, {"name": "continued-sft", "train": {"steps": 783}, "metrics": {"accuracy": 0.9}})
    assert "fine-tuned further on the real responses (continued SFT) for 783 optimizer steps" in card
