"""spinlm.loss: hand-computed values, gradients, shapes, errors, and TRL 1.16's DPO loss as an oracle.

SPIN (Chen et al. 2024, Eq. 4.7) with real = chosen and generated = rejected is DPO's loss:
    r_real = log p_theta(y|x)  - log p_t(y|x)
    r_gen  = log p_theta(y'|x) - log p_t(y'|x)
    u      = beta * (r_real - r_gen)
    sigmoid: log(1 + exp(-u));  hinge: max(0, 1 - u)
"""

from __future__ import annotations

import math
import types
from collections import defaultdict

import pytest
import torch
import trl
from trl import DPOConfig
from trl.trainer.dpo_trainer import DPOTrainer

from spinlm.loss import LOSS_TYPES, spin_loss, spin_rewards

# DPOConfig (a TrainingArguments) warns about a transformers rename; not ours.
pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def loss1(pr, pg, rr, rg, beta, loss_type):
    """spin_loss on one pair given as Python floats; returns a float."""
    out = spin_loss(t(pr), t(pg), t(rr), t(rg), beta=beta, loss_type=loss_type)
    assert out.shape == (1,)
    return out.item()


def softplus_neg(u: float) -> float:
    """log(1 + exp(-u)), the logistic loss, with plain `math`."""
    return math.log(1.0 + math.exp(-u))


# ---------------------------------------------------------------- hand-computed values


def test_sigmoid_hand_value_positive_margin():
    # pr=-1, pg=-3, rr=-2, rg=-2.5
    # r_real = -1.0 - (-2.0) = 1.0 ; r_gen = -3.0 - (-2.5) = -0.5 ; r_real - r_gen = 1.5
    # beta = 0.1 -> u = 0.15 -> loss = log(1 + exp(-0.15)) ~= 0.62096
    expected = math.log(1.0 + math.exp(-0.15))
    assert loss1(-1.0, -3.0, -2.0, -2.5, 0.1, "sigmoid") == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(0.62095705, abs=1e-7)  # the number itself, independently of the formula


def test_sigmoid_hand_value_several_betas():
    # Same pair, delta = r_real - r_gen = 1.5
    for beta in (0.01, 0.1, 0.5, 1.0, 2.0, 10.0):
        u = beta * 1.5
        assert loss1(-1.0, -3.0, -2.0, -2.5, beta, "sigmoid") == pytest.approx(softplus_neg(u), rel=1e-12), beta
    # Larger beta with a positive margin -> smaller loss (monotone decreasing in u).
    losses = [loss1(-1.0, -3.0, -2.0, -2.5, b, "sigmoid") for b in (0.01, 0.1, 1.0, 10.0)]
    assert losses == sorted(losses, reverse=True)
    assert losses[-1] < 1e-6  # u = 15 -> log(1 + e^-15) ~= 3.06e-7


def test_sigmoid_hand_value_negative_margin():
    # pr=-4, pg=-1, rr=-3, rg=-2
    # r_real = -4 - (-3) = -1 ; r_gen = -1 - (-2) = 1 ; delta = -2
    # beta = 0.5 -> u = -1 -> loss = log(1 + e) ~= 1.3133 (> log 2: the model prefers its own output)
    expected = math.log(1.0 + math.e)
    got = loss1(-4.0, -1.0, -3.0, -2.0, 0.5, "sigmoid")
    assert got == pytest.approx(expected, rel=1e-12)
    assert got == pytest.approx(1.31326169, abs=1e-7)
    assert got > math.log(2)
    # beta = 0.25 -> u = -0.5
    assert loss1(-4.0, -1.0, -3.0, -2.0, 0.25, "sigmoid") == pytest.approx(math.log(1 + math.exp(0.5)), rel=1e-12)


def test_sigmoid_is_log2_at_reference():
    # policy == reference -> r_real = r_gen = 0 -> u = 0 -> log(1 + 1) = log 2, for every beta
    for beta in (0.01, 0.1, 1.0, 5.0):
        out = spin_loss(t(-3.0, -10.0, 0.0), t(-7.5, -1.0, -2.0), t(-3.0, -10.0, 0.0), t(-7.5, -1.0, -2.0),
                        beta=beta, loss_type="sigmoid")
        assert torch.allclose(out, torch.full((3,), math.log(2), dtype=torch.float64), rtol=0, atol=1e-15)


def test_sigmoid_only_depends_on_ratio_difference():
    # Shifting both log-ratios by the same amount leaves u unchanged.
    # r_real = 0.5 + 2, r_gen = -0.25 + 2 -> delta = 0.75, beta = 0.4 -> u = 0.3
    a = loss1(-1.5, -2.25, -4.0, -4.0, 0.4, "sigmoid")  # r_real = 2.5, r_gen = 1.75
    b = loss1(-1.5, -2.25, -2.0, -2.0, 0.4, "sigmoid")  # r_real = 0.5, r_gen = -0.25
    assert a == pytest.approx(softplus_neg(0.3), rel=1e-12)
    assert b == pytest.approx(softplus_neg(0.3), rel=1e-12)


def test_sigmoid_is_numerically_stable_for_large_margins():
    # u = 0.1 * (+-10000): naive log(1 + exp(-u)) overflows; -logsigmoid does not.
    out = spin_loss(t(0.0, 0.0), t(-10000.0, 10000.0), t(0.0, 0.0), t(0.0, 0.0), beta=0.1, loss_type="sigmoid")
    assert torch.isfinite(out).all()
    assert out[0].item() == pytest.approx(0.0, abs=1e-300)  # u = +1000
    assert out[1].item() == pytest.approx(1000.0, rel=1e-12)  # u = -1000 -> loss ~= -u


def test_hinge_hand_values():
    # Pair A: delta = 1.5 (see above).
    # beta = 0.1 -> u = 0.15 -> max(0, 1 - 0.15) = 0.85
    assert loss1(-1.0, -3.0, -2.0, -2.5, 0.1, "hinge") == pytest.approx(0.85, rel=1e-12)
    # beta = 0.5 -> u = 0.75 -> 0.25
    assert loss1(-1.0, -3.0, -2.0, -2.5, 0.5, "hinge") == pytest.approx(0.25, rel=1e-12)
    # beta = 2.0 -> u = 3.0 > 1 -> 0 (margin satisfied)
    assert loss1(-1.0, -3.0, -2.0, -2.5, 2.0, "hinge") == 0.0
    # Pair B: delta = -2; beta = 0.5 -> u = -1 -> 1 - (-1) = 2
    assert loss1(-4.0, -1.0, -3.0, -2.0, 0.5, "hinge") == pytest.approx(2.0, rel=1e-12)
    # beta = 3.0 -> u = -6 -> 7
    assert loss1(-4.0, -1.0, -3.0, -2.0, 3.0, "hinge") == pytest.approx(7.0, rel=1e-12)
    # policy == reference -> u = 0 -> 1
    assert loss1(-5.0, -6.0, -5.0, -6.0, 0.3, "hinge") == pytest.approx(1.0, rel=1e-12)
    # exactly u = 1: delta = 2 (r_real = 1, r_gen = -1), beta = 0.5 -> 0
    assert loss1(0.0, -2.0, -1.0, -1.0, 0.5, "hinge") == pytest.approx(0.0, abs=1e-15)


def test_hinge_zero_for_every_u_above_one():
    delta = torch.linspace(2.5, 50.0, 20, dtype=torch.float64)  # beta = 0.5 -> u in [1.25, 25]
    zeros = torch.zeros(20, dtype=torch.float64)
    out = spin_loss(delta, zeros, zeros, zeros, beta=0.5, loss_type="hinge")
    assert torch.equal(out, zeros)


def test_default_is_sigmoid_with_beta_01():
    # defaults: beta=0.1, loss_type="sigmoid"; delta = 1.5 -> u = 0.15
    out = spin_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.5))
    assert out.item() == pytest.approx(softplus_neg(0.15), rel=1e-12)


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("beta", [0.05, 0.1, 1.0, 3.0])
def test_gradient_at_reference_is_half_beta(beta):
    # d/d pr [-logsigmoid(beta*(pr - rr - pg + rg))] = -beta * sigmoid(-u) = -beta/2 at u = 0; +beta/2 for pg.
    pr = t(-3.0, -12.0).requires_grad_()
    pg = t(-4.0, -1.5).requires_grad_()
    rr = t(-3.0, -12.0).requires_grad_()
    rg = t(-4.0, -1.5).requires_grad_()
    loss = spin_loss(pr, pg, rr, rg, beta=beta, loss_type="sigmoid")
    assert loss.requires_grad
    loss.sum().backward()
    half = torch.full((2,), beta / 2, dtype=torch.float64)
    assert torch.allclose(pr.grad, -half, rtol=1e-12, atol=0)
    assert torch.allclose(pg.grad, half, rtol=1e-12, atol=0)
    # The reference terms enter with opposite signs (they are constants in training).
    assert torch.allclose(rr.grad, half, rtol=1e-12, atol=0)
    assert torch.allclose(rg.grad, -half, rtol=1e-12, atol=0)


def test_gradient_away_from_reference_matches_formula():
    # u = beta * delta with beta = 0.5, delta = 1.5 -> u = 0.75 ; d loss/d pr = -beta * sigmoid(-u)
    pr = t(-1.0).requires_grad_()
    pg = t(-3.0).requires_grad_()
    spin_loss(pr, pg, t(-2.0), t(-2.5), beta=0.5, loss_type="sigmoid").sum().backward()
    s = 1.0 / (1.0 + math.exp(0.75))
    assert pr.grad.item() == pytest.approx(-0.5 * s, rel=1e-12)
    assert pg.grad.item() == pytest.approx(0.5 * s, rel=1e-12)


def test_hinge_gradient():
    # Active region (u = 0 < 1): d/d pr = -beta, d/d pg = +beta. Satisfied region (u = 3 > 1): zero gradient.
    pr = t(-2.0, -1.0).requires_grad_()
    pg = t(-2.0, -3.0).requires_grad_()
    rr = t(-2.0, -2.0)
    rg = t(-2.0, -2.5)
    beta = 2.0  # pair 0: u = 0; pair 1: delta = 1.5, u = 3
    spin_loss(pr, pg, rr, rg, beta=beta, loss_type="hinge").sum().backward()
    assert pr.grad.tolist() == pytest.approx([-beta, 0.0], abs=1e-15)
    assert pg.grad.tolist() == pytest.approx([beta, 0.0], abs=1e-15)


def test_per_pair_gradients_are_independent():
    # Not reduced: the gradient of loss[i] touches only pair i.
    g = torch.Generator().manual_seed(0)
    pr, pg, rr, rg = (torch.randn(4, generator=g, dtype=torch.float64) * 5 for _ in range(4))
    pr.requires_grad_()
    loss = spin_loss(pr, pg, rr, rg, beta=0.3)
    (grad,) = torch.autograd.grad(loss[2], pr)
    assert grad[2].item() != 0.0
    assert torch.count_nonzero(grad).item() == 1


# ---------------------------------------------------------------- shape and errors


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_shape_is_batch_and_not_reduced(loss_type):
    g = torch.Generator().manual_seed(1)
    pr, pg, rr, rg = (torch.randn(7, generator=g, dtype=torch.float64) * 3 for _ in range(4))
    out = spin_loss(pr, pg, rr, rg, beta=0.2, loss_type=loss_type)
    assert out.shape == (7,)
    assert out.dtype == torch.float64
    for i in range(7):  # each entry is that pair's own loss
        single = spin_loss(pr[i:i + 1], pg[i:i + 1], rr[i:i + 1], rg[i:i + 1], beta=0.2, loss_type=loss_type)
        assert out[i].item() == pytest.approx(single.item(), rel=1e-12)


def test_loss_types_are_exactly_sigmoid_and_hinge():
    assert set(LOSS_TYPES) == {"sigmoid", "hinge"}


@pytest.mark.parametrize("bad", ["ipo", "Sigmoid", "", "logistic", ["sigmoid"]])
def test_invalid_loss_type_raises(bad):
    with pytest.raises(ValueError, match="loss_type"):
        spin_loss(t(-1.0), t(-2.0), t(-1.0), t(-2.0), beta=0.1, loss_type=bad)


@pytest.mark.parametrize("beta", [0.0, -0.1, -5.0])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_non_positive_beta_raises(beta, loss_type):
    with pytest.raises(ValueError, match="beta"):
        spin_loss(t(-1.0), t(-2.0), t(-1.0), t(-2.0), beta=beta, loss_type=loss_type)


# ---------------------------------------------------------------- spin_rewards


def test_rewards_hand_values():
    # beta = 0.5
    # pair 0: pr=-1, rr=-2 -> real = 0.5*1 = 0.5 ; pg=-3, rg=-2.5 -> gen = 0.5*(-0.5) = -0.25 ; margin 0.75 -> acc 1
    # pair 1: pr=-4, rr=-3 -> real = -0.5 ; pg=-1, rg=-2 -> gen = 0.5 ; margin -1.0 -> acc 0
    # pair 2: policy == reference -> 0, 0, margin 0 -> acc 0 (a tie is not a win)
    r = spin_rewards(t(-1.0, -4.0, -6.0), t(-3.0, -1.0, -7.0), t(-2.0, -3.0, -6.0), t(-2.5, -2.0, -7.0), beta=0.5)
    assert set(r) == {"real", "generated", "margin", "accuracy"}
    assert r["real"].tolist() == pytest.approx([0.5, -0.5, 0.0], abs=1e-15)
    assert r["generated"].tolist() == pytest.approx([-0.25, 0.5, 0.0], abs=1e-15)
    assert r["margin"].tolist() == pytest.approx([0.75, -1.0, 0.0], abs=1e-15)
    assert r["accuracy"].tolist() == [1.0, 0.0, 0.0]
    assert r["accuracy"].is_floating_point()
    for v in r.values():
        assert v.shape == (3,)


def test_reward_margin_is_the_loss_argument():
    # margin == u, so sigmoid loss = -logsigmoid(margin) and hinge = relu(1 - margin).
    g = torch.Generator().manual_seed(2)
    pr, pg, rr, rg = (torch.randn(16, generator=g, dtype=torch.float64) * 10 for _ in range(4))
    for beta in (0.05, 0.7):
        m = spin_rewards(pr, pg, rr, rg, beta=beta)["margin"]
        assert torch.allclose(spin_loss(pr, pg, rr, rg, beta, "sigmoid"), -torch.nn.functional.logsigmoid(m))
        assert torch.allclose(spin_loss(pr, pg, rr, rg, beta, "hinge"), torch.relu(1 - m))


# ---------------------------------------------------------------- TRL 1.16 as an oracle
#
# TRL 1.16 has no standalone `dpo_loss`: the loss maths sits inside `DPOTrainer._compute_loss(model, inputs,
# return_outputs)`, after the model forward. We call it unbound on a stand-in carrying only the attributes it
# reads (copied from a real `DPOConfig`, exactly as `DPOTrainer.__init__` copies them), with
# `precompute_ref_log_probs=True` so the reference log-probs come from `inputs`, and a stand-in model whose
# per-token log-probs are a single completion token holding each sequence's summed log-prob. The batch is
# [chosen..., rejected...] as TRL's collator builds it. What runs is TRL's own code from the log-ratios on.


class _FakeModel:
    training = True

    def __init__(self, logps: torch.Tensor):
        self.logps = logps  # (2B,) = [chosen, rejected]

    def __call__(self, **kwargs):
        n = self.logps.shape[0]
        assert kwargs["input_ids"].shape[0] == n
        return types.SimpleNamespace(
            log_probs=self.logps[:, None],  # (2B, seq_len=1): summed over dim 1 -> logps
            entropy=torch.zeros(n, 1, dtype=self.logps.dtype),
            mean_logits=torch.zeros(n, 1, dtype=self.logps.dtype),
            is_top1=torch.zeros(n, 1, dtype=torch.bool),
            aux_loss=torch.tensor(0.0),
        )


def _trl_stand_in(tmp_path, beta: float, loss_type: str):
    args = DPOConfig(output_dir=str(tmp_path), beta=beta, loss_type=[loss_type], precompute_ref_log_probs=True,
                     report_to="none", use_cpu=True, bf16=False)
    accelerator = types.SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)
    return types.SimpleNamespace(
        args=args,
        model=_FakeModel(torch.zeros(0)),
        accelerator=accelerator,
        aux_loss_enabled=False,
        # exactly what DPOTrainer.__init__ copies from args:
        beta=args.beta,
        precompute_ref_logps=args.precompute_ref_log_probs,
        loss_types=args.loss_type,
        loss_weights=args.loss_weights or [1.0] * len(args.loss_type),
        ld_alpha=args.ld_alpha,
        f_divergence_type=args.f_divergence_type,
        f_alpha_divergence_coef=args.f_alpha_divergence_coef,
        label_smoothing=args.label_smoothing,
        use_weighting=args.use_weighting,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )


def trl_dpo_loss(stand_in, chosen, rejected, ref_chosen, ref_rejected) -> torch.Tensor:
    """TRL 1.16's DPO loss (mean over the batch) for given summed log-probs."""
    b = chosen.shape[0]
    model = _FakeModel(torch.cat([chosen, rejected]))
    stand_in.model = model
    inputs = {
        "input_ids": torch.zeros(2 * b, 2, dtype=torch.long),
        "attention_mask": torch.ones(2 * b, 2, dtype=torch.long),
        "completion_mask": torch.tensor([[0, 1]] * (2 * b)),
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    return DPOTrainer._compute_loss(stand_in, model, inputs, return_outputs=False)


def test_trl_version_is_the_one_the_oracle_was_written_for():
    assert trl.__version__.startswith("1.16."), trl.__version__


def test_trl_stand_in_config_is_plain_dpo(tmp_path):
    # The oracle must be TRL's plain DPO: reverse-KL, no length-desensitising, no weighting, no smoothing.
    s = _trl_stand_in(tmp_path, 0.1, "sigmoid")
    assert s.loss_types == ["sigmoid"]
    assert s.f_divergence_type == "reverse_kl"
    assert s.ld_alpha is None
    assert s.use_weighting is False
    assert s.label_smoothing == 0.0
    assert s.loss_weights == [1.0]


def test_trl_oracle_is_wired_the_right_way_round(tmp_path):
    # Sanity check of the harness on a hand value: chosen ratio 1.0, rejected ratio -0.5, beta 0.1
    # -> TRL sigmoid loss = log(1 + exp(-0.15)); swapping chosen and rejected gives log(1 + exp(0.15)).
    s = _trl_stand_in(tmp_path, 0.1, "sigmoid")
    loss = trl_dpo_loss(s, t(-1.0), t(-3.0), t(-2.0), t(-2.5))
    assert loss.item() == pytest.approx(softplus_neg(0.15), rel=1e-12)
    swapped = trl_dpo_loss(s, t(-3.0), t(-1.0), t(-2.5), t(-2.0))
    assert swapped.item() == pytest.approx(softplus_neg(-0.15), rel=1e-12)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge"])
@pytest.mark.parametrize("beta", [0.01, 0.1, 0.5, 2.0])
def test_matches_trl_dpo_loss_per_pair(tmp_path, loss_type, beta):
    g = torch.Generator().manual_seed(int(beta * 1000) + len(loss_type))
    n = 24
    # Summed log-probs of whole responses: negative, tens of nats; policy near the reference so u spans both signs
    # (and, for hinge, both sides of u = 1).
    rr = -torch.rand(n, generator=g, dtype=torch.float64) * 60
    rg = -torch.rand(n, generator=g, dtype=torch.float64) * 60
    pr = rr + torch.randn(n, generator=g, dtype=torch.float64) * 8
    pg = rg + torch.randn(n, generator=g, dtype=torch.float64) * 8
    ours = spin_loss(pr, pg, rr, rg, beta=beta, loss_type=loss_type)
    assert ours.dtype == torch.float64

    s = _trl_stand_in(tmp_path, beta, loss_type)
    for i in range(n):  # TRL reduces by mean, so compare one pair at a time
        sl = slice(i, i + 1)
        theirs = trl_dpo_loss(s, pr[sl], pg[sl], rr[sl], rg[sl])
        assert theirs.dtype == torch.float64
        assert abs(ours[i].item() - theirs.item()) <= 1e-6 * max(1.0, abs(theirs.item())), (i, ours[i], theirs)
    # And the whole batch at once: TRL's mean equals the mean of ours.
    batch = trl_dpo_loss(s, pr, pg, rr, rg)
    assert batch.item() == pytest.approx(ours.mean().item(), abs=1e-6)

    # The random inputs actually exercised the interesting regions.
    u = spin_rewards(pr, pg, rr, rg, beta)["margin"]
    assert (u < 0).any() and (u > 0).any()
    if loss_type == "hinge" and beta >= 0.5:
        assert (u > 1).any() and (ours == 0).any()


def test_rewards_match_trl_metrics(tmp_path):
    # TRL logs rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies as batch means.
    g = torch.Generator().manual_seed(3)
    n = 32
    rr, rg = (-torch.rand(n, generator=g, dtype=torch.float64) * 40 for _ in range(2))
    pr = rr + torch.randn(n, generator=g, dtype=torch.float64) * 5
    pg = rg + torch.randn(n, generator=g, dtype=torch.float64) * 5
    beta = 0.3
    s = _trl_stand_in(tmp_path, beta, "sigmoid")
    trl_dpo_loss(s, pr, pg, rr, rg)
    m = s._metrics["train"]
    ours = spin_rewards(pr, pg, rr, rg, beta)
    assert m["rewards/chosen"][-1] == pytest.approx(ours["real"].mean().item(), abs=1e-9)
    assert m["rewards/rejected"][-1] == pytest.approx(ours["generated"].mean().item(), abs=1e-9)
    assert m["rewards/margins"][-1] == pytest.approx(ours["margin"].mean().item(), abs=1e-9)
    assert m["rewards/accuracies"][-1] == pytest.approx(ours["accuracy"].mean().item(), abs=1e-12)
    assert 0.0 < ours["accuracy"].mean().item() < 1.0
