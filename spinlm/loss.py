"""SPIN's loss: a pure function of summed response log-probabilities.

Paper: Chen et al., "Self-Play Fine-Tuning Converts Weak Language Models to Strong
Language Models", ICML 2024 (arXiv 2401.01335), Eq. (4.7) and Algorithm 1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "hinge")


def spin_loss(
    policy_real_logps: torch.Tensor,
    policy_generated_logps: torch.Tensor,
    ref_real_logps: torch.Tensor,
    ref_generated_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
) -> torch.Tensor:
    """Per-pair SPIN losses, shape (batch,), not reduced.

    Every input is the summed log-probability of a whole response given its prompt,
    shape (batch,): `policy_*` under the model being trained (p_theta), `ref_*` under the
    previous iterate p_t that generated the `generated` responses.

        r_real = log p_theta(y  | x) - log p_t(y  | x)      (y: the human response)
        r_gen  = log p_theta(y' | x) - log p_t(y' | x)      (y': p_t's own response)
        u      = beta * (r_real - r_gen)
        sigmoid (the paper's logistic loss):  l(u) = log(1 + exp(-u)) = -logsigmoid(u)
        hinge   (as in the reference code):   l(u) = max(0, 1 - u)

    At theta = p_t, u = 0 and the logistic loss is log 2, with gradient -beta/2 on
    r_real - r_gen, so training moves from the first step. beta is the paper's lambda.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if not beta > 0:  # also rejects NaN
        raise ValueError(f"beta must be > 0, got {beta}")
    r_real = policy_real_logps - ref_real_logps
    r_gen = policy_generated_logps - ref_generated_logps
    u = beta * (r_real - r_gen)
    if loss_type == "sigmoid":
        return -F.logsigmoid(u)
    return torch.relu(1.0 - u)


def spin_rewards(
    policy_real_logps: torch.Tensor,
    policy_generated_logps: torch.Tensor,
    ref_real_logps: torch.Tensor,
    ref_generated_logps: torch.Tensor,
    beta: float,
) -> dict[str, torch.Tensor]:
    """The implicit rewards DPO-style trainers log, per pair (batch,).

    rewards/real = beta * r_real, rewards/generated = beta * r_gen,
    margin = their difference, accuracy = 1.0 where margin > 0 else 0.0.
    """
    real = beta * (policy_real_logps - ref_real_logps)
    generated = beta * (policy_generated_logps - ref_generated_logps)
    margin = real - generated
    return {"real": real, "generated": generated, "margin": margin, "accuracy": (margin > 0).float()}


def real_nll_per_token(policy_real_logps: torch.Tensor, real_tokens: torch.Tensor) -> torch.Tensor:
    """Per-pair mean NLL per token of the real response, shape (batch,): the regulariser that
    `spin.sft_weight` adds to the SPIN loss (TRL calls the same idea rpo_alpha; TRL averages
    over all chosen tokens of a batch, this over each pair's tokens, then over pairs).

        nll = -log p_theta(y | x) / |y|
    """
    return -policy_real_logps / real_tokens.clamp(min=1)


# --- the SPIN family: published changes of the objective, same loop (issue 19) ------------------
# Notation as above: r(y) = log p_theta(y|x) - log p_t(y|x), summed over the response's tokens.

OBJECTIVES = ("spin", "space", "sppo_hard")  # the pair objectives; spin.objective tspin (triplets) too


def space_loss(
    policy_real_logps: torch.Tensor,
    policy_generated_logps: torch.Tensor,
    ref_real_logps: torch.Tensor,
    ref_generated_logps: torch.Tensor,
    mu: float = 1.0,
) -> torch.Tensor:
    """SPACE (Wang et al., NeurIPS 2025, arXiv 2512.07175): noise-contrastive estimation with p_t's
    responses as the noise, mu noise samples per real one. Per pair, shape (batch,):

        sigma_mu(u) = 1 / (1 + mu e^-u)
        l = -log sigma_mu(r(y)) - mu log sigma_{1/mu}(-r(y'))
          = softplus(log mu - r(y)) + mu softplus(r(y') - log mu)

    The real and the generated response each get an absolute target instead of their gap, so the
    objective does not go flat when y' approaches y. What was checked: the paper publishes no code;
    this formula (from a summary of it, and its Appendix E pseudocode's signature space_loss(mu,
    player/opponent real/generated logps), which has no beta) is exactly Gutmann & Hyvärinen's NCE
    loss with the classifier h(u) = p_theta / (p_theta + mu p_t) = sigma_mu(r(u)), whose optimum is
    p_theta = p_data for every mu (tests/test_loss.py checks it on a table). At mu = 1:
    -log sigma(r(y)) - log sigma(-r(y')).
    """
    real, generated = space_terms(policy_real_logps, policy_generated_logps, ref_real_logps, ref_generated_logps, mu)
    return real + generated


def space_terms(policy_real_logps, policy_generated_logps, ref_real_logps, ref_generated_logps,
                mu: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """SPACE's two absolute terms (space_loss is their sum): the real response's
    softplus(log mu - r(y)) and the generated one's mu softplus(r(y') - log mu)."""
    if not mu > 0:
        raise ValueError(f"mu must be > 0, got {mu}")
    r_real = policy_real_logps - ref_real_logps
    r_gen = policy_generated_logps - ref_generated_logps
    log_mu = math.log(mu)
    return F.softplus(log_mu - r_real), mu * F.softplus(r_gen - log_mu)


def sppo_hard_loss(
    policy_real_logps: torch.Tensor,
    policy_generated_logps: torch.Tensor,
    ref_real_logps: torch.Tensor,
    ref_generated_logps: torch.Tensor,
    beta: float = 0.1,
) -> torch.Tensor:
    """SPPO with hard labels (Wu et al. 2024, arXiv 2405.00675; TRL's loss_type "sppo_hard"), the
    real response always winning. Per pair, shape (batch,):

        l = (r(y) - 1/(2 beta))^2 + (r(y') + 1/(2 beta))^2

    A squared loss: it pins the log-ratios to +-1/(2 beta) instead of pushing their gap to infinity.
    """
    real, generated = sppo_hard_terms(policy_real_logps, policy_generated_logps, ref_real_logps,
                                      ref_generated_logps, beta)
    return real + generated


def sppo_hard_terms(policy_real_logps, policy_generated_logps, ref_real_logps, ref_generated_logps,
                    beta: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """SPPO-hard's two squared distances to its targets (sppo_hard_loss is their sum):
    (r(y) - 1/(2 beta))^2 and (r(y') + 1/(2 beta))^2."""
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    r_real = policy_real_logps - ref_real_logps
    r_gen = policy_generated_logps - ref_generated_logps
    return (r_real - 0.5 / beta) ** 2, (r_gen + 0.5 / beta) ** 2


def tspin_loss(
    policy_real_logps: torch.Tensor,
    policy_generated_logps: torch.Tensor,
    policy_historical_logps: torch.Tensor,
    alpha: float = 1.0,
    beta: float = 0.1,
) -> torch.Tensor:
    """T-SPIN (arXiv 2601.08198, NeurIPS 2025, its Appendix D pseudocode): triplets (y, y', y0),
    y0 generated once by the starting model p_0; reference-free (no p_t log-probs). Per triplet:

        cur  = alpha (log p_theta(y|x)  - log p_theta(y'|x))
        hist = alpha (log p_theta(y'|x) - log p_theta(y0|x))
        l    = -log sigma(cur) - beta log sigma(hist)

    beta 0 at iteration 0, where y' and y0 come from the same model. spin.objective tspin: the loop
    keeps iteration 0's generations as y0 and trains on triplets (spinlm.train).
    """
    current, historical = tspin_terms(policy_real_logps, policy_generated_logps, policy_historical_logps, alpha, beta)
    return current + historical


def tspin_terms(policy_real_logps, policy_generated_logps, policy_historical_logps, alpha: float = 1.0,
                beta: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """T-SPIN's two terms (tspin_loss is their sum): -log sigma(cur) and -beta log sigma(hist)."""
    if not alpha > 0 or not beta >= 0:
        raise ValueError(f"alpha must be > 0 and beta >= 0, got {alpha}, {beta}")
    cur = alpha * (policy_real_logps - policy_generated_logps)
    hist = alpha * (policy_generated_logps - policy_historical_logps)
    return -F.logsigmoid(cur), -beta * F.logsigmoid(hist)


def objective_loss(
    objective: str,
    policy_real_logps: torch.Tensor,
    policy_generated_logps: torch.Tensor,
    ref_real_logps: torch.Tensor,
    ref_generated_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    mu: float = 1.0,
) -> torch.Tensor:
    """Per-pair losses of the pair objective `objective` (one of OBJECTIVES): spin (spin_loss with
    `loss_type`), space (space_loss with `mu`), sppo_hard (sppo_hard_loss with `beta`)."""
    args = (policy_real_logps, policy_generated_logps, ref_real_logps, ref_generated_logps)
    if objective == "spin":
        return spin_loss(*args, beta=beta, loss_type=loss_type)
    if objective == "space":
        return space_loss(*args, mu=mu)
    if objective == "sppo_hard":
        return sppo_hard_loss(*args, beta=beta)
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")


def objective_terms(
    objective: str,
    policy_real_logps: torch.Tensor,
    policy_generated_logps: torch.Tensor,
    ref_real_logps: torch.Tensor,
    ref_generated_logps: torch.Tensor,
    beta: float = 0.1,
    mu: float = 1.0,
) -> dict[str, torch.Tensor]:
    """The named per-pair terms whose sum is objective_loss, for the pair objectives with more than
    one (space, sppo_hard: "real" and "generated"); spin's loss is one term of the margin: {}. They
    show which side of an objective still moves and which has stalled."""
    args = (policy_real_logps, policy_generated_logps, ref_real_logps, ref_generated_logps)
    if objective == "space":
        return dict(zip(("real", "generated"), space_terms(*args, mu=mu)))
    if objective == "sppo_hard":
        return dict(zip(("real", "generated"), sppo_hard_terms(*args, beta=beta)))
    if objective == "spin":
        return {}
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
