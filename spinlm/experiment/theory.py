"""The theory checked: one SPIN iteration's exact optimum against trained steps, on a table of
probabilities and on a tiny Llama, at beta in {0.1, 0.5, 1, 2, 5}.

    spinlm experiment theory [--out runs/experiment-theory] [--seeds 0 1 2] [--iterations 6] [--quick]

One prompt, K possible responses. p_data is the true distribution; p_0 is an "SFT model": the
smoothed frequencies of N samples from p_data (the SFT data, which SPIN then reuses as its real
responses). Iteration t minimises the paper's population loss (Eq. 4.7, spinlm.loss.spin_loss)

    L(p) = E_{y ~ p_data, y' ~ p_t} l(beta log p(y)/p_t(y) - beta log p(y')/p_t(y')),  l(u) = log(1 + e^-u)

whose exact minimiser over all distributions is the paper's closed form (Theorem 5.4):

    p_{t+1}(y)  ∝  p_t(y) (p_data(y) / p_t(y))^(1/beta).

(For logistic l, each pair {a, b} is minimised at f(a) - f(b) = log p_data(a)p_t(b) / p_data(b)p_t(a),
and f = log p_data/p_t meets every pair at once.) In log space the error e_t = log p_t - log p_data
(up to a constant) follows e_{t+1} = (1 - 1/beta) e_t: beta = 1 lands on p_data in one iteration,
beta > 1 approaches it geometrically, beta in (0.5, 1) overshoots and converges, beta = 0.5
oscillates for ever and beta < 0.5 overshoots further every iteration (beta 0.1: x(-9)).

Practice does not minimise L: it takes a few hundred optimizer steps, on one finite set of real
responses and one sample of p_t's. So each beta also runs
  - "population": Adam for STEPS steps per iteration on the exact expected loss, at each LR;
  - "sampled": the same on the N SFT samples paired with N fresh samples of p_t (what SPIN trains on);
  - "tiny Llama": a 2-layer Llama whose responses are all V^L token sequences, the population loss
    through its real summed sequence log-probs (its p_0: MLE on the same N samples).
KL(p_data || p_t) is exact (a sum over the K responses). Writes OUT/results.{md,json},
OUT/theory.png; each seed's numbers are kept in OUT/seeds/ (re-running resumes).
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import torch

from spinlm.experiment.common import Setup, mean_sd, write_results
from spinlm.io import read_json, write_json
from spinlm.loss import spin_loss

BETAS = [0.1, 0.5, 1.0, 2.0, 5.0]
LRS = [0.01, 0.1]
STEPS = 100
K_VOCAB, K_LEN = 4, 2  # responses: every sequence of K_LEN tokens over K_VOCAB answer tokens
K = K_VOCAB ** K_LEN
N_SAMPLES = 32
QUICK = {"betas": [0.1, 1.0, 5.0], "lrs": [0.1], "steps": 20}


# --- the table --------------------------------------------------------------------------------

def closed_form(logp_t: torch.Tensor, logp_data: torch.Tensor, beta: float) -> torch.Tensor:
    """log p_{t+1} = log normalise(p_t (p_data / p_t)^(1/beta)), the exact optimum of one iteration."""
    return torch.log_softmax(logp_t + (logp_data - logp_t) / beta, dim=-1)


def kl(logp: torch.Tensor, logq: torch.Tensor) -> float:
    """KL(p || q) in nats, exact, for log-probability vectors over the same responses."""
    return float((logp.exp() * (logp - logq)).sum())


def pair_loss(logp: torch.Tensor, logp_t: torch.Tensor, w_real: torch.Tensor, w_gen: torch.Tensor,
              beta: float, loss_type: str = "sigmoid") -> torch.Tensor:
    """Expected SPIN loss over y ~ w_real and y' ~ w_gen (weights over the K responses; the exact
    distributions, or a sample's frequencies), every (y, y') pair through spinlm.loss.spin_loss."""
    k = logp.shape[-1]
    y, y2 = torch.arange(k).repeat_interleave(k), torch.arange(k).repeat(k)
    losses = spin_loss(logp[y], logp[y2], logp_t[y], logp_t[y2], beta=beta, loss_type=loss_type)
    return (losses * w_real[y] * w_gen[y2]).sum()


def minimise(logp_t: torch.Tensor, w_real: torch.Tensor, w_gen: torch.Tensor, beta: float,
             tol: float = 1e-13, max_iter: int = 2000) -> torch.Tensor:
    """The minimiser of pair_loss over all distributions (free logits), by L-BFGS to convergence:
    log p. The loss is convex in the logits (the log-normaliser cancels in every pair)."""
    theta = logp_t.detach().clone().requires_grad_(True)
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=max_iter, tolerance_grad=tol, tolerance_change=0.0,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = pair_loss(torch.log_softmax(theta, -1), logp_t, w_real, w_gen, beta)
        loss.backward()
        return loss

    opt.step(closure)
    return torch.log_softmax(theta.detach(), -1)


def adam_steps(logp_t: torch.Tensor, w_real: torch.Tensor, w_gen: torch.Tensor, beta: float, lr: float,
               steps: int) -> torch.Tensor:
    """`steps` Adam steps from p_t on the free logits (full batch): log p."""
    theta = logp_t.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        pair_loss(torch.log_softmax(theta, -1), logp_t, w_real, w_gen, beta).backward()
        opt.step()
    return torch.log_softmax(theta.detach(), -1)


def frequencies(samples: torch.Tensor, k: int) -> torch.Tensor:
    return torch.bincount(samples, minlength=k).to(torch.float64) / len(samples)


def problem(seed: int) -> dict:
    """p_data (Dirichlet(1) over K responses), the N SFT samples and p_0 (their add-1/2 smoothed
    frequencies), all seeded."""
    g = torch.Generator().manual_seed(seed)
    gamma = -torch.rand(K, dtype=torch.float64, generator=g).log()  # Exponential(1): normalised, Dirichlet(1)
    p_data = gamma / gamma.sum()
    samples = torch.multinomial(p_data, N_SAMPLES, replacement=True, generator=g)
    counts = torch.bincount(samples, minlength=K).to(torch.float64)
    return {"logp_data": p_data.log(), "samples": samples, "logp0": ((counts + 0.5) / (N_SAMPLES + 0.5 * K)).log()}


def table_runs(prob: dict, seed: int, iterations: int, betas: list[float], lrs: list[float], steps: int) -> dict:
    """KL(p_data || p_t), t = 0..iterations, per beta: exact optimum, population and sampled Adam."""
    logp_data, logp0, real = prob["logp_data"], prob["logp0"], frequencies(prob["samples"], K)
    out = {}
    for beta in betas:
        curves = {"exact": [logp0]}
        for _ in range(iterations):
            curves["exact"].append(closed_form(curves["exact"][-1], logp_data, beta))
        for lr in lrs:
            g = torch.Generator().manual_seed(seed * 1000 + 7)
            pop, smp = [logp0], [logp0]
            for _ in range(iterations):
                pop.append(adam_steps(pop[-1], logp_data.exp(), pop[-1].exp(), beta, lr, steps))
                generated = frequencies(torch.multinomial(smp[-1].exp(), N_SAMPLES, replacement=True, generator=g), K)
                smp.append(adam_steps(smp[-1], real, generated, beta, lr, steps))
            curves[f"population lr {lr:g}"], curves[f"sampled lr {lr:g}"] = pop, smp
        out[f"{beta:g}"] = {name: [kl(logp_data, lp) for lp in c] for name, c in curves.items()}
    return out


# --- the tiny Llama ---------------------------------------------------------------------------

def tiny_llama(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=K_VOCAB + 1, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=8,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).double().eval()  # eval: no dropout anywhere


def sequences() -> torch.Tensor:
    """Every response as ids: the prompt token (K_VOCAB) then K_LEN answer tokens; (K, 1 + K_LEN)."""
    body = torch.tensor(list(itertools.product(range(K_VOCAB), repeat=K_LEN)))
    return torch.cat([torch.full((K, 1), K_VOCAB), body], dim=1)


def response_logps(model, seqs: torch.Tensor) -> torch.Tensor:
    """log p(response | prompt) for every response, summed over its tokens, renormalised over the
    answer tokens (the prompt token is never an answer): a distribution over the K responses."""
    logits = model(input_ids=seqs).logits[:, :-1, :K_VOCAB]
    logps = torch.log_softmax(logits, -1).gather(-1, seqs[:, 1:, None]).squeeze(-1)
    return logps.sum(-1)


def llama_runs(prob: dict, seed: int, iterations: int, betas: list[float], lrs: list[float], steps: int,
               sft_steps: int) -> dict:
    """KL(p_data || p_t) per beta and lr for the tiny Llama on the population loss, from its own
    p_0 (Adam MLE on the N SFT samples, lr 0.01, `sft_steps` steps); the closed form from that p_0 too."""
    seqs, logp_data = sequences(), prob["logp_data"]
    model = tiny_llama(seed)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(sft_steps):
        opt.zero_grad()
        (-response_logps(model, seqs[prob["samples"]]).mean()).backward()
        opt.step()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        logp0 = response_logps(model, seqs)
    out = {}
    for beta in betas:
        exact = [logp0]
        for _ in range(iterations):
            exact.append(closed_form(exact[-1], logp_data, beta))
        curves = {"exact from its p_0": [kl(logp_data, lp) for lp in exact]}
        for lr in lrs:
            model.load_state_dict(start)
            logp_t, kls = logp0, [kl(logp_data, logp0)]
            for _ in range(iterations):
                opt = torch.optim.Adam(model.parameters(), lr=lr)
                for _ in range(steps):
                    opt.zero_grad()
                    pair_loss(response_logps(model, seqs), logp_t, logp_data.exp(), logp_t.exp(), beta).backward()
                    opt.step()
                with torch.no_grad():
                    logp_t = response_logps(model, seqs)
                kls.append(kl(logp_data, logp_t))
            curves[f"tiny Llama lr {lr:g}"] = kls
        out[f"{beta:g}"] = curves
    return out


# --- the experiment ---------------------------------------------------------------------------

def experiment(setup: Setup) -> dict:
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)  # tensors of 16 entries: threads only add overhead
    knobs = QUICK if setup.quick else {"betas": BETAS, "lrs": LRS, "steps": STEPS}
    sft_steps = 50 if setup.quick else 300
    per_seed = {}
    for seed in setup.seeds:
        path = setup.out / "seeds" / f"seed-{seed}.json"
        settings = {**knobs, "iterations": setup.iterations, "sft_steps": sft_steps, "k": K, "n": N_SAMPLES}
        kept = read_json(path)
        if kept is None or kept.get("settings") != settings:
            prob = problem(seed)
            kept = {"settings": settings, "table": table_runs(prob, seed, setup.iterations, **knobs),
                    "llama": llama_runs(prob, seed, setup.iterations, sft_steps=sft_steps, **knobs)}
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json(path, kept)  # atomic: a killed run redoes only the seeds not written
        per_seed[seed] = kept
    results = {"seeds": per_seed, "betas": knobs["betas"], "iterations": setup.iterations}
    write_results(setup.out, results, table(results))
    plot(results, setup.out / "theory.png")
    return results


def _curves(results: dict, beta: str) -> dict[str, list[list[float]]]:
    """name -> per iteration, the seeds' KLs."""
    names = {}
    for kept in results["seeds"].values():
        for part in ("table", "llama"):
            for name, kls in kept[part][beta].items():
                label = name if part == "table" else f"llama: {name}"
                names.setdefault(label, []).append(kls)
    return {n: [list(v) for v in zip(*runs)] for n, runs in names.items()}


def table(results: dict) -> str:
    its = results["iterations"]
    lines = ["# SPIN's iteration in theory: KL(p_data || p_t), nats", "",
             f"Mean ± sd over seeds {list(results['seeds'])}; t = 0 is p_0.", ""]
    for beta in results["betas"]:
        b = f"{beta:g}"
        lines += [f"## beta {b} (error factor per exact iteration 1 - 1/beta = {1 - 1 / beta:g})", "",
                  "| curve | " + " | ".join(f"t={t}" for t in range(its + 1)) + " |",
                  "|---|" + "---|" * (its + 1)]
        for name, per_t in _curves(results, b).items():
            cells = []
            for v in per_t:
                m, s = mean_sd(v)
                cells.append(f"{m:.3g} ± {s:.2g}" if math.isfinite(m) else "inf")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """One panel per beta (log scale, KL floored at 1e-12: the exact beta = 1 lands on 0); the
    legend in the last panel."""
    import statistics

    from spinlm.report.plots import figure

    betas = results["betas"]
    fig, axes = figure(2, (len(betas) + 2) // 2)
    for ax, beta in zip(axes, betas):
        for name, per_t in _curves(results, f"{beta:g}").items():
            means = [max(statistics.mean(v), 1e-12) for v in per_t]
            style = "-" if name in ("exact", "llama: exact from its p_0") else "--" if name.startswith("llama") else ":"
            ax.plot(range(len(means)), means, style, marker="o", markersize=3, label=name)
        ax.set_yscale("log")
        ax.set_xlabel("iteration t", fontsize=8)
        ax.set_title(f"beta {beta:g}: KL(p_data || p_t), nats", fontsize=9)
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes[len(betas):]:
        ax.axis("off")
    axes[-1].legend(handles, labels, fontsize=7, loc="center")
    fig.savefig(path, dpi=110)
