"""The `spinlm` command: the whole loop (`run`, `demo`), each stage on its own, `report` / `lm-eval` /
`push` on what a run made, and `experiment` (the paper's claims at CPU scale).

Exit codes: EXIT_CODES below (`spinlm --help` prints them).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path

from spinlm import __version__, preempt
from spinlm import config as config_mod
from spinlm.errors import Preempted, UserError

log = logging.getLogger("spinlm")

OVERRIDES_HELP = ("Any config key can be set as --section.key=value (for example --train.learning_rate=1e-6 "
                  "or --spin.beta=[0.1,0.1,5.0]); precedence: defaults < CONFIG.yaml < flags. "
                  "`spinlm config` lists every key.")
EXIT_CODES = ("Exit codes: 0 success; 2 a mistake in the input (config, data, paths), a full disk, or a Hub "
              "upload refused or unreachable (run.push_to_hub, push); 3 training "
              "stopped by a guard (non-finite loss or gradient); 75 preempted: a signal (run.preempt_signals, "
              "Ctrl-C) stopped it at a safe point, re-run the same command to resume (a job script requeues on "
              "75); 1 a bug in spinlm (traceback printed); 130 interrupted where nothing watches for signals (demo, "
              "experiment, judge, report, lm-eval, push).")


def _epilog() -> str:
    import textwrap

    return (textwrap.fill(OVERRIDES_HELP, 100) + "\n\n" + textwrap.fill(EXIT_CODES, 100) + "\n\nconfig keys:\n"
            + config_mod.reference())


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spinlm", description="Self-Play Fine-Tuning (SPIN) for Hugging Face causal LMs.",
                                epilog=OVERRIDES_HELP + "\n\n" + EXIT_CODES)
    p.add_argument("--version", action="version", version=f"spinlm {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help: str, config_positional: bool = False) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help, epilog=_epilog(),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        if config_positional:
            sp.add_argument("config", metavar="CONFIG.yaml", help="The run's YAML config.")
        else:
            sp.add_argument("--config", metavar="CONFIG.yaml", help="Optional YAML config for settings.")
        return sp

    sp = add("run", "Run (or resume) the SPIN loop: generate -> score -> train -> evaluate, T iterations.", True)
    sp.add_argument("--force", action="store_true", help="Resume even if result-affecting settings changed.")
    sp = add("validate", "Check a run's config, model, tokenizer, every data row, lengths, disk space and memory "
             "per device; print the token and memory estimates. `spinlm run` does the same checks first.", True)
    sp.add_argument("--world-size", type=int, default=None, metavar="N",
                    help="Plan the memory for N processes (default: this launch's, 1 without torchrun).")
    sp.add_argument("--device-gib", type=float, default=None, metavar="GIB",
                    help="Plan the memory for devices of GIB GiB (default: this machine's GPU; none on a CPU).")
    sp = sub.add_parser("demo", help="Build a tiny model and task locally, SFT it, run 3 SPIN iterations on CPU.",
                        description="The embedded CPU demo (no network).", epilog=_epilog(),
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    sp.add_argument("--out", default="runs/demo", help="Run directory (default runs/demo).")
    sp.add_argument("--force", action="store_true", help="Resume even if result-affecting settings changed.")
    sp = add("sft", "Supervised fine-tuning on (prompt, response) data; keeps the best held-out NLL model.")
    sp.add_argument("--model", required=True, help="Model to fine-tune (directory or Hub id).")
    sp.add_argument("--data", required=True, help="Training data file or Hub dataset id.")
    sp.add_argument("--eval-data", help="Held-out data for the NLL check / early stopping.")
    sp.add_argument("--out", required=True, help="Output model directory.")
    sp = add("generate", "Sample one response per prompt with a model.")
    sp.add_argument("--model", required=True, help="The generating model p_t.")
    sp.add_argument("--data", required=True, help="Prompts with real responses (any supported format).")
    sp.add_argument("--out", required=True, help="Output generations .jsonl.")
    sp.add_argument("--iteration", type=int, default=0, help="Iteration number (part of each row's seed).")
    sp = add("score", "Reference log-probs of real and generated responses under a model.")
    sp.add_argument("--model", required=True, help="The reference model p_t.")
    sp.add_argument("--generations", required=True, nargs="+", help="Generation files (the mix window).")
    sp.add_argument("--out", required=True, help="Output scored pairs .jsonl.")
    sp = add("train", "Train the next iterate on scored pairs (no reference model is loaded).")
    sp.add_argument("--model", required=True, help="Model to start from (p_t).")
    sp.add_argument("--pairs", required=True, help="Scored pairs .jsonl from `spinlm score`.")
    sp.add_argument("--out", required=True, help="Output model directory.")
    sp.add_argument("--iteration", type=int, default=0, help="Which entry of per-iteration lr/beta lists to use.")
    sp = add("dpo", "DPO on given preference pairs (the paper's baseline; SPIN then DPO): score them under the "
             "starting model once, then train with SPIN's loop and loss (spin.beta, spin.loss_type, train.*).")
    sp.add_argument("--model", help="Model to start from, also the reference (default: model.name_or_path).")
    sp.add_argument("--data", help="Preference pairs: prompt/chosen/rejected (TRL, strings or messages) or "
                    "real/generated (SPIN data); file or Hub id, split data.train_split (default: data.train).")
    sp.add_argument("--eval-data", help="Held-out preference pairs for reward accuracy / NLL (default: data.eval, "
                    "split data.eval_split).")
    sp.add_argument("--out", required=True, help="Output model directory (scored pairs go to OUT.pairs.jsonl).")
    sp = add("evaluate", "Held-out metrics of a model: NLL, task accuracy, rewards on scored pairs.")
    sp.add_argument("--model", required=True, help="Model to evaluate.")
    sp.add_argument("--data", required=True, help="Held-out data.")
    sp.add_argument("--pairs", help="Scored held-out pairs (generated and scored by the reference model).")
    sp.add_argument("--beta", type=float, help="beta for the reward metrics (default spin.beta).")
    sp.add_argument("--out", required=True, help="Output metrics .json.")
    sp = sub.add_parser("config", help="Print every config key with its type, default and meaning.")
    sp.add_argument("--markdown", action="store_true", help="As docs/config.md: a Markdown table per section.")
    sp = sub.add_parser("report", help="Write RUN/report/README.md (table, verdict, PNG plots) and model cards.",
                        description="Markdown report of a run with PNG plots (needs `pip install 'spinlm[report]'`), "
                        "and a README.md model card in each model directory of the run.")
    sp.add_argument("run_dir", metavar="RUN_DIR", help="A run directory written by `spinlm run`.")
    sp.add_argument("--out", help="Report directory (default RUN_DIR/report).")
    _add_push(sub)
    _add_lm_eval(sub)
    _add_judge(add)
    _add_experiment(sub)
    return p


def _add_experiment(sub) -> None:
    import textwrap

    from spinlm.experiment import EXPERIMENTS

    about = ("The paper's claims reproduced small, one command each (the plots need `pip install "
             "'spinlm[report]'`). Every --section.key=value flag applies to each SPIN run of the experiment.")
    listing = "\n".join(textwrap.fill(f"{k}: {e.summary}", 100, initial_indent="  ", subsequent_indent="    ")
                         for k, e in EXPERIMENTS.items())
    sp = sub.add_parser("experiment", help="Run one of the paper's claims at CPU scale (results.md, .json, PNG).",
                        description=textwrap.fill(about, 100) + "\n\n" + listing, epilog=_epilog(),
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    sp.add_argument("name", choices=list(EXPERIMENTS), help="Which experiment.")
    sp.add_argument("--out", help="Output directory (default runs/experiment-NAME); re-running resumes it.")
    sp.add_argument("--seeds", type=int, nargs="+", help="Seeds (default: the experiment's, see RESULTS.md).")
    sp.add_argument("--iterations", type=int, help="SPIN iterations per run (default: the experiment's).")
    sp.add_argument("--workers", type=int, default=2, help="Runs side by side, one thread each (default 2).")
    sp.add_argument("--quick", action="store_true", help="A tiny task and model: the whole experiment in about "
                    "a minute, to try it out (the numbers mean nothing).")


def _add_judge(add) -> None:
    sp = add("judge", "Judged evaluation: the model answers multi-turn questions (generated here), a judge model "
             "behind an OpenAI-compatible chat endpoint grades each turn 1-10, or compares two models in both orders "
             "(--pairwise). With --judge-prompts: MT-Bench as FastChat's llm_judge runs it (docs/evaluation.md; "
             "judge.* keys); without: spinlm's quick judge, not MT-Bench. Judgments are cached in OUT: a re-run "
             "resumes.")
    sp.add_argument("--model", required=True, help="Model to evaluate (model A in pairwise mode).")
    sp.add_argument("--questions", required=True, help="Questions: MT-Bench JSON lines (question_id, category, "
                    "turns, optional reference) or a Hub dataset id.")
    sp.add_argument("--judge-prompts", help="MT-Bench: FastChat's judge_prompts.jsonl (name, type, system_prompt, "
                    "prompt_template, output_format); selects the MT-Bench protocol.")
    sp.add_argument("--reference-answers", help="MT-Bench: reference answers in FastChat's answer format "
                    "(data/mt_bench/reference_answer/gpt-4.jsonl) for the judge.reference_categories questions "
                    "(default: each question's own 'reference').")
    sp.add_argument("--questions-split", default="train", help="Split when --questions is a Hub id (default train).")
    sp.add_argument("--max-questions", type=int, help="Use only the first N questions.")
    sp.add_argument("--judge-url", required=True, help="Base URL of the judge's OpenAI-compatible server "
                    "(e.g. https://api.openai.com/v1 or http://127.0.0.1:8000).")
    sp.add_argument("--judge-model", required=True, help="Model name sent to the judge server.")
    sp.add_argument("--api-key-env", help="Name of the environment variable holding the judge's API key "
                    "(the key itself is never logged or written).")
    sp.add_argument("--pairwise", action="store_true", help="Compare --model with --model-b instead of grading.")
    sp.add_argument("--model-b", help="The other model of a pairwise comparison.")
    sp.add_argument("--sample", action="store_true", help="Quick judge: sample the answers with "
                    "generation.temperature / top_p / top_k (default: greedy). MT-Bench samples per category.")
    sp.add_argument("--concurrency", type=int, default=8, help="Judge requests in flight (default 8).")
    sp.add_argument("--timeout-s", type=float, default=120.0, help="Seconds per judge request (default 120).")
    sp.add_argument("--retries", type=int, default=4, help="Retries on connection errors, timeouts, 429, 5xx.")
    sp.add_argument("--judge-max-tokens", type=int, help="Longest judge reply (default: 2048 for MT-Bench, as "
                    "FastChat asks OpenAI judges; 1024 for the quick judge).")
    sp.add_argument("--out", required=True, help="Output directory: judge.json, judgments.jsonl, answers, caches.")


def _add_push(sub) -> None:
    sp = sub.add_parser("push", help="Upload a run's models to the Hugging Face Hub (token from HF_TOKEN).",
                        description="Upload a run's models, with their model cards, to one Hugging Face Hub repo: "
                        "each model on a branch named after it (sft, iteration-T) and RUN/best's on main, or one "
                        "model with --iteration / --best. The token comes from the environment variable HF_TOKEN. "
                        "RUN/pushed.json records what was pushed: a re-run pushes only what is not there yet.")
    sp.add_argument("run_dir", metavar="RUN_DIR", help="A run directory written by `spinlm run`.")
    which = sp.add_mutually_exclusive_group()
    which.add_argument("--iteration", type=int, metavar="N", help="Only iteration N's model (to branch iteration-N).")
    which.add_argument("--best", action="store_true", help="Only RUN/best's model, chosen on validation (to main).")
    sp.add_argument("--repo-id", help="NAME or ORG/NAME (default: the run's run.hub_model_id); created if missing.")
    sp.add_argument("--private", action="store_true", default=None,
                    help="Create the repo private (default: the run's run.hub_private_repo).")
    sp.add_argument("--branch", help="With --iteration or --best: push to this branch instead.")
    sp.add_argument("--force", action="store_true", help="Push again what RUN/pushed.json records as pushed.")
    sp.add_argument("--dry-run", action="store_true", help="Write the model cards and print what would be pushed "
                    "(repo, branch, files); no token needed, nothing sent or recorded.")


def _add_lm_eval(sub) -> None:
    sp = sub.add_parser("lm-eval", help="Benchmarks through lm-evaluation-harness (the paper's presets or any task).",
                        description="Evaluate a model with lm-evaluation-harness (`pip install 'spinlm[lmeval]'`): "
                        "a preset (the paper's tasks, shots and metrics; their datasets come from the Hugging Face "
                        "Hub) or --tasks.")
    sp.add_argument("--model", required=True, help="Model directory (e.g. RUN/iteration-2/model) or Hub id.")
    sp.add_argument("--preset", help="open_llm (ARC, TruthfulQA, Winogrande, GSM8k, HellaSwag, MMLU) or "
                    "bigbench_spin (BBH causal judgement, formal fallacies, sports understanding; OpenBookQA).")
    sp.add_argument("--tasks", help="Comma-separated lm-eval task names, each optionally NAME:SHOTS.")
    sp.add_argument("--limit", type=float, help="Examples per task (testing only); below 1: a fraction.")
    sp.add_argument("--include-path", help="Directory of extra lm-eval task YAML files.")
    sp.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="Weights dtype (auto: bf16 on a GPU that supports it, else fp32).")
    sp.add_argument("--batch-size", default="8", help="Batch size, or 'auto' (default 8).")
    sp.add_argument("--apply-chat-template", action="store_true",
                    help="Render prompts with the model's chat template (the leaderboard did not).")
    sp.add_argument("--out", required=True, help="Output results .json.")


def _stage_config(args, overrides: list[str], model: str | None = None):
    cfg = config_mod.build(args.config, overrides)
    if model:
        cfg.model.name_or_path = model
    config_mod.validate(cfg, need=("model",))
    from spinlm import dist
    from spinlm.modeling import use_deterministic
    from spinlm.progress import configure

    dist.configure(cfg.run)
    configure(cfg.run)

    use_deterministic(cfg.run.deterministic)
    return cfg


def _atomic(out: str, fn) -> None:
    """Run a stage writing to OUT.tmp, then rename: a crash never leaves OUT half-written."""
    from spinlm import dist
    from spinlm.io import finish, produce

    produce(Path(out), fn)
    finish(Path(out))
    if dist.is_main():
        print(f"wrote {out}")


def _examples(cfg, source: str | None, role: str, sources: dict | None = None, **kw):
    """Examples of `source` read as data role `role` (train, val, eval): its split, subset and revision. A Hub
    dataset's commit and files read go to `sources[role]`."""
    from spinlm.data import load_examples

    if not source:
        return []
    d, counts = cfg.data, {}
    examples = load_examples(source, split=getattr(d, f"{role}_split"), subset=getattr(d, f"{role}_subset"),
                             revision=getattr(d, f"{role}_revision"), format=d.format, turn=d.turn, counts=counts,
                             **kw)
    if sources is not None and counts.get("hub"):
        sources[role] = counts["hub"]
    return examples


def dispatch(args, overrides: list[str]) -> None:
    if args.command == "config":
        print(config_mod.reference_markdown().rstrip("\n") if args.markdown else config_mod.reference())
    elif args.command == "run":
        from spinlm.loop import run

        cfg = config_mod.build(args.config, overrides)
        config_mod.validate(cfg)
        with preempt.watch(cfg.run):
            run_dir = run(cfg, force=args.force)
        from spinlm import dist

        if dist.is_main():
            print(f"run directory: {run_dir}")
    elif args.command == "validate":
        from spinlm.validate import check, report

        cfg = config_mod.build(args.config, overrides)
        config_mod.validate(cfg)
        print(report(check(cfg, world=args.world_size, device_gib=args.device_gib)))
    elif args.command == "demo":
        from spinlm.demo.run import demo

        demo(args.out, overrides, force=args.force)
    elif args.command == "experiment":
        _experiment(args, overrides)
    elif args.command in ("report", "lm-eval", "push"):
        if overrides:
            raise UserError(f"spinlm {args.command}: unknown arguments {' '.join(overrides)}")
        dispatch_tool(args)
    else:
        dispatch_stage(args, overrides)


def dispatch_tool(args) -> None:
    """Commands that read a finished run or model: report, push, lm-eval."""
    if args.command == "report":
        from spinlm.report.report import report

        print(f"wrote {report(args.run_dir, args.out)}")
    elif args.command == "push":
        _push(args)
    else:
        from spinlm.eval.lmeval import lm_eval_run

        limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
        summary = lm_eval_run(args.model, Path(args.out), preset=args.preset, tasks=args.tasks, limit=limit,
                              include_path=args.include_path, dtype=args.dtype, batch_size=args.batch_size,
                              chat=args.apply_chat_template)
        avg = summary["average"]
        print(f"wrote {args.out}" + (f" (average {avg:.4f})" if avg is not None else ""))


def dispatch_stage(args, overrides: list[str]) -> None:
    cfg = _stage_config(args, overrides, args.model)
    if args.command == "judge":
        _judge(args, cfg)
        return
    with preempt.watch(cfg.run):  # a stage stops at a safe point on a signal: Preempted, exit 75
        run_stage(args, cfg)


def run_stage(args, cfg) -> None:
    """One stage on its own: sft, generate, score, train, dpo, evaluate."""
    from spinlm.io import read_jsonl, write_main

    if args.command == "sft":
        from spinlm.stages.sft import sft

        train = _examples(cfg, args.data, "train")
        held = _examples(cfg, args.eval_data, "eval")
        _atomic(args.out, lambda tmp: sft(args.model, train, held, tmp, cfg))
    elif args.command == "generate":
        from spinlm.stages.generate import generate_file

        examples = _examples(cfg, args.data, "train")
        _atomic(args.out, lambda tmp: generate_file(args.model, examples, tmp, cfg, args.iteration))
    elif args.command == "score":
        from spinlm.stages.score import score_files

        _atomic(args.out, lambda tmp: score_files(args.model, [Path(g) for g in args.generations], tmp, cfg))
    elif args.command == "train":
        from spinlm.stages.train import train

        _atomic(args.out, lambda tmp: train(args.model, Path(args.pairs), tmp, cfg, args.iteration))
    elif args.command == "dpo":
        _dpo(args, cfg)
    elif args.command == "evaluate":
        from spinlm.stages.evaluate import evaluate

        examples = _examples(cfg, args.data, "eval")
        pairs = read_jsonl(args.pairs) if args.pairs else None
        _atomic(args.out, lambda tmp: write_main(tmp, evaluate(args.model, examples, cfg, pairs, args.beta)))


def _push(args) -> None:
    from spinlm.report.publish import push_run

    if args.iteration is not None and args.iteration < 0:
        raise UserError(f"spinlm push: --iteration must be >= 0; got {args.iteration}")
    records = push_run(Path(args.run_dir), args.repo_id, args.private, args.iteration, args.best, args.branch,
                       args.force, args.dry_run)
    for r in records:
        if r.get("dry_run"):
            private = " (private)" if r["private"] else ""
            print(f"would push {r['model']} to {r['repo_id']}, branch {r['branch']}{private}: {len(r['files'])} files "
                  f"({', '.join(r['files'])}); card {r['card']}")
        else:
            print(f"pushed {r['model']} to {r['repo_id']}, branch {r['branch']}: {r['url']}")
    if not records:
        print(f"nothing to push: {Path(args.run_dir) / 'pushed.json'} records it all as pushed (--force pushes again)")


def _experiment(args, overrides: list[str]) -> None:
    from spinlm.experiment import EXPERIMENTS
    from spinlm.experiment.common import Setup, base_config, resolved
    from spinlm.report.plots import require_matplotlib

    exp = EXPERIMENTS[args.name]
    setup = Setup(Path(args.out or f"runs/experiment-{args.name}"), list(args.seeds or exp.seeds),
                  exp.iterations if args.iterations is None else args.iterations, args.workers, args.quick, overrides)
    if setup.iterations <= 0 or setup.workers <= 0:
        raise UserError(f"spinlm experiment: --iterations and --workers must be > 0; got {setup.iterations}, "
                        f"{setup.workers}")
    require_matplotlib()
    resolved(base_config(setup), overrides)  # a bad flag is refused before anything runs
    setup.out.mkdir(parents=True, exist_ok=True)
    exp.run(setup)


def _dpo(args, cfg) -> None:
    from spinlm.dpo import dpo
    from spinlm.loss import OBJECTIVES, objective

    data, held = args.data or cfg.data.train, args.eval_data or cfg.data.eval
    if not data:
        raise UserError("spinlm dpo: no preference data: pass --data PREFS (or set data.train in --config)")
    if objective(cfg.spin.objective).historical:
        names = [name for name, o in OBJECTIVES.items() if not o.historical]
        pairs = f"{', '.join(names[:-1])} or {names[-1]}"
        raise UserError(f"spinlm dpo: spin.objective {cfg.spin.objective} needs the starting model's own responses, "
                        f"kept across self-play iterations; preference pairs have none. Use {pairs}.")
    d, sources = cfg.data, {}
    train = _examples(cfg, data, "train", sources, max_rows=d.max_train_rows, preference=True)
    heldout = _examples(cfg, held, "eval", sources, max_rows=d.max_eval_rows, preference=True) if held else None
    val = []
    if cfg.train.eval_every > 0:  # in-training checks select on validation pairs, never on the reported held-out ones
        from spinlm.validate import require_validation, validation_split

        if d.val:
            val = _examples(cfg, d.val, "val", sources, max_rows=d.max_eval_rows, preference=True)
        else:
            train, val = validation_split(cfg, train, data)
        require_validation(cfg, val)
    record = dpo(cfg.model.name_or_path, train, Path(args.out), cfg, heldout, val, sources)
    from spinlm import dist

    if dist.is_main():
        ev = record["eval"] or {}
        acc = f", held-out reward accuracy {ev['reward_accuracy']:.4f}" if ev.get("reward_accuracy") is not None else ""
        print(f"wrote {args.out} ({record['train']['steps']} optimizer steps on {record['train_rows']} pairs{acc})")


def _judge(args, cfg) -> None:
    from spinlm.eval.judge import MT_BENCH_LABEL, QUICK_LABEL, Judge, MTBenchFiles, judge_run, load_questions
    from spinlm.eval.mt_bench import JUDGE_MAX_TOKENS

    if args.pairwise != bool(args.model_b):
        raise UserError("spinlm judge: --pairwise and --model-b go together (pairwise compares --model with --model-b)")
    mt = MTBenchFiles(args.judge_prompts, args.reference_answers) if args.judge_prompts else None
    if mt is None and args.reference_answers:
        raise UserError("spinlm judge: --reference-answers is MT-Bench's: give --judge-prompts too")
    if mt is not None and args.sample:
        raise UserError("spinlm judge: --sample is the quick judge's; MT-Bench samples each category at its "
                        "judge.temperatures value")
    if args.judge_max_tokens is None:
        args.judge_max_tokens = JUDGE_MAX_TOKENS if mt else 1024
    for name in ("concurrency", "timeout_s", "judge_max_tokens"):
        if getattr(args, name) <= 0:
            raise UserError(f"spinlm judge: --{name.replace('_', '-')} must be > 0; got {getattr(args, name)}")
    if args.retries < 0:
        raise UserError(f"spinlm judge: --retries must be >= 0; got {args.retries}")
    if args.max_questions is not None and args.max_questions <= 0:
        raise UserError(f"spinlm judge: --max-questions must be > 0; got {args.max_questions}")
    if not args.judge_url.startswith(("http://", "https://")):
        raise UserError(f"spinlm judge: --judge-url must start with http:// or https://; got {args.judge_url!r}")
    questions = load_questions(args.questions, args.questions_split, args.max_questions)
    judge = Judge(args.judge_url, args.judge_model, args.api_key_env, args.concurrency, args.timeout_s, args.retries,
                  args.judge_max_tokens)
    s = judge_run(cfg, questions, judge, Path(args.out), args.model_b, args.sample, mt)
    bad = s["unparsable"]["count"]
    if s["mode"] == "single":
        overall = "n/a" if s["overall"] is None else f"{s['overall']:.2f}"
        what = f"average grade {overall} over {s['scored']} turns"
    else:
        rate = lambda k: "n/a" if s[k] is None else f"{s[k]:.3f}"  # noqa: E731
        what = (f"A vs B: win {rate('win_rate')}, tie {rate('tie_rate')}, loss {rate('loss_rate')} over "
                f"{s['scored']} comparisons")
    label = MT_BENCH_LABEL if mt else QUICK_LABEL
    print(f"wrote {Path(args.out) / 'judge.json'} ({label}: {what}; {bad} of {s['judgments']} judge replies "
          "unparsable, not scored)")


def main(argv: list[str] | None = None) -> int:
    args, overrides = _parser().parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.raiseExceptions = False  # a full disk must not turn every log line into a traceback
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from spinlm.modeling import quiet_transformers

        quiet_transformers()
        if os.environ.get("WORLD_SIZE", "1") != "1":  # under torchrun / accelerate launch: rank 0 speaks
            from spinlm import dist

            if not dist.is_main():
                log.setLevel(logging.WARNING)
        dispatch(args, overrides)
    except Preempted as e:
        if e.__cause__ is not None and not isinstance(e.__cause__, UserError):  # an error after the signal
            traceback.print_exception(e.__cause__)
        return _preempted(str(e))
    except UserError as e:
        print(f"spinlm: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("spinlm: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:
        from spinlm.errors import disk_full

        if disk_full(e):
            print(f"spinlm: error: the disk is full: {e}; nothing was marked done: free some space, then re-run "
                  "the same command to resume", file=sys.stderr)
            return 2
        traceback.print_exc()
        print("spinlm: internal error (a bug in spinlm): please report it with the traceback above", file=sys.stderr)
        return 1
    return 0


def _preempted(message: str) -> int:
    """The one line that says what was kept and that a re-run resumes (stderr and RUN/log.txt); every
    process stops at the same point, and rank 0 speaks for them."""
    if os.environ.get("RANK", "0") == "0":
        log.warning("spinlm: preempted (exit code %d): %s", preempt.EXIT_CODE, message)
    preempt.on_the_way_out()
    return preempt.EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
