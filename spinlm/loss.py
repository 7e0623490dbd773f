"""SPIN's loss: a pure function of summed response log-probabilities.

Paper: Chen et al., "Self-Play Fine-Tuning Converts Weak Language Models to Strong
Language Models", ICML 2024 (arXiv 2401.01335), Eq. (4.7) and Algorithm 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

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
    keeps iteration 0's generations as y0 and trains on triplets (spinlm.stages.train). `beta` may be a
    tensor (batch,): a weight per triplet (tspin_history_scales).
    """
    current, historical = tspin_terms(policy_real_logps, policy_generated_logps, policy_historical_logps, alpha, beta)
    return current + historical


def tspin_terms(policy_real_logps, policy_generated_logps, policy_historical_logps, alpha: float = 1.0,
                beta: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """T-SPIN's two terms (tspin_loss is their sum): -log sigma(cur) and -beta log sigma(hist)."""
    if not alpha > 0 or not bool(torch.all(torch.as_tensor(beta) >= 0)):  # also rejects NaN
        raise ValueError(f"alpha must be > 0 and beta >= 0, got {alpha}, {beta}")
    cur = alpha * (policy_real_logps - policy_generated_logps)
    hist = alpha * (policy_generated_logps - policy_historical_logps)
    return -F.logsigmoid(cur), -beta * F.logsigmoid(hist)


def tspin_history_scales(live: list[bool]) -> list[float]:
    """Per-triplet multipliers of T-SPIN's history weight: n / n_live where y' differs from y0
    (`live`), 0 where it is y0 token for token.

    Where y' = y0 the history term is the constant -beta log sigma(0) (no gradient). That is every
    row of iteration 0's own generations, which a mix window (spin.mix_window 2) trains on again at
    iteration 1 beside p_1's: counted in the batch mean, they would halve the history term's weight
    there. The paper's triplets pair y' ~ p_t with y0 ~ p_0 generated once (arXiv 2601.08198,
    Appendix D: hist = alpha (log p(y'|x) - log p(y0|x)), beta its weight; beta 0 at iteration 0,
    where y' and y0 come from the same model), so beta weighs the history term of triplets whose y'
    is not y0. With these multipliers the loss is, over an iteration's rows,
        mean_all(-log sigma(cur)) + beta * mean_{y' != y0}(-log sigma(hist))
    (over the batches of an epoch; within one batch it is the same in expectation). Rows with y' = y0
    still train the current term. No live row: all 0.
    """
    n, n_live = len(live), sum(bool(v) for v in live)
    return [n / n_live if v else 0.0 for v in live] if n_live else [0.0] * n


# --- the table: every objective by name; the stages name the objective and never branch on it -----
# `policy` and `ref` are dicts of summed log-probs per response name, shape (batch,): "real", "generated"
# (and "historical" for T-SPIN); `ref` is None for a reference-free objective.


@dataclass(frozen=True)
class Objective:
    """One objective of the SPIN family: all the train stage and the loop need to know of it.

    responses: the responses each row packs after its prompt, in this order;
    needs_reference: whether it uses p_t's log-probs (the score stage's forward pass);
    params(spin, beta, iteration): its parameters under their own names, from the config's `spin`
        section and the iteration's beta (the per-iteration `spin.beta`);
    terms(policy, ref, **params): the named per-row terms whose sum is the loss;
    rewards(policy, ref, **params): the implicit-reward metrics per row (real, generated, margin,
        accuracy = margin > 0, ...);
    row_scales(rows): per-row multipliers of some of its params, from each row's response token ids
        (a dict per row: response name -> ids); None: every row takes the params as they are.
    """

    name: str
    responses: tuple[str, ...]
    needs_reference: bool
    params: Callable[[Any, float, int], dict]
    terms: Callable[..., dict[str, torch.Tensor]]
    rewards: Callable[..., dict[str, torch.Tensor]]
    row_scales: Callable[[list[dict]], list[dict[str, float]]] | None = None

    @property
    def historical(self) -> bool:
        """Whether rows carry the starting model's response y0, generated once at iteration 0 and kept."""
        return "historical" in self.responses

    def scales(self, rows: list[dict]) -> list[dict[str, float]]:
        """Per row: the multipliers of params that differ from row to row (none for most objectives)."""
        return self.row_scales(rows) if self.row_scales else [{} for _ in rows]

    def loss(self, policy: dict, ref: dict | None, **params) -> torch.Tensor:
        """Per-row losses (batch,): the sum of the terms."""
        return sum(self.terms(policy, ref, **params).values())


def _sides(policy: dict, ref: dict) -> tuple[torch.Tensor, ...]:
    return policy["real"], policy["generated"], ref["real"], ref["generated"]


def _pair_rewards(policy: dict, ref: dict, beta: float, **_) -> dict[str, torch.Tensor]:
    return spin_rewards(*_sides(policy, ref), beta)


def _tspin_rewards(policy: dict, ref: None, alpha: float, **_) -> dict[str, torch.Tensor]:
    """T-SPIN has no reference: its implicit reward is alpha x log p_theta."""
    real, gen, hist = policy["real"], policy["generated"], policy["historical"]
    margin = alpha * (real - gen)
    return {"real": alpha * real, "generated": alpha * gen, "margin": margin, "accuracy": (margin > 0).float(),
            "historical_margin": alpha * (gen - hist)}


OBJECTIVES: dict[str, Objective] = {o.name: o for o in (
    Objective("spin", ("real", "generated"), True,
              params=lambda spin, beta, t: {"beta": beta, "loss_type": spin.loss_type},
              terms=lambda p, r, beta, loss_type: {"loss": spin_loss(*_sides(p, r), beta=beta, loss_type=loss_type)},
              rewards=_pair_rewards),
    # beta: SPACE's loss has none; it scales the logged implicit rewards only
    Objective("space", ("real", "generated"), True,
              params=lambda spin, beta, t: {"mu": spin.space_mu, "beta": beta},
              terms=lambda p, r, mu, **_: dict(zip(("real", "generated"), space_terms(*_sides(p, r), mu))),
              rewards=_pair_rewards),
    Objective("sppo_hard", ("real", "generated"), True,
              params=lambda spin, beta, t: {"beta": beta},
              terms=lambda p, r, beta: dict(zip(("real", "generated"), sppo_hard_terms(*_sides(p, r), beta))),
              rewards=_pair_rewards),
    # the history weight is 0 at iteration 0, where y' and y0 come from the same model (the paper's setting);
    # later, it weighs only the triplets whose y' is not y0 (tspin_history_scales: a mix window's rows of
    # iteration 0 are y0 itself)
    Objective("tspin", ("real", "generated", "historical"), False,
              params=lambda spin, beta, t: {"alpha": spin.tspin_alpha,
                                            "history_weight": 0.0 if t == 0 else spin.tspin_history_weight},
              terms=lambda p, r, alpha, history_weight: dict(zip(("current", "historical"), tspin_terms(
                  p["real"], p["generated"], p["historical"], alpha=alpha, beta=history_weight))),
              rewards=_tspin_rewards,
              row_scales=lambda rows: [{"history_weight": s} for s in tspin_history_scales(
                  [list(r["generated"]) != list(r["historical"]) for r in rows])]),
)}


def objective(name: str) -> Objective:
    """The table's entry for `name` (spin.objective)."""
    if name not in OBJECTIVES:
        raise ValueError(f"objective must be one of {tuple(OBJECTIVES)}, got {name!r}")
    return OBJECTIVES[name]
