"""SPIN log-probs at real vocabulary sizes: the output layer in chunks vs whole vs TRL (part of `make bench`).

    python -m benchmarks.vocab [--vocab 32000 151936 262144] [--rows 2048 8192] [--repeats 2] [--smoke]

On 2 CPU cores the default grid takes one to two hours (BENCHMARKS.md).

The bench's own model has a 300-token vocabulary, where the output layer is nothing; real checkpoints
have 32,000 (Llama-2, Mistral) to 151,936 (Qwen2.5) and 262,144 (Gemma-3), and there the (positions x
vocab) logits and their gradient are what a step holds. Per (vocabulary, row length): a Llama (hidden
256, 2 layers, 4 heads: a small body, so the output layer dominates) with that vocabulary, one
micro-batch of SPIN pairs (prompt, real, generated; random ids, lengths drawn uniformly, the same for
every vocabulary) that packs into one row of at most `row` tokens (packing.max_tokens = row), and
three peers, each one forward + backward of the training loss on that micro-batch:
- chunked: spinlm's training path (`batch_losses`, SPIN sigmoid loss, reference log-probs given),
  `packing.chunk_logits: auto` with the default 256 MB chunks (it chunks where the row's kept logits
  exceed one chunk; `chunk_rows` in the result says how many positions a chunk held, None: it did not);
- whole: the same with `packing.chunk_logits: never` (the (kept positions x vocab) logits at once);
- trl: TRL's DPO loss on the same pairs: a `DPOTrainer` (precompute_ref_log_probs, so no reference
  model and no reference pass in the step), its collator's padded [chosen..., rejected...] batch with
  the reference log-probs given, then `trainer.compute_loss(model, batch).backward()`, the loss path of
  its training step (its own fused, tiled output layer; on a device without Triton it scores every
  position of the padded batch). No optimizer step in any peer.
Each (vocabulary, row, peer) runs in its own process (its peak RSS is its own) under an address-space
limit (--mem-limit-gb); a peer that cannot allocate is reported as "did not fit", never a crash. The
time is the best of `--repeats` steps (trl: `--trl-repeats`) after `--warmup` steps. Results:
benchmarks/results/vocab.json (written after every peer) and a table.
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
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PEERS = ("chunked", "whole", "trl")
BETA = 0.1
# hidden, layers, heads; prompt and response length ranges (tokens, uniform)
SIZES = {"full": {"hidden": 256, "layers": 2, "heads": 4, "prompt": (96, 160), "response": (320, 448)},
         "smoke": {"hidden": 32, "layers": 2, "heads": 2, "prompt": (4, 8), "response": (8, 16)}}


def pairs(vocab: int, size: dict, row: int, seed: int = 0) -> list[tuple[list[int], list[list[int]]]]:
    """(prompt, [real, generated]) groups, drawn until the next would not fit one row of `row` tokens;
    their lengths do not depend on `vocab`."""
    lengths, tokens = random.Random(seed), random.Random(seed + 1)
    groups, used = [], 0
    while True:
        n = [lengths.randint(*size["prompt"]), lengths.randint(*size["response"]), lengths.randint(*size["response"])]
        if used + sum(n) > row:
            return groups
        groups.append(([tokens.randrange(3, vocab) for _ in range(n[0])],
                       [[tokens.randrange(3, vocab) for _ in range(k)] for k in n[1:]]))
        used += sum(n)


def peer(name: str, vocab: int, row: int, args) -> dict:
    """In this (child) process: best step time and peak RSS of one peer at one (vocabulary, row)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from spinlm.packing import Layout, chunk_rows_for, group_length, pack

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    size = SIZES["smoke" if args.smoke else "full"]
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=size["hidden"], intermediate_size=size["hidden"] * 11 // 4,
        num_hidden_layers=size["layers"], num_attention_heads=size["heads"], num_key_value_heads=size["heads"],
        max_position_embeddings=2 * row, pad_token_id=0))
    groups = pairs(vocab, size, row)
    assert len(pack(groups, row)) == 1, "the micro-batch must pack into one row"
    kept = sum(len(r) for _, rs in groups for r in rs)
    info = {"pairs": len(groups), "row_tokens": sum(group_length(g) for g in groups), "kept_positions": kept,
            "parameters": sum(p.numel() for p in model.parameters())}
    if name == "trl":
        step, extra = _trl_step(model, groups, args)
    else:
        layout = Layout(row, "auto" if name == "chunked" else "never", args.chunk_mb)
        step, extra = _spinlm_step(model, groups, layout), {"chunk_rows": chunk_rows_for(model, kept, layout)}
    info["rss_before_step_mb"] = _rss_mb()  # model, batch and imports; the step's own peak is above it
    times = []
    try:
        for k in range(args.warmup + args.repeats):
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            step()
            if k >= args.warmup:
                times.append(time.perf_counter() - start)
    except (MemoryError, RuntimeError) as err:  # torch's CPU allocator raises RuntimeError "... can't allocate ..."
        if not isinstance(err, MemoryError) and "allocate" not in str(err):
            raise
        return {**info, **extra, "fit": False, "error": str(err).splitlines()[0][:300],
                "steps_done": len(times), "peak_rss_mb": _peak_rss_mb()}
    return {**info, **extra, "fit": True, "step_s": min(times), "times_s": times, "peak_rss_mb": _peak_rss_mb()}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _spinlm_step(model, groups, layout):
    """spinlm's training loss on the micro-batch (stages.train.batch_losses) and its backward."""
    from spinlm.loss import objective
    from spinlm.stages.train import batch_losses

    batch = [{"prompt": p, "real": rs[0], "generated": rs[1], "ref_real": -1.0, "ref_generated": -2.0,
              "dead": False} for p, rs in groups]
    goal = objective("spin")
    params = {"beta": BETA, "loss_type": "sigmoid"}

    def step():
        losses, _ = batch_losses(model, batch, 0, layout, goal, params)
        losses.mean().backward()

    return step


def _trl_step(model, groups, args):
    """TRL's DPO loss path on the same pairs: DPOTrainer.compute_loss on its collator's batch, then backward."""
    import datasets
    import torch
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    work = Path(tempfile.mkdtemp(prefix="vocab-trl-"))
    tok = AutoTokenizer.from_pretrained(args.tokenizer)  # DPOTrainer wants one; the batch below is token ids
    dummy = datasets.Dataset.from_list([{"prompt": "12", "chosen": "3", "rejected": "4"}])
    cfg = DPOConfig(output_dir=str(work), per_device_train_batch_size=len(groups), beta=BETA, loss_type=["sigmoid"],
                    max_length=None, save_strategy="no", report_to=[], use_cpu=True, bf16=False, seed=0,
                    precompute_ref_log_probs=True, dataloader_num_workers=0, disable_tqdm=True)
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=dummy, processing_class=tok)
    batch = trainer.data_collator([{"prompt_ids": p, "chosen_ids": rs[0], "rejected_ids": rs[1],
                                    "ref_chosen_logps": -1.0, "ref_rejected_logps": -2.0} for p, rs in groups])
    model.train()

    def step():
        trainer.compute_loss(trainer.model, batch).backward()

    shape = list(batch["input_ids"].shape)
    return step, {"trl_batch": shape, "trl_positions": shape[0] * shape[1],
                  "trl_completion_tokens": int(torch.as_tensor(batch["completion_mask"]).sum())}


def _limit_memory(gb: float) -> None:
    if gb > 0:
        limit = int(gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def run_child(name: str, vocab: int, row: int, args) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.vocab", "--peer", name, "--vocab", str(vocab), "--rows", str(row),
           "--repeats", str(args.trl_repeats if name == "trl" else args.repeats),
           "--warmup", str(args.warmup), "--threads", str(args.threads),
           "--chunk-mb", str(args.chunk_mb), "--tokenizer", str(args.tokenizer)] + (["--smoke"] if args.smoke else [])
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT.parent, preexec_fn=lambda: _limit_memory(
        args.mem_limit_gb), env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        out = json.loads(lines[-1])
    else:  # killed (out of memory) or an allocation outside torch's allocator: it did not fit either way
        tail = proc.stderr.strip().splitlines()[-1:] or [""]
        out = {"fit": False, "rc": proc.returncode, "error": tail[0][:300]}
        if "memory" not in proc.stderr.lower() and "allocate" not in proc.stderr.lower() and proc.returncode > 0:
            raise SystemExit(f"benchmark peer {name} at vocab {vocab}, row {row} failed:\n{proc.stderr[-4000:]}")
    return {**out, "wall_s": time.time() - started}


def table(res: dict) -> str:
    lines = ["| vocab | row | pairs | peer | chunk rows | step (s) | vs whole | peak RSS (MB) | vs trl |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, r in sorted(res["runs"].items(), key=lambda kv: tuple(int(x) for x in kv[0].split("x"))[::-1]):
        vocab, row = key.split("x")
        for name in PEERS:
            if name not in r:
                continue
            p = r[name]
            fit = p.get("fit")
            step = f"{p['step_s']:.2f}" if fit else "did not fit"
            whole = r.get("whole", {})
            vs_whole = f"{p['step_s'] / whole['step_s']:.2f}x" if fit and whole.get("fit") else ""
            trl = r.get("trl", {})
            rss = p.get("peak_rss_mb")
            vs_trl = f"{rss / trl['peak_rss_mb']:.2f}x" if fit and trl.get("fit") else ""
            chunk = p.get("chunk_rows", "") if name != "trl" else "4096x32768 tile"
            lines.append(f"| {int(vocab):,} | {int(row):,} | {p.get('pairs', '')} | {name} | {chunk} | {step} | "
                         f"{vs_whole} | {'' if rss is None else f'{rss:.0f}'} | {vs_trl} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, nargs="+", help="Vocabulary sizes (default 32000 151936 262144; smoke 300 "
                                                         "4096).")
    ap.add_argument("--rows", type=int, nargs="+", help="Row lengths = packing.max_tokens (default 2048 8192; "
                                                        "smoke 128).")
    ap.add_argument("--peers", nargs="+", choices=PEERS, default=list(PEERS))
    ap.add_argument("--repeats", type=int, default=2, help="Timed steps per spinlm peer (the best is reported).")
    ap.add_argument("--warmup", type=int, default=0, help="Untimed steps before them (default 0: the first timed "
                                                          "step is the warm-up, the best of the steps is reported).")
    ap.add_argument("--trl-repeats", type=int, default=1, help="Timed steps of the trl peer (default 1: its peak "
                                                               "memory is what is compared; its time is shown).")
    ap.add_argument("--chunk-mb", type=float, help="packing.logits_chunk_mb (default 256; smoke 0.01, so that the "
                                                   "chunked peer runs several chunks).")
    ap.add_argument("--mem-limit-gb", type=float, default=16.0,
                    help="Address-space limit of each peer's process (RLIMIT_AS; 0: none); beyond it, 'did not fit'.")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--smoke", action="store_true", help="A seconds-long run on a tiny model (CI).")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "vocab.json")
    ap.add_argument("--peer", help=argparse.SUPPRESS)
    ap.add_argument("--tokenizer", help=argparse.SUPPRESS)
    args = ap.parse_args()
    vocabs = args.vocab or ([300, 4096] if args.smoke else [32000, 151936, 262144])
    rows = args.rows or ([128] if args.smoke else [2048, 8192])
    if args.chunk_mb is None:
        args.chunk_mb = 0.01 if args.smoke else 256.0
    if args.peer:
        print(json.dumps(peer(args.peer, vocabs[0], rows[0], args)))
        return
    import torch
    import transformers
    import trl

    from spinlm.demo.build import build_tokenizer

    started = time.time()
    with tempfile.TemporaryDirectory(prefix="vocab-bench-") as tmp:
        args.tokenizer = tmp
        build_tokenizer(["0123456789 " * 20, "user assistant"], tmp, vocab_size=300)
        res = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
               "load_at_start": os.getloadavg(), "threads": args.threads, "torch": torch.__version__,
               "transformers": transformers.__version__, "trl": trl.__version__,
               "command": "python -m benchmarks.vocab " + " ".join(sys.argv[1:]), "smoke": args.smoke,
               "model": SIZES["smoke" if args.smoke else "full"], "repeats": args.repeats,
               "trl_repeats": args.trl_repeats,
               "warmup": args.warmup,
               "chunk_mb": args.chunk_mb, "mem_limit_gb": args.mem_limit_gb, "runs": {}}
        for row in rows:
            for vocab in vocabs:
                for name in args.peers:
                    out = run_child(name, vocab, row, args)
                    res["runs"].setdefault(f"{vocab}x{row}", {})[name] = out
                    shown = f"{out['step_s']:.2f} s" if out.get("fit") else "did not fit"
                    print(f"vocab {vocab} row {row} {name}: {shown}, peak RSS {out.get('peak_rss_mb', 0):.0f} MB",
                          flush=True)
                    res.update(wall_s=time.time() - started, load_at_end=os.getloadavg(), ratios=ratios(res["runs"]))
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(table(res))


def ratios(runs: dict) -> dict:
    """Per (vocab x row): chunked's step time over whole's and peak RSS over TRL's and whole's (where both fit)."""
    out = {}
    for key, r in runs.items():
        c, w, t = r.get("chunked", {}), r.get("whole", {}), r.get("trl", {})
        if not c.get("fit"):
            continue
        out[key] = {"chunked_over_whole_time": c["step_s"] / w["step_s"] if w.get("fit") else None,
                    "chunked_over_trl_peak_rss": c["peak_rss_mb"] / t["peak_rss_mb"] if t.get("fit") else None,
                    "chunked_over_whole_peak_rss": c["peak_rss_mb"] / w["peak_rss_mb"] if w.get("fit") else None}
    return out


if __name__ == "__main__":
    main()
