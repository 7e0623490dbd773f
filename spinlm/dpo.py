"""Stage: DPO on given preference pairs (the paper's DPO baseline, and SPIN followed by DPO).

    spinlm dpo --model MODEL --data PREFS.jsonl --out MODEL_DIR [--eval-data PREFS] [--spin.beta=0.1]

DPO (Rafailov et al. 2023, Eq. 7) is SPIN's loss on other pairs: the chosen response in place
of the human one, the rejected response in place of the model's own generation, and the
starting model as the reference (SPIN.md: "This is DPO's loss with chosen = human response,
rejected = own generation"). So this stage is SPIN's score and train stages on given pairs:

1. each preference row becomes a pairs row with real = chosen, generated = rejected and
   finish "eos" (a given response is complete, so its EOS is scored and trained);
2. the starting model computes the reference log-probs once (`OUT.pairs.jsonl`, next to the
   output; a re-run with the same inputs reuses it, a killed scoring resumes its chunks);
3. `spinlm.stages.train.train` trains with the same loop, `spin.loss_type`, `spin.beta` (a list's
   first entry), `train.*` (`train.epochs` = DPO epochs) and metrics, into `OUT` atomically; with
   `train.eval_every`, its checks select on `data.val` or a `data.val_size` slice of the pairs
   (not trained on), never on `--eval-data`;
4. with `--eval-data` (preference pairs too), held-out metrics of the trained model: reward
   accuracy and margin on those pairs (scored under the starting model), NLL of the chosen
   responses, greedy length statistics; in `OUT/spinlm_dpo.json` with what ran.

Input: the formats with two responses per prompt, `data.PREFERENCE_FIELDS`: TRL's
`prompt`/`chosen`/`rejected` (strings or conversational, e.g. HuggingFaceH4/ultrafeedback_binarized
split train_prefs) and the SPIN data's `real`/`generated` message lists.
"""

from __future__ import annotations

import logging
from pathlib import Path

from spinlm import dist
from spinlm.config import Config
from spinlm.data import Example
from spinlm.hub import model_commit, model_key
from spinlm.io import fingerprint, finish, is_done, marker, produce, read_json, read_jsonl, scratch, write_json
from spinlm.stages.score import score_rows
from spinlm.tokens import ENCODING

log = logging.getLogger("spinlm")


def preference_rows(examples: list[Example]) -> list[dict]:
    """Preference examples as generation-format rows: real = chosen, generated = rejected."""
    return [{"id": ex.id, "prompt": ex.prompt, "real": ex.real, "generated": ex.rejected, "finish": "eos",
             "generated_tokens": None, "iteration": 0, "extra": ex.extra} for ex in examples]


def scored_pairs(model_path: str, examples: list[Example], out: Path, cfg: Config, desc: str) -> Path:
    """Reference log-probs of the pairs under `model_path`, written once to `out`; a finished file
    from the same inputs is reused (its `.done` marker holds their fingerprint)."""
    rows = preference_rows(examples)
    key = fingerprint("dpo-pairs", model_key(model_path, cfg.model.revision), rows, cfg.data.max_prompt_length,
                      cfg.data.max_length,
                      cfg.model.dtype, cfg.model.attn_implementation, cfg.packing.enabled, cfg.model.chat_template,
                      ENCODING)
    if is_done(out) and (read_json(marker(out)) or {}).get("fingerprint") == key:
        log.info("%s: reusing the reference log-probs scored earlier", out)
        return out
    stats = produce(out, lambda tmp: score_rows(model_path, rows, tmp, cfg, desc,
                                                [examples[0].source.rsplit(":", 1)[0]]))
    finish(out, {"fingerprint": key, **stats})
    dist.barrier()
    return out


def dpo(model_path: str, examples: list[Example], out: Path, cfg: Config,
        heldout: list[Example] | None = None, val: list[Example] | None = None, sources: dict | None = None) -> dict:
    """The stage: score the pairs under `model_path`, train from it into `out` (in-training checks,
    train.eval_every, on `val`), evaluate on `heldout`; return the record. `sources`: per data role, the Hub
    dataset commit and files read (as RUN/run_info.json's `data`), recorded."""
    from spinlm.stages.train import train

    pairs = scored_pairs(model_path, examples, scratch(out, "pairs.jsonl"), cfg, "score")
    eval_pairs = scratch(out, "eval-pairs.jsonl")
    if heldout:
        scored_pairs(model_path, heldout, eval_pairs, cfg, "score held-out")

    def fit(tmp: Path) -> dict:
        result = train(model_path, pairs, tmp, cfg, 0, val or [])
        record = {"start_model": str(model_path), "start_model_revision": cfg.model.revision,
                  "start_model_commit": model_commit(str(model_path), cfg.model.revision),
                  "data": sources or {}, "pairs": str(pairs), "train_rows": len(examples),
                  "val_rows": len(val or []),
                  "beta": cfg.per_iteration("beta", 0), "loss_type": cfg.spin.loss_type,
                  "train": {k: v for k, v in result.items() if k != "history"},
                  # evaluated in OUT's temporary directory, before the rename: the record names OUT
                  "eval": {**_heldout_metrics(tmp, heldout, eval_pairs, cfg), "model": str(out)} if heldout else None,
                  "config": cfg.to_dict(), "versions": _versions()}
        if dist.is_main():
            write_json(tmp / "spinlm_dpo.json", record)
        return record

    record = produce(out, fit)
    finish(out)
    return record


def _heldout_metrics(model_dir: Path, heldout: list[Example], eval_pairs: Path, cfg: Config) -> dict:
    from spinlm.stages.evaluate import evaluate

    return evaluate(str(model_dir), heldout, cfg, read_jsonl(eval_pairs), cfg.per_iteration("beta", 0))


def _versions() -> dict:
    from spinlm.rundir import run_info

    return run_info()
