"""`make bench` in miniature: the harness runs every peer and writes every ratio key.
Times are not asserted (benchmarks are not unit tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

KEYS = ("train_speedup_vs_trl_live", "train_speedup_vs_trl_precompute", "score_train_speedup_vs_trl_precompute",
        "train_peak_mem_ratio_vs_trl_live", "generate_speedup_vs_naive", "train_useful_flop_utilization",
        "score_train_time_ratio", "score_train_cpu_ratio", "score_train_speedup_vs_trl_live",
        "score_train_cpu_speedup_vs_trl_live")


@pytest.mark.slow
def test_bench_smoke_writes_all_ratios(tmp_path):
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "latest.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--smoke", "--threads", "1", "--work",
                           str(tmp_path / "work"), "--out", str(out)], cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    for key in KEYS:
        assert isinstance(res[key], float) and res[key] > 0, key
    assert res["tokens"]["pairs"] == 16 and res["runs"]["spinlm"][0]["steps"] == res["runs"]["trl_live"][0]["steps"]
    assert "| train: spinlm vs TRL, live reference |" in proc.stdout
    assert "| score / train time, same pairs |" in proc.stdout


@pytest.mark.slow
def test_bench_smoke_users_pairs_spinlm_only(tmp_path):
    """--pair-set users (multi-turn histories and short prompts) with --peers spinlm: the score/train ratio only."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "users.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--smoke", "--threads", "1", "--work",
                           str(tmp_path / "work"), "--out", str(out), "--pair-set", "users", "--peers", "spinlm"],
                          cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert sorted(res["runs"]) == ["spinlm"] and res["pair_set"] == "users"
    assert res["score_train_time_ratio"] > 0 and "train_speedup_vs_trl_live" not in res
    rows = [json.loads(line) for line in (tmp_path / "work" / "smoke-users" / "generations.jsonl").open()]
    assert any(len(r["prompt"]) == 7 for r in rows) and any(len(r["prompt"]) == 1 for r in rows)  # histories, short


@pytest.mark.slow
def test_vocab_bench_smoke_runs_every_peer(tmp_path):
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "vocab.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.vocab", "--smoke", "--threads", "1", "--repeats", "1",
                           "--out", str(out)], cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert sorted(res["runs"]) == ["300x128", "4096x128"]
    for runs in res["runs"].values():
        assert sorted(runs) == ["chunked", "trl", "whole"]
        assert all(r["fit"] and r["step_s"] > 0 and r["peak_rss_mb"] > 0 for r in runs.values())
        # the three peers see the same pairs (one row of at most 128 tokens) and the same model
        assert len({(r["pairs"], r["row_tokens"], r["kept_positions"], r["parameters"]) for r in runs.values()}) == 1
        assert runs["chunked"]["row_tokens"] <= 128 and runs["chunked"]["chunk_rows"] >= 1
        assert runs["whole"]["chunk_rows"] is None
        # TRL's padded batch: chosen and rejected each after its own copy of the prompt
        assert runs["trl"]["trl_completion_tokens"] == runs["trl"]["kept_positions"]
        assert runs["trl"]["trl_positions"] > runs["trl"]["row_tokens"]
    assert set(res["ratios"]["4096x128"]) == {"chunked_over_whole_time", "chunked_over_trl_peak_rss",
                                               "chunked_over_whole_peak_rss"}
    assert "| 4,096 | 128 |" in proc.stdout
