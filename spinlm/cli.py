"""The `spinlm` command: the whole loop (`run`, `demo`), each stage on its own, and `report` / `lm-eval`
on what a run made.

Exit codes: 0 success, 2 a mistake in the user's input (one message, no traceback),
3 training stopped by a guard (non-finite loss or gradient), 1 a bug in spinlm (with traceback), 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path

from . import __version__
from . import config as config_mod
from .errors import UserError

log = logging.getLogger("spinlm")

OVERRIDES_HELP = ("Any config key can be set as --section.key=value (for example --train.learning_rate=1e-6 "
                  "or --spin.beta=[0.1,0.1,5.0]); precedence: defaults < CONFIG.yaml < flags. "
                  "`spinlm config` lists every key.")


def _epilog() -> str:
    import textwrap

    return textwrap.fill(OVERRIDES_HELP, 100) + "\n\nconfig keys:\n" + config_mod.reference()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spinlm", description="Self-Play Fine-Tuning (SPIN) for Hugging Face causal LMs.",
                                epilog=OVERRIDES_HELP)
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
    add("validate", "Check a run's config, model, tokenizer, every data row, lengths and disk space; "
        "print the token estimates per iteration. `spinlm run` does the same checks first.", True)
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
    sp = add("evaluate", "Held-out metrics of a model: NLL, task accuracy, rewards on scored pairs.")
    sp.add_argument("--model", required=True, help="Model to evaluate.")
    sp.add_argument("--data", required=True, help="Held-out data.")
    sp.add_argument("--pairs", help="Scored held-out pairs (generated and scored by the reference model).")
    sp.add_argument("--beta", type=float, help="beta for the reward metrics (default spin.beta).")
    sp.add_argument("--out", required=True, help="Output metrics .json.")
    sub.add_parser("config", help="Print every config key with its type, default and meaning.")
    sp = sub.add_parser("report", help="Write RUN/report/README.md (table, verdict, PNG plots) and model cards.",
                        description="Markdown report of a run with PNG plots (needs `pip install 'spinlm[report]'`), "
                        "and a README.md model card in each model directory of the run.")
    sp.add_argument("run_dir", metavar="RUN_DIR", help="A run directory written by `spinlm run`.")
    sp.add_argument("--out", help="Report directory (default RUN_DIR/report).")
    _add_lm_eval(sub)
    return p


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
    from .modeling import use_deterministic

    use_deterministic(cfg.run.deterministic)
    return cfg


def _atomic(out: str, fn) -> None:
    """Run a stage writing to OUT.tmp, then rename: a crash never leaves OUT half-written."""
    from . import dist
    from .io import produce, remove_scratch

    produce(Path(out), fn)
    if dist.is_main():
        remove_scratch(Path(out))
        print(f"wrote {out}")


def _examples(cfg, source: str | None, split: str):
    from .data import load_examples

    if not source:
        return []
    return load_examples(source, split=split, format=cfg.data.format, turn=cfg.data.turn)


def dispatch(args, overrides: list[str]) -> None:
    if args.command == "config":
        print(config_mod.reference())
    elif args.command == "run":
        from .loop import run

        cfg = config_mod.build(args.config, overrides)
        config_mod.validate(cfg)
        run_dir = run(cfg, force=args.force)
        from . import dist

        if dist.is_main():
            print(f"run directory: {run_dir}")
    elif args.command == "validate":
        from .validate import check, report

        cfg = config_mod.build(args.config, overrides)
        config_mod.validate(cfg)
        print(report(check(cfg)))
    elif args.command == "demo":
        from .demo.run import demo

        demo(args.out, overrides, force=args.force)
    elif args.command in ("report", "lm-eval"):
        if overrides:
            raise UserError(f"spinlm {args.command}: unknown arguments {' '.join(overrides)}")
        dispatch_tool(args)
    else:
        dispatch_stage(args, overrides)


def dispatch_tool(args) -> None:
    """Commands that read a finished run or model: report, lm-eval."""
    if args.command == "report":
        from .report import report

        print(f"wrote {report(args.run_dir, args.out)}")
    else:
        from .lmeval import lm_eval_run

        limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
        summary = lm_eval_run(args.model, Path(args.out), preset=args.preset, tasks=args.tasks, limit=limit,
                              include_path=args.include_path, dtype=args.dtype, batch_size=args.batch_size,
                              chat=args.apply_chat_template)
        avg = summary["average"]
        print(f"wrote {args.out}" + (f" (average {avg:.4f})" if avg is not None else ""))


def dispatch_stage(args, overrides: list[str]) -> None:
    from .io import read_jsonl, write_main

    cfg = _stage_config(args, overrides, args.model)
    if args.command == "sft":
        from .sft import sft

        train = _examples(cfg, args.data, cfg.data.train_split)
        held = _examples(cfg, args.eval_data, cfg.data.eval_split)
        _atomic(args.out, lambda tmp: sft(args.model, train, held, tmp, cfg))
    elif args.command == "generate":
        from .generate import generate_file

        examples = _examples(cfg, args.data, cfg.data.train_split)
        _atomic(args.out, lambda tmp: generate_file(args.model, examples, tmp, cfg, args.iteration))
    elif args.command == "score":
        from .score import score_files

        _atomic(args.out, lambda tmp: score_files(args.model, [Path(g) for g in args.generations], tmp, cfg))
    elif args.command == "train":
        from .train import train

        _atomic(args.out, lambda tmp: train(args.model, Path(args.pairs), tmp, cfg, args.iteration))
    elif args.command == "evaluate":
        from .evaluate import evaluate

        examples = _examples(cfg, args.data, cfg.data.eval_split)
        pairs = read_jsonl(args.pairs) if args.pairs else None
        _atomic(args.out, lambda tmp: write_main(tmp, evaluate(args.model, examples, cfg, pairs, args.beta)))


def main(argv: list[str] | None = None) -> int:
    args, overrides = _parser().parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.raiseExceptions = False  # a full disk must not turn every log line into a traceback
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from .modeling import quiet_transformers

        quiet_transformers()
        if os.environ.get("WORLD_SIZE", "1") != "1":  # under torchrun / accelerate launch: rank 0 speaks
            from . import dist

            if not dist.is_main():
                log.setLevel(logging.WARNING)
        dispatch(args, overrides)
    except UserError as e:
        print(f"spinlm: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("spinlm: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:
        from .errors import disk_full

        if disk_full(e):
            print(f"spinlm: error: the disk is full: {e}; nothing was marked done: free some space, then re-run "
                  "the same command to resume", file=sys.stderr)
            return 2
        traceback.print_exc()
        print("spinlm: internal error (a bug in spinlm): please report it with the traceback above", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
