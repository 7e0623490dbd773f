"""`spinlm experiment NAME --quick`, run as a user runs it, and the KL estimator of the convergence
experiment checked by hand and against a plain unpacked computation."""

from __future__ import annotations

import itertools
import math
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from spinlm.experiment.convergence import kl_estimate
from spinlm.io import read_json, read_jsonl

pytestmark = pytest.mark.slow


def experiment(name: str, out: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spinlm", "experiment", name, "--quick", "--out", str(out), *flags],
                          capture_output=True, text=True, timeout=900)


def trained(said: str) -> bool:
    """Whether an experiment's output shows a fine-tuning started (sft.py's first line; a stage that
    was done already says "NAME: done already" instead)."""
    return re.search(r"\bsft: \d+ examples, up to \d+ steps", said) is not None


def assert_png(path: Path) -> None:
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = imread(path).shape
    assert height > 100 and width > 100


def test_kl_estimate_by_hand():
    # prompt 1: log-ratios 0.5 and 0.5 -> 0.5; prompt 2: 1.0; prompt 3 has no complete sample (skipped)
    est = kl_estimate([[-1.0, -2.0], [-0.5], []], [[-1.5, -2.5], [-1.5], []])
    assert est["kl"] == pytest.approx(0.75)
    assert est["se"] == pytest.approx(statistics.stdev([0.5, 1.0]) / math.sqrt(2))
    assert (est["prompts"], est["samples"]) == (2, 3)
    assert kl_estimate([[-3.0, -1.0]], [[-3.0, -1.0]])["kl"] == 0.0


def test_generate_keeps_the_sampled_ids(tiny_model):
    from spinlm.config import Config
    from spinlm.generation.local import generate
    from spinlm.modeling import load_model, load_tokenizer

    tok = load_tokenizer(str(tiny_model), Config().model)
    model = load_model(str(tiny_model), Config().model).eval()
    prompts = [tok("What is 2+2?", add_special_tokens=False)["input_ids"],
               tok("Hi", add_special_tokens=False)["input_ids"]]
    kept = generate(model, tok, prompts, max_new_tokens=6, batch_size=2, seeds=[1, 2], progress=False)
    for k in kept:  # the sampled ids, with the stop token that ended a complete response
        body = k["ids"][:-1] if k["finish"] == "eos" else k["ids"]
        assert len(body) == k["tokens"] and tok.decode(body, skip_special_tokens=True) == k["text"]
        assert (k["ids"][-1] == tok.eos_token_id) == (k["finish"] == "eos")


def test_loss_beta_reaches_training_and_resumes(tmp_path):
    out = tmp_path / "lb"
    proc = experiment("loss-beta", out, "--seeds", "0", "--iterations", "1", "--run.log_every=1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = read_json(out / "results.json")
    assert sorted(results["runs"]) == sorted(f"{loss}-beta{beta:g}-seed0" for loss in ("sigmoid", "hinge")
                                             for beta in (0.1, 5.0))
    for name, r in results["runs"].items():
        log = read_json(out / "runs" / name / "iteration-0" / "model" / "spinlm_train.json")
        assert log["beta"] == r["beta"]
        # step 1 runs the reference weights: the loss at a zero margin is log 2 (logistic) or 1 (hinge)
        assert log["history"][0]["step"] == 1
        assert log["history"][0]["loss"] == pytest.approx(math.log(2) if r["loss_type"] == "sigmoid" else 1.0, abs=1e-4)
        cfg = yaml.safe_load((out / "runs" / f"{name}.yaml").read_text())
        assert (cfg["spin"]["sft_weight"], cfg["train"]["eval_every"], cfg["run"]["log_every"]) == (0.0, 0, 1)
        assert [m["model"] for m in r["models"]] == ["sft", "iteration-0"]
    md = (out / "results.md").read_text()
    assert md.count("| sigmoid |") == 2 and md.count("| hinge |") == 2
    assert_png(out / "loss-beta.png")
    # re-running the same command resumes: nothing is trained again, the results are the same
    marker = out / "runs" / "hinge-beta5-seed0" / "iteration-0" / "model.done"
    before = marker.read_text()
    again = experiment("loss-beta", out, "--seeds", "0", "--iterations", "1", "--run.log_every=1")
    assert again.returncode == 0, again.stderr[-3000:]
    assert marker.read_text() == before
    assert read_json(out / "results.json") == results


def test_spin_vs_sft_baselines_take_the_iterations_steps(tmp_path):
    out = tmp_path / "sv"
    proc = experiment("spin-vs-sft", out, "--seeds", "0", "1", "--iterations", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = read_json(out / "results.json")
    assert sorted(results["seeds"]) == ["seed0", "seed1"] and not results["failed"]
    for name, r in results["seeds"].items():
        run = out / "runs" / name
        steps = [read_json(run / f"iteration-{t}" / "model" / "spinlm_train.json")["steps"] for t in range(2)]
        assert all(s > 0 for s in steps)
        cumulative = list(itertools.accumulate(steps))
        assert [row["steps"] for row in r["iterations"]] == cumulative
        for t, where in enumerate(["continued-sft-0", "continued-sft"]):
            assert read_json(run / where / "model" / "spinlm_sft.json")["steps"] == cumulative[t]
            saved = read_json(run / where / "metrics.json")["eval"]
            assert r["iterations"][t]["continued_sft"]["test_nll"] == saved["nll_per_token"]
        assert r["iterations"][1]["spin"]["test_nll"] == read_json(run / "iteration-1" / "metrics.json")["eval"][
            "nll_per_token"]
    md = (out / "results.md").read_text()
    assert "| 0 | " in md and "| 1 | " in md and "SPIN - SFT (paired)" in md
    assert_png(out / "spin-vs-sft.png")


def _plain_logps(model_dir: Path, rows: list[dict]) -> list[list[float]]:
    """Summed log-probs of every complete sample by one padded forward per sequence (no packing)."""
    from spinlm.config import Config
    from spinlm.logprobs import sequence_logps
    from spinlm.modeling import load_model, load_tokenizer

    tok = load_tokenizer(str(model_dir), Config().model)
    model = load_model(str(model_dir), Config().model, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for r in rows:
            seqs = [(r["prompt_ids"], s["ids"]) for s in r["samples"] if s["finish"] == "eos"]
            out.append(sequence_logps(model, seqs, tok.pad_token_id)[0].tolist() if seqs else [])
    return out


def test_convergence_kl_matches_a_plain_computation(tmp_path):
    out = tmp_path / "cv"
    proc = experiment("convergence", out, "--seeds", "0", "--iterations", "1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = read_json(out / "results.json")
    assert results["teacher_vs_itself"]["kl"] == 0.0
    rows = read_jsonl(out / "teacher-data" / "kl.jsonl")
    complete = [s for r in rows for s in r["samples"] if s["finish"] == "eos"]
    assert results["data"]["kl_samples"]["complete"] == len(complete) > 0
    teacher = _plain_logps(out / "teacher", rows)
    stored = [[s["teacher_logp"] for s in r["samples"] if s["finish"] == "eos"] for r in rows]
    for a, b in zip(itertools.chain(*teacher), itertools.chain(*stored)):
        assert a == pytest.approx(b, abs=1e-4)
    run = out / "runs" / "seed0"
    by_model = {m["model"]: m for m in results["runs"]["seed0"]["models"]}
    assert list(by_model) == ["sft", "iteration-0", "continued-sft"]
    for name in by_model:
        reference = kl_estimate(teacher, _plain_logps(run / name / "model", rows))
        assert by_model[name]["kl"] == pytest.approx(reference["kl"], abs=1e-4)
        assert by_model[name]["se"] == pytest.approx(reference["se"], abs=1e-4)
        assert by_model[name]["kl"] > 0  # a different model than the teacher
    # the student's SFT data are the teacher's own complete draws
    train = read_jsonl(out / "teacher-data" / "train.jsonl")
    assert len(train) == results["data"]["train"]["kept"] and all(r["response"].strip() for r in train)
    assert "Seed 0:" in (out / "results.md").read_text()
    assert_png(out / "convergence.png")


def test_bad_flags_are_refused_before_anything_runs(tmp_path):
    out = tmp_path / "bad"
    proc = experiment("loss-beta", out, "--train.learnig_rate=1")
    assert proc.returncode == 2
    assert "spinlm: error:" in proc.stderr and "train.learning_rate" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()
    proc = experiment("convergence", out, "--iterations", "0")
    assert proc.returncode == 2 and "--iterations" in proc.stderr and not out.exists()
    proc = subprocess.run([sys.executable, "-m", "spinlm", "experiment", "nope"], capture_output=True, text=True)
    assert proc.returncode == 2 and "spin-vs-sft" in proc.stderr


def test_theory_closed_form_by_hand():
    from spinlm.experiment.theory import closed_form, pair_loss

    # two responses, p_data = (1/2, 1/2), p_t = (0.8, 0.2), beta 0.5:
    # p_{t+1} ∝ 0.8 (0.5/0.8)^2, 0.2 (0.5/0.2)^2 = 0.3125, 1.25 -> (0.2, 0.8): the error flips sign
    logp_data, logp_t = torch.tensor([0.5, 0.5]).log(), torch.tensor([0.8, 0.2]).log()
    assert closed_form(logp_t, logp_data, 0.5).exp().tolist() == pytest.approx([0.2, 0.8])
    assert closed_form(logp_t, logp_data, 1.0).exp().tolist() == pytest.approx([0.5, 0.5])
    # at p = p_t every pair's margin is 0: the loss is log 2 whatever the weights
    w = torch.tensor([0.3, 0.7])
    assert float(pair_loss(logp_t, logp_t, w, w.flip(0), 0.1)) == pytest.approx(math.log(2))


@pytest.mark.parametrize("beta", [0.1, 0.5, 1.0, 2.0, 5.0])
def test_theory_closed_form_is_what_training_converges_to(beta):
    from spinlm.experiment.theory import closed_form, kl, minimise, pair_loss, problem

    prob = problem(0)
    logp_data, logp0 = prob["logp_data"], prob["logp0"]
    assert logp0.dtype == torch.float64 and kl(logp_data, logp0) > 0.05
    exact = closed_form(logp0, logp_data, beta)
    trained = minimise(logp0, logp_data.exp(), logp0.exp(), beta)  # L-BFGS on spin_loss over all pairs
    assert (trained.exp() - exact.exp()).abs().max() < 1e-6
    # and the exact optimum is a stationary point of the population loss
    theta = exact.clone().requires_grad_(True)
    pair_loss(torch.log_softmax(theta, -1), logp0, logp_data.exp(), logp0.exp(), beta).backward()
    assert theta.grad.abs().max() < 1e-9


def test_theory_quick_runs_and_resumes(tmp_path):
    out = tmp_path / "theory"
    done = experiment("theory", out, "--seeds", "0", "1", "--iterations", "3")
    assert done.returncode == 0, done.stderr[-3000:]
    results = read_json(out / "results.json")
    assert sorted(results["seeds"]) == ["0", "1"] and results["betas"] == [0.1, 1.0, 5.0]
    for kept in results["seeds"].values():
        exact = kept["table"]["1"]["exact"]
        assert len(exact) == 4 and exact[0] > 0.05 and max(exact[1:]) < 1e-12  # beta 1 lands on p_data
        overshoot = kept["table"]["0.1"]["exact"]
        assert overshoot[1] > overshoot[0] and overshoot[2] > overshoot[1]  # beta 0.1 runs away
        assert set(kept["llama"]["5"]) == {"exact from its p_0", "tiny Llama lr 0.1"}
    assert "## beta 0.1" in (out / "results.md").read_text()
    assert_png(out / "theory.png")
    stamps = {p: p.stat().st_mtime_ns for p in (out / "seeds").iterdir()}
    again = experiment("theory", out, "--seeds", "0", "1", "--iterations", "3")
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in (out / "seeds").iterdir()} == stamps  # resumed, nothing redone


def test_regime_quick_runs_and_resumes(tmp_path):
    out = tmp_path / "regime"
    done = experiment("regime", out, "--seeds", "0", "--iterations", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    results = read_json(out / "results.json")
    assert results["curve"] and all(h["heldout_nll"] > 0 for h in results["curve"])  # one point per SFT epoch
    assert len(results["curve"]) == 12
    assert sorted(results["settings"]) == ["beta1", "stabilized"] and results["chosen"] in results["settings"]
    for setting, (run,) in results["settings"].items():
        point = run["iterations"][0]
        # the baseline took exactly the steps the SPIN iteration took
        steps = read_json(out / "runs" / f"{setting}-seed0" / "iteration-0" / "model" / "spinlm_train.json")["steps"]
        assert point["steps"] == steps > 0
        assert point["spin"]["test_nll"] > 0 and point["continued_sft"]["test_nll"] > 0
    cfg = yaml.safe_load((out / "runs" / "beta1-seed0.yaml").read_text())
    assert cfg["spin"]["beta"] == 1.0 and cfg["spin"]["sft_weight"] == 0.0 and cfg["train"]["eval_every"] == 0
    assert set(results["same_capacity"]["seed0"]["kl"]) >= {"sft", "iteration-0"}
    student = read_json(out / "same-capacity" / "student-base.done")["model"]
    teacher = read_json(out / "same-capacity" / "demo" / "base.done")["model"]  # the teacher's untrained shape
    assert {**student, "seed": None} == {**teacher, "seed": None} and student["seed"] != teacher["seed"]
    text = (out / "results.md").read_text()
    assert "## 1. The SFT curve" in text and "(chosen)" in text
    assert_png(out / "regime.png")
    again = experiment("regime", out, "--seeds", "0", "--iterations", "1")
    assert again.returncode == 0, again.stderr[-3000:]
    said = again.stdout + again.stderr
    assert "running 2 spinlm runs" in said and not trained(said)  # resumed: nothing retrained


def test_family_quick_runs_every_objective_and_chooses_on_validation(tmp_path):
    """issue 19, item 4: the family experiment's machinery on the regime's tiny task: each objective's
    runs, baselines at equal steps, the choice on validation only, the table and the plot."""
    out = tmp_path / "family"
    done = experiment("family", out, "--seeds", "0", "--iterations", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    results = read_json(out / "results.json")
    assert list(results["tasks"]) == ["regime"]  # --quick: the regime's task only
    r = results["tasks"]["regime"]
    assert sorted(r["settings"]) == ["space=mu1", "spin=beta0.1", "tspin=alpha1-hist0.1"]
    for setting, (run,) in r["settings"].items():
        name = f"{setting}-seed0"
        cfg = yaml.safe_load((out / "regime" / "runs" / f"{name}.yaml").read_text())
        assert cfg["spin"]["objective"] == setting.split("=")[0] and cfg["spin"]["sft_weight"] == 0.0
        assert cfg["train"]["eval_every"] == 0
        steps = [read_json(out / "regime" / "runs" / name / f"iteration-{t}" / "model" / "spinlm_train.json")["steps"]
                 for t in range(2)]
        assert [p["steps"] for p in run["iterations"]] == [steps[0], steps[0] + steps[1]]  # baselines at equal steps
        assert all(p["continued_sft"]["test_accuracy"] is not None for p in run["iterations"])
    # continued SFT sees neither objective nor generations: the runs of a seed with the same steps share
    # one set of baselines, trained in the seed's first run (spin), none in the others
    runs = out / "regime" / "runs"
    assert sorted(p.name for p in (runs / "spin=beta0.1-seed0").glob("continued-sft*")) == \
        ["continued-sft", "continued-sft-0"]
    for setting in ("space=mu1", "tspin=alpha1-hist0.1"):
        assert not list((runs / f"{setting}-seed0").glob("continued-sft*"))
        assert [p["continued_sft"] for p in r["settings"][setting][0]["iterations"]] == \
            [p["continued_sft"] for p in r["settings"]["spin=beta0.1"][0]["iterations"]]
    # each objective's choice (one candidate each here) and the best one, from validation accuracy alone
    val = {s: rs[0]["iterations"][-1]["spin"]["val_accuracy"] for s, rs in r["settings"].items()}
    assert {o: c["setting"] for o, c in r["chosen"].items()} == {s.split("=")[0]: s for s in r["settings"]}
    assert r["best"] == max(val, key=val.get)
    history = read_json(out / "regime" / "runs" / "tspin=alpha1-hist0.1-seed0" / "iteration-1" / "model" /
                        "spinlm_train.json")["history"]
    assert any(h["terms/historical"] > 0 for h in history)  # T-SPIN's second iteration used y0
    text = (out / "results.md").read_text()
    assert "## regime" in text and "(best)" in text and f"Best objective on validation: **{r['best']}**" in text
    assert_png(out / "family.png")
    again = experiment("family", out, "--seeds", "0", "--iterations", "2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert not trained(again.stdout + again.stderr)  # resumed: nothing retrained
    assert read_json(out / "results.json") == results
