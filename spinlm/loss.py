"""SPIN's loss: a pure function of summed response log-probabilities.

Paper: Chen et al., "Self-Play Fine-Tuning Converts Weak Language Models to Strong
Language Models", ICML 2024 (arXiv 2401.01335), Eq. (4.7) and Algorithm 1.
"""

from __future__ import annotations

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
