"""Log-prob forward + backward of one training micro-batch at real vocabulary sizes (part of `make bench`).

    python -m benchmarks.vocab [--vocab 300 32000 128256] [--pairs 8] [--repeats 3] [--smoke]

The bench's own model has a 300-token vocabulary, where the output layer is nothing; real
checkpoints have 32,000 (Llama-2, Mistral, Zephyr) to 128,256 (Llama-3) or more, and there the
(positions x vocab) logits and their gradient are what a step spends. Per vocabulary size, a
Llama (hidden 512, 4 layers, 8 heads) with that vocabulary, one micro-batch of `--pairs` SPIN
pairs (prompt, real, generated: random ids, the skewed lengths of benchmarks/run.py, the same for
every vocabulary), and three peers:
- packed: spinlm's training path: the pairs packed into rows of `packing.max_tokens` = 512,
  forward and backward one row at a time (`packing.backward_per_row`), kept logits only;
- packed_batch: the same rows in one forward and one backward (`packing.backward_per_row: false`);
- plain: one right-padded forward over the 2 x pairs (prompt, response) sequences and one
  backward (spinlm with `packing.enabled: false`; the layout of TRL's concatenated forward).
Each (vocabulary, peer) runs in its own process (its peak RSS is its own); the time is the best of
`--repeats` steps after one warm-up step. Results: benchmarks/results/vocab.json and a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

from .run import SIZES, skewed_length

ROOT = Path(__file__).resolve().parent
PAIRS, BUDGET = 8, 512  # pairs of the micro-batch (--pairs), packing.max_tokens
PEERS = ("packed", "packed_batch", "plain")


def pairs(vocab: int, size: dict, n: int = PAIRS, seed: int = 0):
    """`n` (prompt, [real, generated]) token-id groups; their lengths do not depend on `vocab`."""
    lengths, tokens = random.Random(seed), random.Random(seed + 1)
    scale = size["hi"] / 384

    def ids(median):
        return [tokens.randrange(3, vocab)
                for _ in range(skewed_length(lengths, size["lo"], size["hi"], median * scale))]

    return [(ids(40), [ids(56), ids(56)]) for _ in range(n)]


def peer(name: str, vocab: int, repeats: int, smoke: bool, threads: int, n_pairs: int = PAIRS) -> dict:
    """In this (child) process: best step time and peak RSS of one peer at one vocabulary size."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from spinlm.packing import pack, packed_logps, plain_logps

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    size = SIZES["smoke" if smoke else "full"]
    hidden, heads = size["hidden"], size["heads"]
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                                         num_hidden_layers=2 if smoke else 4, num_attention_heads=heads,
                                         num_key_value_heads=heads, max_position_embeddings=2048, pad_token_id=0))
    groups = pairs(vocab, size, n_pairs)
    rows = [[groups[i] for i in row] for row in pack(groups, BUDGET)]

    def step():
        if name == "packed_batch":
            torch.stack([s for per in packed_logps(model, groups, BUDGET, 0) for s, _ in per]).sum().backward()
        elif name == "packed":
            for row in rows:
                torch.stack([s for per in packed_logps(model, row, BUDGET, 0) for s, _ in per]).sum().backward()
        else:
            torch.stack([s for per in plain_logps(model, groups, 0) for s, _ in per]).sum().backward()

    step()
    times = []
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    tokens = sum(len(p) + sum(len(r) for r in rs) for p, rs in groups)
    return {"step_s": min(times), "times_s": times, "rows": len(rows), "unique_tokens": tokens,
            "parameters": sum(p.numel() for p in model.parameters()),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def table(res: dict) -> str:
    lines = ["| vocab | parameters | peer | step (s) | plain / peer time | peak RSS (MB) |",
             "|---|---|---|---|---|---|"]
    for vocab, r in res["runs"].items():
        for name in PEERS:
            p = r[name]
            lines.append(f"| {int(vocab):,} | {p['parameters'] / 1e6:.1f}M | {name} | {p['step_s']:.2f} | "
                         f"{r['plain']['step_s'] / p['step_s']:.2f}x | {p['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, nargs="+", help="Vocabulary sizes (default 300 32000 128256; smoke 300 4096).")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=PAIRS, help="Pairs in the micro-batch (default 8).")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--smoke", action="store_true", help="A seconds-long run on a tiny model (CI).")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "vocab.json")
    ap.add_argument("--peer", help=argparse.SUPPRESS)
    args = ap.parse_args()
    vocabs = args.vocab or ([300, 4096] if args.smoke else [300, 32000, 128256])
    if args.peer:
        print(json.dumps(peer(args.peer, vocabs[0], args.repeats, args.smoke, args.threads, args.pairs)))
        return
    started = time.time()
    runs: dict = {}
    for vocab in vocabs:
        for name in PEERS:
            cmd = [sys.executable, "-m", "benchmarks.vocab", "--peer", name, "--vocab", str(vocab), "--repeats",
                   str(args.repeats), "--threads", str(args.threads), "--pairs", str(args.pairs)]
            cmd += ["--smoke"] if args.smoke else []
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT.parent,
                                  env={**os.environ, "HF_HUB_OFFLINE": "1"})
            if proc.returncode != 0:
                raise SystemExit(f"benchmark peer {name} at vocab {vocab} failed:\n{proc.stderr[-4000:]}")
            runs.setdefault(str(vocab), {})[name] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"vocab {vocab} {name}: {runs[str(vocab)][name]['step_s']:.2f} s", flush=True)
    import torch
    import transformers

    res = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
           "threads": args.threads, "torch": torch.__version__, "transformers": transformers.__version__,
           "command": "python -m benchmarks.vocab " + " ".join(sys.argv[1:]), "smoke": args.smoke,
           "pairs": args.pairs, "budget": BUDGET, "repeats": args.repeats, "wall_s": time.time() - started,
           "runs": runs,
           "plain_over_packed_time": {v: r["plain"]["step_s"] / r["packed"]["step_s"] for v, r in runs.items()},
           "plain_over_packed_batch_time": {v: r["plain"]["step_s"] / r["packed_batch"]["step_s"]
                                            for v, r in runs.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(table(res))


if __name__ == "__main__":
    main()
