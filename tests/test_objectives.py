"""The SPIN family's objectives (issue 19, item 1): each formula on hand-computed values, the
identities it implies, TRL's sppo_hard as an oracle, and each one through the packed forward
equal to the plain per-sequence computation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from spinlm.cli import main
from spinlm.config import CHOICES, Config
from spinlm.io import read_json, read_jsonl
from spinlm.logprobs import sequence_logps
from spinlm.loss import (
    OBJECTIVES,
    objective,
    space_loss,
    space_terms,
    spin_loss,
    sppo_hard_loss,
    sppo_hard_terms,
    tspin_loss,
    tspin_terms,
)
from spinlm.modeling import load_model, load_tokenizer
from spinlm.packing import Layout
from spinlm.stages.score import score_files
from spinlm.stages.train import batch_losses, pair_items

from conftest import COMMON, SUBPROCESS_THREADS
from test_loss import _trl_stand_in, trl_dpo_loss

pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def log1pexp(x: float) -> float:
    return math.log(1.0 + math.exp(x))


# ---------------------------------------------------------------- SPACE

def test_space_hand_values():
    # r(y) = -1 - (-2) = 1, r(y') = -3 - (-2.5) = -0.5
    for mu in (1.0, 2.0, 0.5):
        # -log sigma_mu(1) = log(1 + mu e^-1); -mu log sigma_{1/mu}(0.5) = mu log(1 + e^-0.5 / mu)
        expected = math.log(1 + mu * math.exp(-1.0)) + mu * math.log(1 + math.exp(-0.5) / mu)
        assert space_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.5), mu=mu).item() == pytest.approx(expected, rel=1e-12)
    # at the reference both sides are at 0: log(1 + mu) + mu log(1 + 1/mu)
    assert space_loss(t(0.0), t(0.0), t(0.0), t(0.0), mu=3.0).item() == pytest.approx(
        math.log(4) + 3 * math.log(4 / 3), rel=1e-12)


def test_space_at_mu_1_is_two_separate_logistic_losses():
    g = torch.Generator().manual_seed(0)
    pr, pg, rr, rg = (-torch.rand(16, generator=g, dtype=torch.float64) * 30 for _ in range(4))
    ours = space_loss(pr, pg, rr, rg, mu=1.0)
    assert torch.allclose(ours, -F.logsigmoid(pr - rr) - F.logsigmoid(-(pg - rg)), atol=1e-12)
    # unlike SPIN's, it is not a function of the gap alone: shifting both log-ratios changes it
    assert not torch.allclose(space_loss(pr + 1, pg + 1, rr, rg), ours)
    assert torch.allclose(spin_loss(pr + 1, pg + 1, rr, rg, beta=1.0), spin_loss(pr, pg, rr, rg, beta=1.0))


@pytest.mark.parametrize("mu", [0.5, 1.0, 3.0])
def test_space_population_optimum_is_p_data(mu):
    # One prompt, 8 responses: E_{y~p_data} -log sigma_mu(r(y)) + mu E_{y'~p_t} -log sigma_1/mu(-r(y'))
    # over free logits is minimised at p_theta = p_data whatever mu (NCE); SPIN's is not (closed form).
    g = torch.Generator().manual_seed(1)
    p_data = torch.softmax(torch.randn(8, generator=g, dtype=torch.float64), -1)
    logp_t = torch.log_softmax(torch.randn(8, generator=g, dtype=torch.float64), -1)
    theta = logp_t.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([theta], max_iter=500, tolerance_grad=1e-14, tolerance_change=0.0,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logp = torch.log_softmax(theta, -1)
        k = torch.arange(8)
        real = space_loss(logp[k], logp[k], logp_t[k], logp_t[k], mu=mu)  # the real-side term per response
        real_part = F.softplus(math.log(mu) - (logp - logp_t))
        gen_part = mu * F.softplus((logp - logp_t) - math.log(mu))
        assert torch.allclose(real, real_part + gen_part)
        loss = (p_data * real_part).sum() + (logp_t.exp() * gen_part).sum()
        loss.backward()
        return loss

    opt.step(closure)
    assert (torch.softmax(theta.detach(), -1) - p_data).abs().max() < 1e-6


# ---------------------------------------------------------------- SPPO (hard labels)

def test_sppo_hard_hand_values_and_targets():
    # beta 0.25: targets +-2; r(y) = 1, r(y') = -0.5 -> (1 - 2)^2 + (-0.5 + 2)^2 = 1 + 2.25
    assert sppo_hard_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.5), beta=0.25).item() == pytest.approx(3.25, rel=1e-12)
    # at the targets the loss is 0 and its gradient vanishes
    pr = t(-2.0 + 2.0).requires_grad_(True)
    pg = t(-2.5 - 2.0).requires_grad_(True)
    loss = sppo_hard_loss(pr, pg, t(-2.0), t(-2.5), beta=0.25)
    loss.sum().backward()
    assert loss.item() == 0.0 and pr.grad.item() == 0.0 and pg.grad.item() == 0.0


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_sppo_hard_matches_trl(tmp_path, beta):
    g = torch.Generator().manual_seed(int(beta * 10))
    rr, rg = (-torch.rand(12, generator=g, dtype=torch.float64) * 50 for _ in range(2))
    pr, pg = rr + torch.randn(12, generator=g, dtype=torch.float64) * 6, rg + torch.randn(12, generator=g,
                                                                                         dtype=torch.float64) * 6
    ours = sppo_hard_loss(pr, pg, rr, rg, beta=beta)
    s = _trl_stand_in(tmp_path, beta, "sppo_hard")
    for i in range(12):
        theirs = trl_dpo_loss(s, pr[i:i + 1], pg[i:i + 1], rr[i:i + 1], rg[i:i + 1])
        assert ours[i].item() == pytest.approx(theirs.item(), rel=1e-10, abs=1e-10)


# ---------------------------------------------------------------- T-SPIN (the formula; its loop is not built)

def test_tspin_hand_values_and_beta_0():
    # y, y', y0 log-probs -1, -3, -2; alpha 0.5: cur = 1, hist = -0.5
    loss = tspin_loss(t(-1.0), t(-3.0), t(-2.0), alpha=0.5, beta=0.3).item()
    assert loss == pytest.approx(log1pexp(-1.0) + 0.3 * log1pexp(0.5), rel=1e-12)
    # beta 0: reference-free SPIN (the logistic loss on alpha times the log-prob gap)
    g = torch.Generator().manual_seed(2)
    pr, pg, ph = (-torch.rand(10, generator=g, dtype=torch.float64) * 20 for _ in range(3))
    zero = torch.zeros(10, dtype=torch.float64)
    assert torch.allclose(tspin_loss(pr, pg, ph, alpha=0.7, beta=0.0), spin_loss(pr, pg, zero, zero, beta=0.7))
    with pytest.raises(ValueError):
        tspin_loss(pr, pg, ph, alpha=0.0)


# ---------------------------------------------------------------- dispatch, config, the packed forward, a run

def _sides(pr, pg, rr, rg):
    return {"real": pr, "generated": pg}, {"real": rr, "generated": rg}


def test_the_objective_table_dispatches_to_each_loss():
    args = (t(-1.0, -4.0), t(-3.0, -2.0), t(-2.0, -3.5), t(-2.5, -2.5))
    policy, ref = _sides(*args)
    assert torch.equal(objective("spin").loss(policy, ref, beta=0.2, loss_type="hinge"),
                       spin_loss(*args, beta=0.2, loss_type="hinge"))
    assert torch.equal(objective("space").loss(policy, ref, mu=2.0), space_loss(*args, mu=2.0))
    assert torch.equal(objective("sppo_hard").loss(policy, ref, beta=0.2), sppo_hard_loss(*args, beta=0.2))
    history = t(-2.0, -1.0)
    assert torch.allclose(objective("tspin").loss({**policy, "historical": history}, None, alpha=0.5,
                                                  history_weight=0.3),
                          tspin_loss(args[0], args[1], history, alpha=0.5, beta=0.3))
    with pytest.raises(ValueError, match="objective"):
        objective("dpo")
    assert list(OBJECTIVES) == ["spin", "space", "sppo_hard", "tspin"]
    assert tuple(CHOICES["spin", "objective"]) == tuple(OBJECTIVES)  # the config accepts exactly the table's names
    assert [o.name for o in OBJECTIVES.values() if not o.needs_reference] == ["tspin"]
    assert [len(o.responses) for o in OBJECTIVES.values()] == [2, 2, 2, 3]


def test_the_table_maps_config_to_each_objectives_own_parameters():
    """Parameters under their own names: T-SPIN's alpha and history weight are never called beta or mu."""
    cfg = Config()
    cfg.spin.space_mu, cfg.spin.tspin_alpha, cfg.spin.tspin_history_weight, cfg.spin.loss_type = 2.0, 0.7, 0.3, "hinge"
    assert objective("spin").params(cfg.spin, 0.4, 1) == {"beta": 0.4, "loss_type": "hinge"}
    assert objective("space").params(cfg.spin, 0.4, 1) == {"mu": 2.0, "beta": 0.4}
    assert objective("sppo_hard").params(cfg.spin, 0.4, 1) == {"beta": 0.4}
    assert objective("tspin").params(cfg.spin, 0.4, 1) == {"alpha": 0.7, "history_weight": 0.3}
    assert objective("tspin").params(cfg.spin, 0.4, 0) == {"alpha": 0.7, "history_weight": 0.0}  # y' = y0 at t = 0


def test_objective_terms_hand_values_and_sum_to_the_loss():
    """The named terms (issue 19, item 3: what each objective moves) by hand, and their sum is the loss."""
    pr, pg, rr, rg = t(-3.0, -1.0), t(-5.0, -2.5), t(-4.0, -1.5), t(-4.5, -2.0)  # r(y) = 1, 0.5; r(y') = -0.5, -0.5
    space = objective("space").terms(*_sides(pr, pg, rr, rg), mu=2.0)
    assert list(space) == ["real", "generated"]
    assert space["real"].tolist() == pytest.approx([log1pexp(math.log(2) - 1), log1pexp(math.log(2) - 0.5)])
    assert space["generated"].tolist() == pytest.approx([2 * log1pexp(-0.5 - math.log(2))] * 2)
    sppo = objective("sppo_hard").terms(*_sides(pr, pg, rr, rg), beta=0.5)  # targets r(y) = 1, r(y') = -1
    assert (sppo["real"].tolist() == pytest.approx([0.0, 0.25])
            and sppo["generated"].tolist() == pytest.approx([0.25] * 2))
    assert list(objective("spin").terms(*_sides(pr, pg, rr, rg), beta=0.1, loss_type="sigmoid")) == ["loss"]
    for terms, loss in ((space, space_loss(pr, pg, rr, rg, mu=2.0)), (sppo, sppo_hard_loss(pr, pg, rr, rg, beta=0.5))):
        assert torch.allclose(sum(terms.values()), loss)
    assert torch.equal(space["real"], space_terms(pr, pg, rr, rg, mu=2.0)[0])
    assert torch.equal(sppo["generated"], sppo_hard_terms(pr, pg, rr, rg, beta=0.5)[1])
    current, historical = tspin_terms(pr, pg, t(-4.0, -2.5), alpha=0.5, beta=0.3)  # cur = 1, 0.75; hist = -0.5, 0
    assert current.tolist() == pytest.approx([log1pexp(-1.0), log1pexp(-0.75)])
    assert historical.tolist() == pytest.approx([0.3 * log1pexp(0.5), 0.3 * math.log(2)])
    assert torch.allclose(current + historical, tspin_loss(pr, pg, t(-4.0, -2.5), alpha=0.5, beta=0.3))


@pytest.mark.parametrize("name", ["spin", "space", "sppo_hard"])
def test_objectives_packed_equal_plain(tiny_model, pairs, name):
    cfg = Config()
    cfg.data.max_prompt_length, cfg.data.max_length = 64, 128
    tok = load_tokenizer(str(tiny_model), cfg.model)
    model = load_model(str(tiny_model), cfg.model, dtype=torch.float64)
    items = pair_items(tok, read_jsonl(pairs)[:6], cfg)
    with torch.no_grad():  # the model moved off the reference, so every objective's terms are non-trivial
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    goal = objective(name)
    params = {"spin": {"beta": 0.1, "loss_type": "sigmoid"}, "space": {"mu": 2.0, "beta": 0.1},
              "sppo_hard": {"beta": 0.1}}[name]
    packed, _ = batch_losses(model, items, tok.pad_token_id, Layout(256), goal, params)
    plain, _ = batch_losses(model, items, tok.pad_token_id, None, goal, params)
    with torch.no_grad():  # independent: per-sequence log-probs, unpacked
        real = sequence_logps(model, [(i["prompt"], i["real"]) for i in items], tok.pad_token_id)[0]
        gen = sequence_logps(model, [(i["prompt"], i["generated"]) for i in items], tok.pad_token_id)[0]
    ref = [torch.tensor([i[k] for i in items], dtype=torch.float64) for k in ("ref_real", "ref_generated")]
    loss = {"spin": lambda *a: spin_loss(*a, beta=0.1), "space": lambda *a: space_loss(*a, mu=2.0),
            "sppo_hard": lambda *a: sppo_hard_loss(*a, beta=0.1)}[name]
    expected = loss(real.double(), gen.double(), *ref)
    assert torch.allclose(packed.double(), expected, atol=1e-4, rtol=1e-4)
    assert torch.allclose(plain.double(), expected, atol=1e-4, rtol=1e-4)
    assert expected.std() > 1e-3  # the pairs differ


@pytest.mark.parametrize("objective, sft_weight", [("space", 0.0), ("sppo_hard", 0.3)])
def test_train_with_an_objective(tiny_model, pairs, tmp_path, objective, sft_weight):
    out = tmp_path / objective
    assert main(["train", "--model", str(tiny_model), "--pairs", str(pairs), "--out", str(out),
                 f"--spin.objective={objective}", "--spin.beta=0.5", "--train.batch_size=8", "--run.log_every=1",
                 f"--spin.sft_weight={sft_weight}", "--train.learning_rate=1e-3", "--train.optimizer=adamw",
                 *COMMON]) == 0
    info = read_json(out / "spinlm_train.json")
    assert info["objective"] == objective
    history, last = info["history"], info["history"][-1]
    at_reference = 2 * math.log(2) if objective == "space" else 2 * (0.5 / 0.5) ** 2  # mu 1; (1/(2 beta))^2 x 2
    assert last["loss"] - last.get("terms/nll", 0.0) < 0.9 * at_reference  # started at p_t (the scoring model)
    assert last["rewards/real"] > 0 > last["rewards/generated"]  # both sides moved the way the objective pushes
    # the diagnostics: the loss's own terms (the NLL term where sft_weight is on) sum to the logged loss
    names = {"terms/real", "terms/generated"} | ({"terms/nll"} if sft_weight else set())
    for row in history:
        assert {k for k in row if k.startswith("terms/")} == names
        assert sum(row[k] for k in names) == pytest.approx(row["loss"], rel=1e-5)
        assert row["terms/nll" if sft_weight else "terms/real"] >= 0
        assert row["logp/real_per_token"] < 0 and row["logp/generated_per_token"] < 0
    assert history[-1]["terms/generated"] < history[0]["terms/generated"]  # the generated side was pushed down


def test_objective_config_errors(tiny_model, pairs, tmp_path, capsys):
    code = main(["train", "--model", str(tiny_model), "--pairs", str(pairs), "--out", str(tmp_path / "x"),
                 "--spin.objective=space", "--spin.loss_type=hinge", *COMMON])
    assert code == 2
    err = capsys.readouterr().err
    assert "spin.loss_type hinge applies to spin.objective spin only" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- T-SPIN's loop: triplets, reference-free

def test_tspin_triplets_packed_equal_plain(tiny_model, pairs):
    cfg = Config()
    cfg.data.max_prompt_length, cfg.data.max_length = 64, 128
    cfg.spin.objective = "tspin"
    tok = load_tokenizer(str(tiny_model), cfg.model)
    model = load_model(str(tiny_model), cfg.model, dtype=torch.float64)
    rows = read_jsonl(pairs)[:6]
    for r, other in zip(rows, rows[1:] + rows[:1]):  # a historical response of another length per row
        r.update(historical=other["generated"], historical_ids=other["generated_ids"],
                 historical_finish=other["finish"])
    items = pair_items(tok, rows, cfg)
    assert all("ref_real" not in i and i["historical"] == o["generated_ids"][:len(i["historical"])]
               for i, o in zip(items, rows[1:] + rows[:1]))
    params = {"alpha": 0.5, "history_weight": 0.3}
    packed, metrics = batch_losses(model, items, tok.pad_token_id, Layout(384), objective("tspin"), params)
    plain, _ = batch_losses(model, items, tok.pad_token_id, None, objective("tspin"), params)
    with torch.no_grad():  # independent: each response on its own, unpacked
        lp = [sequence_logps(model, [(i["prompt"], i[k]) for i in items], tok.pad_token_id)[0].double()
              for k in ("real", "generated", "historical")]
    expected = tspin_loss(*lp, alpha=0.5, beta=0.3)
    assert torch.allclose(packed.double(), expected, atol=1e-4, rtol=1e-4)
    assert torch.allclose(plain.double(), expected, atol=1e-4, rtol=1e-4)
    assert torch.allclose(metrics["rewards/historical_margin"].double(), 0.5 * (lp[1] - lp[2]), atol=1e-4)


def test_tspin_history_term_weighs_only_triplets_whose_y_prime_is_not_y0(tiny_model, task_data, tmp_path):
    # Issue 29, part 4. Iteration 1 with spin.mix_window 2 trains on iteration 0's generations too, and their
    # y0 is the same row of the same file: y' = y0, a constant history term. Built here as the loop builds it
    # (generate iterations 0 and 1, then the score stage with iteration 0's file as y0), then trained on.
    gens = []
    for t in (0, 1):
        gens.append(tmp_path / f"it{t}.jsonl")
        assert main(["generate", "--model", str(tiny_model), "--data", str(task_data["train"]), "--out",
                     str(gens[-1]), "--iteration", str(t), "--generation.max_new_tokens=8",
                     "--data.max_train_rows=12", *COMMON]) == 0
    cfg = Config()
    cfg.data.max_prompt_length, cfg.data.max_length = 64, 128
    cfg.spin.objective, cfg.spin.tspin_alpha, cfg.spin.tspin_history_weight = "tspin", 0.5, 0.3
    stats = score_files(str(tiny_model), gens, tmp_path / "pairs.jsonl", cfg, historical=gens[0])
    rows = read_jsonl(tmp_path / "pairs.jsonl")
    y0 = [r["generated_ids"] == r["historical_ids"] for r in rows]
    assert 6 <= sum(y0) < len(rows)  # iteration 0's own rows: y' = y0; iteration 1's differ
    tok = load_tokenizer(str(tiny_model), cfg.model)
    model = load_model(str(tiny_model), cfg.model, dtype=torch.float64)
    goal = objective("tspin")
    params = goal.params(cfg.spin, cfg.spin.beta, 1)
    items = pair_items(tok, rows, cfg)
    losses, metrics = batch_losses(model, items, tok.pad_token_id, Layout(384), goal, params)
    # each row's history weight, read back from its term: -w log sigma(m) = w softplus(-m), m = alpha (y' - y0)
    margin = metrics["rewards/historical_margin"].double()
    weight = metrics["terms/historical"].double() / F.softplus(-margin)
    live = torch.tensor([not same for same in y0])
    assert torch.all(margin[~live] == 0) and torch.all(margin[live] != 0)
    assert torch.all(weight[~live] == 0)  # y' = y0: no history term (main: 0.3 x the constant log 2)
    assert torch.all(weight[live] > 0)
    # the configured weight per triplet that carries a history term, not diluted by the y' = y0 rows
    assert weight.sum().item() / len(rows) == pytest.approx(0.3, rel=1e-5)
    assert torch.allclose(weight[live], torch.full((int(live.sum()),), 0.3 * len(rows) / int(live.sum()),
                                                   dtype=torch.float64), rtol=1e-5)
    # so the history term's gradient is nonzero in every row it weighs: d/dm [w softplus(-m)] = -w sigma(-m)
    m = margin.clone().requires_grad_(True)
    (weight * F.softplus(-m)).sum().backward()
    assert torch.all(m.grad[live] < 0) and torch.all(m.grad[~live] == 0)
    # the rows with y' = y0 still train the current term, and the loss is the two terms
    assert torch.all(metrics["terms/current"] > 0)
    assert torch.allclose(losses.detach().double(), (metrics["terms/current"] + metrics["terms/historical"]).double())
    assert stats["generated_is_historical"] == sum(y0)


def test_tspin_rows_without_historical_are_refused(tiny_model, pairs, tmp_path, capsys):
    code = main(["train", "--model", str(tiny_model), "--pairs", str(pairs), "--out", str(tmp_path / "x"),
                 "--spin.objective=tspin", *COMMON])
    assert code == 2
    err = capsys.readouterr().err
    assert "pairs row 1" in err and "historical" in err and "Traceback" not in err


def _tspin_config(path, tiny_model, task_data, run_dir):
    import yaml

    cfg = {"run": {"dir": str(run_dir), "progress": False, "seed": 3, "deterministic": True},
           "model": {"name_or_path": str(tiny_model)},
           "data": {"train": str(task_data["train"]), "max_train_rows": 16, "val_size": 0, "max_prompt_length": 64,
                    "max_length": 128},
           "generation": {"max_new_tokens": 8, "batch_size": 8},
           "spin": {"iterations": 2, "mix_window": 2, "objective": "tspin", "tspin_history_weight": 0.5},
           "train": {"learning_rate": 1e-3, "optimizer": "adamw", "batch_size": 4, "checkpoint_every": 2},
           "eval": {"enabled": False}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def _spinlm_run(cfg, fault=None):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": SUBPROCESS_THREADS}
    env.pop("SPINLM_FAULT", None)
    if fault:
        env["SPINLM_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "spinlm", "run", str(cfg)], env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_tspin_run_keeps_y0_and_resumes_to_the_same_weights(tiny_model, task_data, tmp_path):
    import hashlib

    ref = _spinlm_run(_tspin_config(tmp_path / "ref.yaml", tiny_model, task_data, tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr[-3000:]
    it0, it1 = tmp_path / "ref" / "iteration-0", tmp_path / "ref" / "iteration-1"
    y0 = {r["id"]: r for r in read_jsonl(it0 / "generations.jsonl")}
    kept0 = {i for i, r in y0.items() if r["generated"].strip()}
    for it, sources in ((it0, [it0]), (it1, [it0, it1])):  # mix window 2: iteration 1 trains on both iterations'
        triplets = read_jsonl(it / "pairs.jsonl")
        expected = [r for s in sources for r in read_jsonl(s / "generations.jsonl")
                    if r["generated"].strip() and r["id"] in kept0]
        assert [r["id"] for r in triplets] == [r["id"] for r in expected] and len(triplets) > 12
        for r in triplets:  # the starting model's response to the same prompt, from iteration 0, unchanged
            assert r["historical_ids"] == y0[r["id"]]["generated_ids"] and "ref_real_logp" not in r
    score = read_json(it1 / "pairs.jsonl.done")
    assert score["info"]["reference_pass"] is False
    log0, log1 = (read_json(it / "model" / "spinlm_train.json") for it in (it0, it1))
    assert "logps/historical" in log1["history"][0] and "rewards/historical_margin" in log1["history"][0]
    assert log0["history"][0]["rewards/historical_margin"] == pytest.approx(0.0, abs=1e-6)  # y' = y0 at t = 0
    for row in log1["history"]:  # T-SPIN's two terms are the loss
        assert row["terms/current"] + row["terms/historical"] == pytest.approx(row["loss"], rel=1e-5)
    assert all(row["terms/historical"] == 0 for row in log0["history"])  # history weight 0 at iteration 0
    assert main(["report", str(tmp_path / "ref")]) == 0
    text = (tmp_path / "ref" / "report" / "README.md").read_text()
    table = text.split("## What each objective moved")[1].split("\n## ")[0]
    assert "| iteration-1 | tspin |" in table and "logp/historical_per_token" in table and "terms/historical" in table
    first, final = log1["history"][0]["logp/real_per_token"], log1["history"][-1]["logp/real_per_token"]
    assert f"{first:.4g} -> {final:.4g}" in table.split("| iteration-1 |")[1].splitlines()[0]
    generated_differ = any(r["generated_ids"] != y0[r["id"]]["generated_ids"]
                           for r in read_jsonl(it1 / "generations.jsonl"))
    assert generated_differ  # iteration 1's samples come from p_1, not p_0

    cfg = _tspin_config(tmp_path / "cfg.yaml", tiny_model, task_data, tmp_path / "run")
    killed = _spinlm_run(cfg, "train-step:11")  # 4 steps in iteration 0, so iteration 1's step 7 (checkpoint at 6)
    assert killed.returncode != 0
    assert not (tmp_path / "run" / "iteration-1" / "model.done").exists()
    resumed = _spinlm_run(cfg)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert digest(tmp_path / "run" / "iteration-1" / "model" / "model.safetensors") == \
        digest(it1 / "model" / "model.safetensors")
