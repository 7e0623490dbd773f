"""Step time of SPIN's train stage per train.strategy, on CPU, in one run (part of `make bench`).

    python -m benchmarks.strategies [--pairs 128] [--repeats 1] [--smoke]

The bench model and pairs of benchmarks/run.py (a >= 20M-parameter Llama, skewed UltraChat-like
lengths), scored once; then `spinlm train` for the same global batch of 8 pairs:
- ddp, one process with both threads (the baseline);
- ddp, fsdp and (where DeepSpeed is installed) zero3 under `torchrun --nproc_per_node 2`, one
  thread per process, 4 pairs per process per step.
Step time is the mean wall time of the optimizer steps after the first (start-up, loading and
the first step's allocations left out), read from each run's spinlm_train.json. Ratios are
against the one-process ddp run of the same invocation. Results: benchmarks/results/strategies.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

from .run import SIZES, make_inputs

ROOT = Path(__file__).resolve().parent
BATCH = 8
COMMON = ["--run.progress=false", "--run.log_every=1", "--train.epochs=1", "--train.learning_rate=1e-6",
          "--train.warmup_ratio=0.1", "--data.max_length=4096", "--data.max_prompt_length=2048"]


def runs() -> list[tuple[str, int, str]]:
    """(name, processes, strategy)."""
    out = [("ddp x1", 1, "ddp"), ("ddp x2", 2, "ddp"), ("fsdp x2", 2, "fsdp")]
    if importlib.util.find_spec("deepspeed") is not None:
        out.append(("zero3 x2", 2, "zero3"))
    return out


def train(work: Path, pairs: Path, name: str, procs: int, strategy: str, threads: int) -> dict:
    out = work / f"train-{name.replace(' ', '-')}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out.with_name(out.name + ".tmp.checkpoints"), ignore_errors=True)
    launcher = [sys.executable, "-m", "spinlm"] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs), "-m", "spinlm"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(max(threads // procs, 1))}
    if strategy == "zero3":
        env["DS_ACCELERATOR"] = "cpu"
    cmd = [*launcher, "train", "--model", str(work / "model"), "--pairs", str(pairs), "--out", str(out),
           f"--train.batch_size={BATCH // procs}", f"--train.strategy={strategy}", *COMMON]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:  # the ranks' own error line (torchrun's summary at the end does not carry it)
        cause = [x for x in done.stderr.splitlines()
                 if x.startswith("spinlm: ") or re.match(r"\w+(Error|Exception): ", x)]
        return {"error": (cause or ["see the tail"])[0], "stderr_tail": done.stderr[-2000:]}
    history = json.loads((out / "spinlm_train.json").read_text())["history"]
    times = [row["elapsed_s"] for row in history]
    steps = len(times)
    return {"steps": steps, "step_s": (times[-1] - times[0]) / max(steps - 1, 1), "processes": procs,
            "strategy": strategy}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="A seconds-long run on a tiny model.")
    ap.add_argument("--pairs", type=int, help="Number of pairs (default 128; smoke 16).")
    ap.add_argument("--repeats", type=int, default=1, help="Rounds, interleaved; the best step time is kept.")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--work", type=Path, default=ROOT / "work-strategies")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "strategies.json")
    args = ap.parse_args()
    size = SIZES["smoke" if args.smoke else "full"]
    n = args.pairs or (16 if args.smoke else 128)
    args.work.mkdir(parents=True, exist_ok=True)
    make_inputs(args.work, size, n)
    pairs = args.work / "pairs.jsonl"
    if not pairs.exists():
        subprocess.run([sys.executable, "-m", "spinlm", "score", "--model", str(args.work / "model"), "--generations",
                        str(args.work / "generations.jsonl"), "--out", str(pairs), *COMMON[:1], *COMMON[-2:]],
                       env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=True, capture_output=True)
    results: dict[str, dict] = {}
    for _ in range(args.repeats):
        for name, procs, strategy in runs():
            r = train(args.work, pairs, name, procs, strategy, args.threads)
            if "error" in r:
                results.setdefault(name, r)
            elif r["step_s"] < results.get(name, {}).get("step_s", float("inf")):
                results[name] = r
    base = results["ddp x1"].get("step_s")
    for r in results.values():
        if "step_s" in r and base:
            r["vs_ddp_x1"] = round(r["step_s"] / base, 3)
    meta = {"pairs": n, "global_batch": BATCH, "model": {k: size[k] for k in ("hidden", "layers", "heads")},
            "threads": args.threads, "cpu": platform.processor() or platform.machine(),
            "command": "python -m benchmarks.strategies " + " ".join(sys.argv[1:])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "runs": results}, indent=1) + "\n")
    print("| strategy | processes | steps | step time (s) | vs ddp x1 |\n|---|---|---|---|---|")
    for name, r in results.items():
        if "error" in r:
            print(f"| {name} | - | - | failed: {r['error'][:160]} (tail in {args.out}) | - |")
        else:
            print(f"| {name} | {r['processes']} | {r['steps']} | {r['step_s']:.3f} | {r.get('vs_ddp_x1', '-')} |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
