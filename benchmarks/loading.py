"""Peak host memory of loading a model for sharded training (train.strategy fsdp / zero3), 2 processes.

    python -m benchmarks.loading [--code DIR] [--strategies fsdp,zero3] [--layers 10] [--work DIR]

Writes a random Llama (hidden 1024, 10 layers, vocabulary 32000: 194M parameters) in bf16
safetensors, as real checkpoints are shipped, then for each strategy runs this file as a worker
under `torchrun --standalone --nproc_per_node 2` (gloo, one thread per process). Each worker
does what a training stage does before its first step: the strategy loads the model (fp32) and
sets it up with its optimizer (zero3: deepspeed.initialize); it reports its peak RSS (VmHWM, the
kernel's high-water mark) after loading and after the set-up, and exits. The driver samples the
summed RSS of the workers every 20 ms for the launch's peak.
`--code DIR` runs the workers against the spinlm package in DIR (e.g. a checkout of older code,
for a before / after comparison): where a strategy has no `load` (before rank 0 alone read the
weights), the workers load as the stages did then (every process reads the whole model, the
strategy shards it in setup). Results: benchmarks/results/loading.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def make_model(out: Path, layers: int) -> None:
    """A random Llama in bf16 safetensors."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers, num_attention_heads=16,
                         vocab_size=32000, max_position_embeddings=512, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)


def _status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of a process, in MB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) // 1024
    return out


def worker(model: str, strategy_name: str, out: str) -> None:
    """One process of the launch: load and set up as a training stage does, then report."""
    import torch
    import transformers.modeling_utils  # noqa: F401 (imported before the baseline is taken)

    from spinlm.config import build
    from spinlm.training.steps import linear_schedule, make_optimizer
    from spinlm.training.strategy import make_strategy

    cfg = build(overrides=[f"--train.strategy={strategy_name}"])
    strategy = make_strategy(cfg.train)  # joins the group (zero3: imports DeepSpeed)
    start = _status()
    began = time.time()
    if hasattr(strategy, "load"):
        loaded = strategy.load(model, cfg.model, False)
    else:  # the code before: every process reads the whole model, setup shards it
        from spinlm.training.steps import load_trainable

        loaded = load_trainable(model, cfg.model, strategy.load_device, False)
    after_load = _status()  # its VmHWM: the peak while loading (before: the whole model, not yet sharded)

    def optimizer(m):
        o = make_optimizer("rmsprop", m, 1e-6, 0.0)
        return o, linear_schedule(o, 10, 0.1, strategy.schedule_factor)

    strategy.setup(loaded, optimizer, None)
    strategy.barrier()
    seconds = time.time() - began
    with open(f"{out}.rank{strategy.rank}.json", "w") as f:
        json.dump({"rank": strategy.rank, "load_s": round(seconds, 2), "at_start": start, "after_load": after_load,
                   "at_end": _status(), "torch": torch.__version__}, f)
    strategy.barrier()


def launch(model: Path, strategy: str, code: Path, out: Path) -> dict:
    import psutil

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(code)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
           "--worker", str(model), strategy, str(out)]
    began = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    parent, peak_sum, peak_hwm = psutil.Process(proc.pid), 0, {}
    while proc.poll() is None:
        total = 0
        for child in parent.children(recursive=True):
            try:
                status, command = _status(child.pid), " ".join(child.cmdline())
            except (OSError, ValueError, KeyError, psutil.Error):  # gone, or exiting
                continue
            if "--worker" in command:
                total += status["VmRSS"]
                peak_hwm[child.pid] = max(peak_hwm.get(child.pid, 0), status["VmHWM"])
        peak_sum = max(peak_sum, total)
        time.sleep(0.02)
    log = proc.stdout.read()
    if proc.returncode != 0:
        return {"error": log[-3000:]}
    ranks = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in (0, 1)]
    return {"peak_rss_sum_mb": peak_sum, "peak_rss_mb": [r["at_end"]["VmHWM"] for r in ranks],
            "load_peak_rss_mb": [r["after_load"]["VmHWM"] for r in ranks],
            "rss_after_startup_mb": [r["at_start"]["VmRSS"] for r in ranks],
            "load_and_setup_s": [r["load_s"] for r in ranks], "wall_s": round(time.time() - began, 1)}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        return worker(*argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--code", default=str(ROOT.parent), help="Directory whose spinlm package the workers run.")
    parser.add_argument("--strategies", default="fsdp,zero3")
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--work", help="Directory for the model (default: a temporary one).")
    parser.add_argument("--out", default=str(ROOT / "results" / "loading.json"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        model = work / "model"
        if not (model / "model.safetensors").exists():
            make_model(model, args.layers)
        size = (model / "model.safetensors").stat().st_size
        results = {"code": args.code, "layers": args.layers, "checkpoint_mb": size // 2**20, "runs": {}}
        for strategy in args.strategies.split(","):
            results["runs"][strategy] = launch(model, strategy, Path(args.code), work / f"report-{strategy}")
            print(strategy, json.dumps(results["runs"][strategy]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
