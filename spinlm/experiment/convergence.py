"""Convergence to the data distribution (the paper's Theorem 5.2 / 5.4): with a known "true"
distribution, does SPIN move the student towards it, and do its loss and margin approach their
fixed-point values (log 2 and 0 for the logistic loss)?

    spinlm experiment convergence [--out runs/experiment-convergence] [--seeds 0 1] [--iterations 4]

- Teacher (the true distribution): the demo's Llama after a few epochs of SFT on the task, sampled
  at temperature 1 (its own softmax, no top-k / top-p).
- Data: one teacher sample per training and validation prompt is the SFT data ("real"
  responses); K teacher samples per held-out prompt, kept as the sampled token ids, estimate KL.
- Student: a smaller Llama with the same tokenizer, SFT-trained on the teacher's samples to a
  plateau of validation NLL (the demo's recipe), then SPIN-trained with the paper's loss alone
  (spin.sft_weight 0, no in-iteration checks); continued SFT at equal steps is the baseline.
- KL(teacher || model) on held-out prompts, per model: the mean over prompts of the mean over
  that prompt's teacher samples of log p_teacher(y|x) - log p_model(y|x) (summed over the
  response tokens, EOS included), with the standard error over prompts. Samples that hit the
  token limit (no EOS: not complete draws) are left out and counted.
"""

from __future__ import annotations

import copy
import math
import statistics
from pathlib import Path

import torch

from spinlm.config import Config
from spinlm.demo.build import build_model
from spinlm.experiment.common import (
    Setup,
    base_config,
    build_inputs,
    fine_tune,
    fmt,
    mean_sd,
    resolved,
    run_all,
    spin_config,
    summary,
    train_log,
    write_results,
)
from spinlm.generation.local import generate, row_seed
from spinlm.io import finish, is_done, produce, read_json, read_jsonl, write_json, write_jsonl
from spinlm.modeling import load_model, load_tokenizer
from spinlm.packing import prepare, score_groups
from spinlm.tokens import encode_prompt, encode_response

TEACHER_EPOCHS = 4  # few enough that the teacher stays a spread-out distribution, not a lookup table
STUDENT = {"hidden_size": 96, "num_layers": 2, "num_heads": 4, "max_position_embeddings": 128, "seed": 1}
QUICK_STUDENT = {"hidden_size": 32, "num_layers": 1, "num_heads": 4, "max_position_embeddings": 128, "seed": 1}
SAMPLES_PER_PROMPT = 4
MAX_NEW_TOKENS = 24  # the task's answers take about 8 tokens; a draw that hits this is not complete
FIXED_POINT_LOSS = math.log(2)


def experiment(setup: Setup, task: dict | None = None, student: dict | None = None) -> dict:
    """`task` (the demo task's size, default the demo's) and `student` (the student's shape, default
    STUDENT: smaller than the teacher) let the regime experiment run it data-limited and same-capacity."""
    out = setup.out
    base = base_config(setup)
    build_inputs(setup, task)
    teacher_cfg = copy.deepcopy(base)
    teacher_cfg["sft"].update({"epochs": 20 if setup.quick else TEACHER_EPOCHS, "patience": 0})
    teacher = fine_tune(teacher_cfg, base["model"]["name_or_path"], out / "teacher", val=False)
    data = teacher_data(teacher, base, out / "teacher-data")
    student = student_base(teacher, out / "student-base", student or (QUICK_STUDENT if setup.quick else STUDENT))
    jobs = {f"seed{s}": spin_config(
        base, student, out / "runs" / f"seed{s}", s, setup.overrides, sft={"enabled": True},
        data={"train": str(data / "train.jsonl"), "val": str(data / "val.jsonl"), "eval": str(data / "test.jsonl")},
        spin={"sft_weight": 0.0}, train={"eval_every": 0}, eval={"continued_sft": True}) for s in setup.seeds}
    failed = run_all(out / "runs", jobs, setup.workers)
    results = collect(jobs, failed, teacher, data)
    write_results(out, results, table(results))
    plot(results, out / "convergence.png")
    return results


def teacher_data(teacher: Path, base: dict, out: Path) -> Path:
    """OUT/{train,val,test}.jsonl: the task's rows with the teacher's sample as the response;
    OUT/kl.jsonl: per held-out prompt, its token ids and K teacher samples (token ids, finish,
    the teacher's log-prob). Built once."""
    if not is_done(out):
        info = produce(out, lambda tmp: _write_teacher_data(teacher, resolved(base), tmp))
        finish(out, {"stage": "teacher-data", "info": info})
    return out


def _sample(model, tokenizer, prompts: list[list[int]], keys: list[str], k: int, cfg) -> list[list[dict]]:
    """k teacher draws per prompt (token ids kept), each from its own seed."""
    flat = [(i, j) for j in range(k) for i in range(len(prompts))]
    draws = generate(model, tokenizer, [prompts[i] for i, _ in flat], max_new_tokens=MAX_NEW_TOKENS,
                     batch_size=cfg.generation.batch_size, batch_tokens=cfg.generation.batch_tokens,
                     seeds=[row_seed(cfg.run.seed, 1000 + j, keys[i]) for i, j in flat], progress=False)
    per: list[list[dict]] = [[] for _ in prompts]
    for (i, _), d in zip(flat, draws):
        per[i].append(d)
    return per


def _write_teacher_data(teacher: Path, cfg, tmp: Path) -> dict:
    tmp.mkdir(parents=True)
    tokenizer = load_tokenizer(str(teacher), cfg.model)
    model = load_model(str(teacher), cfg.model).eval()
    info = {}
    sources = {"train": (cfg.data.train, 1), "val": (cfg.data.val, 1), "test": (cfg.data.eval, SAMPLES_PER_PROMPT)}
    for split, (path, k) in sources.items():
        rows = read_jsonl(path)[: cfg.data.max_eval_rows if split == "test" else None]
        messages = [[{"role": "user", "content": r["prompt"]}] for r in rows]
        prompts = [encode_prompt(tokenizer, m, cfg.data.max_prompt_length) for m in messages]
        draws = _sample(model, tokenizer, prompts, [f"{split}:{n}" for n in range(len(rows))], k, cfg)
        # the SFT / held-out data: the first draw of each prompt, if it is complete and not empty
        first = [d[0] for d in draws]
        kept = [{**r, "response": d["text"]} for r, d in zip(rows, first) if d["finish"] == "eos" and d["text"].strip()]
        write_jsonl(tmp / f"{split}.jsonl", kept)
        info[split] = {"prompts": len(rows), "kept": len(kept),
                       "hit_max_new_tokens": sum(d["finish"] == "length" for d in first),
                       "empty": sum(d["finish"] == "eos" and not d["text"].strip() for d in first),
                       "correct": sum(d["text"] == r["response"] for r, d in zip(rows, first))}
        if split == "test":
            kl_rows = [{"prompt_ids": p, "samples": [{"ids": d["ids"], "finish": d["finish"], "text": d["text"],
                                                      "reencodes_same": encode_response(
                                                          tokenizer, m, d["text"], d["finish"] == "eos") == d["ids"]}
                                                     for d in ds]}
                       for p, m, ds in zip(prompts, messages, draws)]
            teacher_logps = sample_logps(model, tokenizer, kl_rows, cfg)
            for row, logps in zip(kl_rows, teacher_logps):
                for s, lp in zip([s for s in row["samples"] if s["finish"] == "eos"], logps):
                    s["teacher_logp"] = lp
            write_jsonl(tmp / "kl.jsonl", kl_rows)
            samples = [s for r in kl_rows for s in r["samples"]]
            info["kl_samples"] = {"samples": len(samples), "complete": sum(s["finish"] == "eos" for s in samples),
                                  "reencode_differs": sum(not s["reencodes_same"] for s in samples
                                                          if s["finish"] == "eos")}
    write_json(tmp / "info.json", info)
    return info


@torch.no_grad()
def sample_logps(model, tokenizer, kl_rows: list[dict], cfg) -> list[list[float]]:
    """Per held-out prompt, the model's summed log-prob of each complete teacher sample (its sampled ids,
    the stop token included)."""
    groups = [(r["prompt_ids"], [s["ids"] for s in r["samples"] if s["finish"] == "eos"]) for r in kl_rows]
    scored = [g for g in groups if g[1]]  # a prompt whose draws all hit the limit has nothing to score
    layout = prepare(model, scored, tokenizer.pad_token_id, cfg.packing)
    scores = iter(score_groups(model, scored, tokenizer.pad_token_id, layout, cfg.eval.batch_size))
    return [[lp for lp, _ in next(scores)] if g[1] else [] for g in groups]


def kl_estimate(teacher_logps: list[list[float]], model_logps: list[list[float]]) -> dict:
    """KL(teacher || model) over prompts x teacher samples: mean over prompts of the per-prompt mean
    log-ratio, with the standard error over prompts (prompts without a complete sample are skipped)."""
    per_prompt = [statistics.mean(t - m for t, m in zip(ts, ms)) for ts, ms in zip(teacher_logps, model_logps) if ts]
    kl, sd = mean_sd(per_prompt)
    return {"kl": kl, "se": sd / math.sqrt(len(per_prompt)), "prompts": len(per_prompt),
            "samples": sum(len(ts) for ts in teacher_logps)}


def model_kl(model_dir: str, data: Path, cfg) -> dict:
    kl_rows = read_jsonl(data / "kl.jsonl")
    tokenizer = load_tokenizer(model_dir, cfg.model)
    model = load_model(model_dir, cfg.model).eval()
    teacher = [[s["teacher_logp"] for s in r["samples"] if s["finish"] == "eos"] for r in kl_rows]
    return kl_estimate(teacher, sample_logps(model, tokenizer, kl_rows, cfg))


def student_base(teacher: Path, out: Path, shape: dict) -> Path:
    """An untrained, smaller Llama with the teacher's tokenizer (built once)."""
    if not is_done(out):
        produce(out, lambda tmp: build_model(load_tokenizer(str(teacher), Config().model), tmp, **shape))
        finish(out, {"model": shape})
    return out


def _iteration_row(run_dir: Path, name: str, entries: dict, kl: dict) -> dict:
    m = entries[name]["metrics"]
    log = train_log(run_dir / name / "model")
    history = log.get("history", [])
    return {"model": name, **kl, "test_accuracy": m.get("accuracy"), "test_nll": m.get("nll_per_token"),
            "reward_margin": m.get("reward_margin"), "reward_accuracy": m.get("reward_accuracy"),
            "dead_pair_share": m.get("dead_pair_share"),
            "train_loss_mean": statistics.mean(h["loss"] for h in history) if history else None,
            "train_loss_last": history[-1]["loss"] if history else None,
            "train_margin_last": history[-1].get("rewards/margin") if history else None}


def collect(jobs: dict[str, dict], failed: list[str], teacher: Path, data: Path) -> dict:
    runs = {}
    for name, cfg_dict in jobs.items():
        if name in failed:
            continue
        cfg, run_dir = resolved(cfg_dict), Path(cfg_dict["run"]["dir"])
        entries = summary(run_dir)
        rows = []
        for model in entries:
            where = run_dir / model / "model"
            saved = run_dir / model / "kl.json"
            if not saved.exists():
                write_json(saved, model_kl(str(where), data, cfg))
            rows.append(_iteration_row(run_dir, model, entries, read_json(saved)))
        runs[name] = {"seed": cfg.run.seed, "models": rows}
    teacher_self = model_kl(str(teacher), data, resolved(next(iter(jobs.values())))) if jobs else None
    return {"runs": runs, "failed": failed, "teacher_vs_itself": teacher_self, "data": read_json(data / "info.json"),
            "fixed_point_loss": FIXED_POINT_LOSS}


def table(results: dict) -> str:
    runs = list(results["runs"].values())
    if not runs:
        return "No run finished; see the logs in runs/.\n"
    info = results["data"]
    ks = info["kl_samples"]
    lines = [f"KL(teacher || model) on {runs[0]['models'][0]['prompts']} held-out prompts x up to "
             f"{SAMPLES_PER_PROMPT} teacher samples ({ks['complete']} complete of {ks['samples']}; "
             f"{ks['reencode_differs']} complete ones whose text re-encodes to other token ids), in nats per response, "
             "± its standard error over prompts; one block per seed. The teacher scored against itself gives "
             f"{results['teacher_vs_itself']['kl']:.2g} (a check of the estimator). Teacher samples as SFT data: "
             f"{info['train']['kept']} training and {info['val']['kept']} validation responses (draws that hit "
             f"the token limit or are empty are left out: {info['train']['hit_max_new_tokens']} and "
             f"{info['train']['empty']} of the training draws) "
             f"({info['train']['correct']} of {info['train']['prompts']} training samples state the right answer). "
             f"Fixed point of the logistic loss: log 2 = {FIXED_POINT_LOSS:.4f}, margin 0.", ""]
    head = ("| model | KL ± se | test acc | NLL/token | held-out reward margin | reward acc | dead pairs | "
            "train loss (mean) | train loss (last) | train margin (last) |")
    for r in runs:
        lines += [f"Seed {r['seed']}:", "", head, "|---|---|---|---|---|---|---|---|---|---|"]
        for m in r["models"]:
            n = lambda k, d=4: "-" if m[k] is None else f"{m[k]:.{d}f}"  # noqa: E731
            lines.append(f"| {m['model']} | {m['kl']:.4f} ± {m['se']:.4f} | {n('test_accuracy', 3)} | "
                         f"{n('test_nll')} | "
                         f"{n('reward_margin')} | {n('reward_accuracy', 3)} | {n('dead_pair_share', 3)} | "
                         f"{n('train_loss_mean')} | {n('train_loss_last')} | {n('train_margin_last')} |")
        lines.append("")
    if len(runs) > 1:
        names = [m["model"] for m in runs[0]["models"]]
        lines += ["Over seeds (mean ± sd of the KL estimates): " + "; ".join(
            f"{n} {fmt([r['models'][i]['kl'] for r in runs], 4)}" for i, n in enumerate(names)) + ".", ""]
    if results["failed"]:
        lines += [f"Failed runs (see their logs): {', '.join(results['failed'])}", ""]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    from spinlm.report.plots import figure

    runs = list(results["runs"].values())
    if not runs:
        return
    fig, (kl_ax, loss_ax, margin_ax) = figure(1, 3)
    for r in runs:
        models = [m for m in r["models"] if m["model"] != "continued-sft"]
        xs = list(range(len(models)))
        drawn = kl_ax.errorbar(xs, [m["kl"] for m in models], yerr=[m["se"] for m in models], marker="o", capsize=3,
                               label=f"SPIN, seed {r['seed']}")
        cont = next((m for m in r["models"] if m["model"] == "continued-sft"), None)
        if cont:  # beside the last iteration, in the seed's colour
            kl_ax.errorbar([xs[-1] + 0.15], [cont["kl"]], yerr=[cont["se"]], marker="s", capsize=3, linestyle="none",
                           color=drawn.lines[0].get_color(), label=f"continued SFT (equal steps), seed {r['seed']}")
        spin = models[1:]
        loss_ax.plot(xs[1:], [m["train_loss_last"] for m in spin], marker="o", label=f"seed {r['seed']}")
        margin_ax.plot(xs[1:], [m["reward_margin"] for m in spin], marker="o", label=f"seed {r['seed']}")
    loss_ax.axhline(FIXED_POINT_LOSS, color="grey", linestyle="--", label="log 2")
    margin_ax.axhline(0.0, color="grey", linestyle="--", label="0")
    labels = [m["model"] for m in runs[0]["models"] if m["model"] != "continued-sft"]
    for ax, title in ((kl_ax, "KL(teacher || model), nats / response"), (loss_ax, "SPIN loss, last logging window"),
                      (margin_ax, "held-out reward margin")):
        ax.set_xticks(range(len(labels)), labels, fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=6)
    fig.savefig(path, dpi=110)
