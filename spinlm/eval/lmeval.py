"""Benchmarks through lm-evaluation-harness (optional: `pip install 'spinlm[lmeval]'`).

    spinlm lm-eval --model RUN/iteration-2/model --preset open_llm --out results.json
    spinlm lm-eval --model MODEL_DIR --tasks my_task,arc_easy:5 --include-path my_tasks/ --out results.json

A preset is the paper's benchmark list: each task with its shot count and the one metric the
paper reports, run with the settings of the harness the paper used where the installed lm-eval
lets them be set (PAPER_HARNESS; docs/evaluation.md lists what still differs and by how much).
lm-eval takes one shot count per call, so there is one `simple_evaluate` call per distinct shot
count and generation setting (the model is loaded once). The presets' datasets come from the
Hugging Face Hub: they need the network (or a filled datasets cache).
"""

from __future__ import annotations

import difflib
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from spinlm.errors import UserError
from spinlm.io import write_json

log = logging.getLogger("spinlm")
INSTALL = "pip install 'spinlm[lmeval]'"


@dataclass(frozen=True)
class Benchmark:
    """One task: lm-eval's name, shots (None = the task's own default), the metric and filter reported."""

    task: str
    shots: int | None
    metric: str | None = None  # None: the first metric the task reports
    filter: str = "none"
    until: tuple[str, ...] | None = None  # stop strings replacing the task's own (the paper's harness had these)


# The harness the paper ran (uclaml/SPIN README: "v0.4.0"; the commit it links, 46c7966 of 2023-12-28, is
# the v0.4.0 tag plus 152 commits). Its hf backend never added a BOS token for causal LMs
# (huggingface.py tok_encode / tok_batch_encode: add_special_tokens=False); lm-eval >= 0.4.10 follows the
# tokenizer instead (PR #3347, `add_bos_token` default None), which for Mistral/Llama tokenizers adds <s>.
PAPER_HARNESS = "lm-evaluation-harness 46c796644913cd99da7eee868e64f9ed6af33407 (v0.4.0 + 152 commits)"
PAPER_MODEL_ARGS = {"add_bos_token": False}

PRESETS: dict[str, list[Benchmark]] = {
    # The Open LLM Leaderboard (v1) suite of the paper's Table 3, shots and metrics as SPIN.md gives them.
    # truthfulqa_mc2's "acc" is the mc2 score. GSM8k: the exact match of the "#### N" answer, lm-eval's
    # strict-match filter ("get-answer" in 46c7966's gsm8k.yaml, version 1.0, which also stopped at a blank
    # line: its `until` is restored here; version 3.0 dropped "\n\n").
    "open_llm": [
        Benchmark("arc_challenge", 25, "acc_norm"),
        Benchmark("truthfulqa_mc2", 0, "acc"),
        Benchmark("winogrande", 5, "acc"),
        Benchmark("gsm8k", 5, "exact_match", "strict-match", until=("\n\n", "Question:")),
        Benchmark("hellaswag", 10, "acc_norm"),
        Benchmark("mmlu", 5, "acc"),
    ],
    # The paper's further tasks (Big-Bench causal judgement, formal fallacies, sports understanding,
    # and OpenBookQA). The BBH versions carry their own 3-shot prompts; the paper states no shot
    # count for OpenBookQA: 0-shot acc_norm here.
    "bigbench_spin": [
        Benchmark("bbh_fewshot_causal_judgement", 3, "exact_match"),
        Benchmark("bbh_fewshot_formal_fallacies", 3, "exact_match"),
        Benchmark("bbh_fewshot_sports_understanding", 3, "exact_match"),
        Benchmark("openbookqa", 0, "acc_norm"),
    ],
}


def import_lm_eval():
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager  # noqa: F401
    except ImportError as e:
        raise UserError(f"spinlm lm-eval needs lm-evaluation-harness: {INSTALL} ({e})") from None
    return lm_eval


def parse_tasks(spec: str) -> list[Benchmark]:
    """'task1,task2:5' -> benchmarks (':N' sets the shots; the reported metric is the task's first)."""
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, shots = item.partition(":")
        if shots and not shots.isdigit():
            raise UserError(f"--tasks: '{item}': the shot count after ':' must be a whole number")
        out.append(Benchmark(name, int(shots) if shots else None))
    if not out:
        raise UserError("--tasks: no task named")
    return out


def benchmarks(preset: str | None, tasks: str | None) -> list[Benchmark]:
    if bool(preset) == bool(tasks):
        raise UserError("spinlm lm-eval: give either --preset or --tasks")
    if tasks:
        return parse_tasks(tasks)
    if preset not in PRESETS:
        raise UserError(f"--preset {preset!r}: unknown; choose one of {', '.join(PRESETS)}")
    return PRESETS[preset]


def task_manager(include_path: str | None):
    from lm_eval.tasks import TaskManager

    if include_path and not Path(include_path).is_dir():
        raise UserError(f"--include-path {include_path}: no such directory")
    return TaskManager(include_path=include_path) if include_path else TaskManager()


def check_tasks(manager, benches: list[Benchmark]) -> None:
    """Every task must be known to lm-eval (or in --include-path): say which is not, and what is close."""
    known = set(manager.all_tasks)
    bad = []
    for b in benches:
        if b.task not in known:
            close = difflib.get_close_matches(b.task, known, n=1)
            bad.append(f"'{b.task}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    if bad:
        raise UserError(f"lm-eval does not know the task(s) {', '.join(bad)}; `lm-eval ls tasks` lists them, "
                        "and --include-path adds a directory of task YAML files")


def load_lm(model: str, dtype: str, batch_size: str, model_args: dict | None = None):
    """lm-eval's `hf` backend, loaded once for every call; `model_args` as for `--model_args`."""
    import lm_eval.api.registry
    import torch

    from spinlm.modeling import inference_dtype

    resolved = str(inference_dtype(dtype)).removeprefix("torch.")
    args = {"pretrained": model, "dtype": resolved, "trust_remote_code": False, **(model_args or {})}
    extra = {"batch_size": batch_size, "device": "cuda" if torch.cuda.is_available() else "cpu"}
    log.info("lm-eval: loading %s (%s) with the hf backend", model, resolved)
    return lm_eval.api.registry.get_model("hf").create_from_arg_obj(args, extra)


def run_group(lm, manager, benches: list[Benchmark], shots: int | None, limit: float | None,
              chat: bool, until: tuple[str, ...] | None = None) -> dict:
    """One simple_evaluate call for the tasks that share a shot count and stop strings; returns lm-eval's
    results per task, and under "_generation_kwargs" each generating task's settings as lm-eval applied them."""
    import lm_eval

    log.info("lm-eval: %s, %s-shot", ", ".join(b.task for b in benches), "default" if shots is None else shots)
    out = lm_eval.simple_evaluate(model=lm, tasks=[b.task for b in benches], num_fewshot=shots, limit=limit,
                                  task_manager=manager, log_samples=False, apply_chat_template=chat,
                                  fewshot_as_multiturn=chat, gen_kwargs={"until": list(until)} if until else None)
    configs = out.get("configs", {})
    applied = {t: c["generation_kwargs"] for t, c in configs.items() if c.get("output_type") == "generate_until"}
    return {**out["results"], "_generation_kwargs": applied}


def pick(bench: Benchmark, result: dict) -> dict:
    """The reported metric (and its stderr) of one task's lm-eval result."""
    metrics = [k.partition(",") for k in result if "," in k and "_stderr," not in k]
    if bench.metric is None:
        if not metrics:
            raise UserError(f"lm-eval reported no metric for task '{bench.task}'")
        metric, _, filt = metrics[0]
    else:
        metric, filt = bench.metric, bench.filter
    key = f"{metric},{filt}"
    if key not in result:
        raise UserError(f"lm-eval's result for '{bench.task}' has no '{key}' (it has: "
                        f"{', '.join(m + ',' + f for m, _, f in metrics)})")
    return {"metric": metric, "filter": filt, "num_fewshot": bench.shots, "value": _number(result[key]),
            "stderr": _number(result.get(f"{metric}_stderr,{filt}")), "samples": result.get("sample_len")}


def _number(v) -> float | None:
    """lm-eval writes 'N/A' where no stderr was computed."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def lm_eval_run(model: str, out: Path, preset: str | None = None, tasks: str | None = None,
                limit: float | None = None, include_path: str | None = None, dtype: str = "auto",
                batch_size: str = "8", chat: bool = False) -> dict:
    """Evaluate `model` on a preset or on named tasks; write and return the summary."""
    from spinlm.modeling import check_local

    benches = benchmarks(preset, tasks)
    check_local(model)
    lm_eval = import_lm_eval()
    manager = task_manager(include_path)
    check_tasks(manager, benches)
    model_args = PAPER_MODEL_ARGS if preset else {}
    lm = load_lm(model, dtype, batch_size, model_args)
    results, generation = {}, {}
    for shots, until in dict.fromkeys((b.shots, b.until) for b in benches):  # in preset order
        group = [b for b in benches if (b.shots, b.until) == (shots, until)]
        found = run_group(lm, manager, group, shots, limit, chat, until)
        generation.update(found.pop("_generation_kwargs", {}))
        results.update(found)
    per_task = {b.task: pick(b, results.get(b.task, {})) for b in benches}
    values = [r["value"] for r in per_task.values() if r["value"] is not None]
    summary = {"model": model, "preset": preset, "lm_eval_version": _version(lm_eval), "limit": limit,
               "apply_chat_template": chat, "harness_of_the_paper": PAPER_HARNESS if preset else None,
               "model_args": model_args, "generation_kwargs": json.loads(json.dumps(generation, default=_plain)),
               "tasks": per_task,
               "average": sum(values) / len(values) if len(values) == len(per_task) else None,
               "benchmarks": [asdict(b) for b in benches],
               "lm_eval_results": json.loads(json.dumps(results, default=_plain))}
    write_json(out, summary)
    log.info("lm-eval: %s", ", ".join(f"{t} {r['metric']} {r['value']:.4f}" for t, r in per_task.items()
                                      if r["value"] is not None))
    return summary


def _plain(o):
    """JSON for what lm-eval's results may hold besides plain values: numpy scalars, anything else as text."""
    return o.item() if hasattr(o, "item") else str(o)


def _version(lm_eval) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return getattr(lm_eval, "__version__", None)
