"""The paper's claims at CPU scale, one command each: `spinlm experiment NAME`.

    spinlm experiment spin-vs-sft  [--out DIR] [--seeds 0 1 2] [--iterations 3] [--workers 2] [--quick]
    spinlm experiment convergence  [--out DIR] [--seeds 0 1]   [--iterations 4]
    spinlm experiment loss-beta    [--out DIR] [--seeds 0 1]   [--iterations 2]
    spinlm experiment theory       [--out DIR] [--seeds 0 1 2] [--iterations 6]
    spinlm experiment regime       [--out DIR] [--seeds 0 1 2] [--iterations 3]
    spinlm experiment family       [--out DIR] [--seeds 0 1 2] [--iterations 3]

Each builds its inputs under OUT (the demo's task, tokenizer and tiny Llama: no network), runs
ordinary `spinlm run` directories side by side (re-running the same command resumes), and writes
OUT/results.md, OUT/results.json and a PNG plot. Any --section.key=value flag applies to every
SPIN run of the experiment. --quick runs the same experiment on a tiny task and model (a test).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from spinlm.experiment import convergence, family, loss_beta, regime, spin_vs_sft, theory
from spinlm.experiment.common import Setup


@dataclass(frozen=True)
class Experiment:
    run: Callable[[Setup], dict]
    seeds: tuple[int, ...]
    iterations: int
    summary: str


EXPERIMENTS = {
    "spin-vs-sft": Experiment(spin_vs_sft.experiment, (0, 1, 2), 3,
                              "SPIN vs continued SFT at equal optimizer steps, per iteration, on the demo task"),
    "convergence": Experiment(convergence.experiment, (0, 1), 4,
                              "a teacher model as the true distribution: KL(teacher || student) per iteration, "
                              "SPIN loss and margin vs their fixed point"),
    "loss-beta": Experiment(loss_beta.experiment, (0, 1), 2,
                            "sigmoid vs hinge loss at beta 0.1 and 5, the paper's loss alone"),
    "theory": Experiment(theory.experiment, (0, 1, 2), 6,
                         "one SPIN iteration's exact optimum (the paper's closed form) vs trained steps, on a table "
                         "of probabilities and a tiny Llama, beta 0.1 to 5"),
    "regime": Experiment(regime.experiment, (0, 1, 2), 3,
                         "the paper's regime: a data-limited start where more SFT hurts; SPIN (beta 0.1, 1, 5; "
                         "stabilized) vs continued SFT at equal steps, chosen on validation; a same-capacity student"),
    "family": Experiment(family.experiment, (0, 1, 2), 3,
                         "the SPIN family: SPIN, SPIN + NLL, T-SPIN, SPACE, SPPO-hard vs continued SFT at equal steps, "
                         "settings chosen on validation, in the regime's data-limited task and on the demo task"),
}
