"""`make bench`: spinlm's score/train/generate against TRL and plain transformers, one run.

    python -m benchmarks.run [--pairs 512] [--repeats 1] [--smoke] [--pair-set bench|users|short] [--peers spinlm,...]

All peers see the same locally built Llama (>= 20M parameters unless --smoke), the same
pairs, batch size, loss and number of optimizer steps. The pairs: `bench` (skewed,
UltraChat-like lengths, single-turn), `users` (half multi-turn histories with prompts of
~200 tokens, half short prompts; responses of ~100 tokens) or `short` (users' short prompts only).
Each peer runs in its own subprocess so its peak resident memory is its own; peers are interleaved
when --repeats > 1.
Results: benchmarks/results/latest.json and a table (ratios of the peers that ran).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
SIZES = {  # (hidden, layers, heads), pairs, max_new_tokens, batch
    "full": {"hidden": 512, "layers": 7, "heads": 8, "pairs": 512, "max_new_tokens": 64, "lo": 16, "hi": 384},
    "smoke": {"hidden": 32, "layers": 2, "heads": 2, "pairs": 16, "max_new_tokens": 8, "lo": 4, "hi": 24},
}
BATCH, BETA, LR = 8, 0.1, 1e-6
PEERS = ("spinlm", "trl_live", "trl_precompute", "generate_spinlm", "generate_naive")


def skewed_length(rng: random.Random, lo: int, hi: int, median: float) -> int:
    """Log-normal lengths clipped to [lo, hi]: most short, a long tail (as UltraChat turns)."""
    return max(lo, min(hi, int(rng.lognormvariate(math.log(median), 0.8))))


def digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("0123456789") for _ in range(n))  # one token per digit


def users_prompt(rng: random.Random, history: bool, size: dict, scale: float) -> tuple[list[dict], float]:
    """A multi-turn history (3 exchanges and a question, ~200 tokens with the template) or, without `history`, a
    short question; and the responses' median length (~100 tokens)."""
    turn = lambda median: digits(rng, skewed_length(rng, size["lo"], size["hi"], median * scale))
    if not history:
        return [{"role": "user", "content": turn(20)}], 100 * scale
    exchanges = [{"role": role, "content": turn(24)} for _ in range(3) for role in ("user", "assistant")]
    return exchanges + [{"role": "user", "content": turn(24)}], 100 * scale


def make_inputs(work: Path, size: dict, n_pairs: int, seed: int = 0, pair_set: str = "bench") -> dict:
    """Tokenizer + model + pair texts under `work` (built once)."""
    from spinlm.demo.build import build_tiny

    rng = random.Random(seed)
    scale = (size["hi"] / 384)
    rows = []
    for i in range(n_pairs):
        if pair_set in ("users", "short"):  # users: every other pair a history; short: short questions only
            prompt, median = users_prompt(rng, pair_set == "users" and i % 2 == 0, size, scale)
            r, g = (skewed_length(rng, size["lo"], size["hi"], median) for _ in range(2))
        else:
            p, r, g = (skewed_length(rng, size["lo"], size["hi"], m * scale) for m in (40, 56, 56))
            prompt = [{"role": "user", "content": digits(rng, p)}]
        rows.append({"id": f"b{i}", "prompt": prompt, "real": digits(rng, r), "generated": digits(rng, g),
                     "finish": "eos", "generated_tokens": g, "iteration": 0, "extra": {}})
    model = work / "model"
    if not (model / "model.safetensors").exists():
        build_tiny(model, ["0123456789 " * 20, "user assistant"], vocab_size=300, hidden_size=size["hidden"],
                   num_layers=size["layers"], num_heads=size["heads"], max_position_embeddings=2048)
    (work / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"model": str(model), "rows": rows}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peer_spinlm(work: Path, args) -> dict:
    from spinlm import config
    from spinlm.stages.score import score_files
    from spinlm.stages.train import train

    cfg = config.build(None, [f"--model.name_or_path={work / 'model'}", "--run.progress=false",
                              f"--train.batch_size={BATCH}", "--train.epochs=1", f"--train.learning_rate={LR}",
                              f"--spin.beta={BETA}", "--train.warmup_ratio=0.1", "--data.max_length=4096",
                              "--data.max_prompt_length=2048", "--eval.batch_size=16",
                              "--run.log_every=1000", *args.spinlm_flags])
    pairs = work / "spinlm-pairs.jsonl"
    out = work / "spinlm-model"
    for stale in [*work.glob("spinlm-pairs.jsonl.partial*"), *work.glob("spinlm-model.checkpoints")]:
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()  # a fresh run, not a resumed one
    warm_up(cfg)
    start, start_cpu = time.perf_counter(), time.process_time()
    score_files(cfg.model.name_or_path, [work / "generations.jsonl"], pairs, cfg)
    scored, scored_cpu = time.perf_counter(), time.process_time()
    shutil.rmtree(out, ignore_errors=True)
    result = train(cfg.model.name_or_path, pairs, out, cfg, 0)
    end, end_cpu = time.perf_counter(), time.process_time()
    return {"score_s": scored - start, "train_s": end - scored, "steps": result["steps"],
            "score_cpu_s": scored_cpu - start_cpu, "train_cpu_s": end_cpu - scored_cpu}


def warm_up(cfg) -> None:
    """Load the model and tokenizer once, untimed: the process's first imports of transformers' model code (seconds)
    would otherwise be charged to whichever stage runs first. Each stage still loads its own model."""
    from spinlm.modeling import load_model, load_tokenizer

    load_tokenizer(cfg.model.name_or_path, cfg.model)
    load_model(cfg.model.name_or_path, cfg.model)


def _trl_trainer(work: Path, precompute: bool):
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    rows = [json.loads(line) for line in (work / "generations.jsonl").read_text().splitlines()]
    data = datasets.Dataset.from_list([{"prompt": r["prompt"], "chosen": [{"role": "assistant", "content": r["real"]}],
                                        "rejected": [{"role": "assistant", "content": r["generated"]}]} for r in rows])
    tok = AutoTokenizer.from_pretrained(work / "model")
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype="float32")
    args = DPOConfig(output_dir=str(work / ("trl-pre" if precompute else "trl-live")),
                     per_device_train_batch_size=BATCH, num_train_epochs=1, learning_rate=LR, beta=BETA,
                     loss_type=["sigmoid"], optim="rmsprop", lr_scheduler_type="linear",
                     warmup_steps=int(0.1 * math.ceil(len(rows) / BATCH)), max_length=None, save_strategy="no",
                     report_to=[], logging_steps=1000, use_cpu=True, bf16=False, seed=0,
                     precompute_ref_log_probs=precompute, precompute_ref_batch_size=16, dataloader_num_workers=0,
                     disable_tqdm=True)
    return DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok)


def peer_trl(work: Path, precompute: bool) -> dict:
    start, start_cpu = time.perf_counter(), time.process_time()
    trainer = _trl_trainer(work, precompute)  # tokenizes; with precompute, also the reference pass
    ready = time.perf_counter()
    out = trainer.train()
    end, end_cpu = time.perf_counter(), time.process_time()
    return {"init_s": ready - start, "train_s": end - ready, "total_s": end - start, "steps": out.global_step,
            "total_cpu_s": end_cpu - start_cpu}


def peer_generate(work: Path, spinlm_way: bool, max_new_tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers import GenerationConfig as HFGen

    from spinlm.generation.local import generate, row_seed
    from spinlm.tokens import encode_prompt

    rows = [json.loads(line) for line in (work / "generations.jsonl").read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(work / "model")
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32).eval()
    prompts = [encode_prompt(tok, r["prompt"]) for r in rows]
    start = time.perf_counter()
    if spinlm_way:
        out = generate(model, tok, prompts, max_new_tokens=max_new_tokens, batch_size=64, batch_tokens=16384,
                       seeds=[row_seed(0, 0, r["id"]) for r in rows], progress=False)
        tokens = sum(o["tokens"] + (o["finish"] == "eos") for o in out)
    else:  # the naive loop: dataset order, fixed batch of 16, left padding, sampling on
        tok.padding_side = "left"
        tokens, gen = 0, HFGen(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=max_new_tokens,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        torch.manual_seed(0)
        for s in range(0, len(prompts), 16):
            batch = tok.pad({"input_ids": prompts[s : s + 16]}, return_tensors="pt")
            with torch.no_grad():
                seqs = model.generate(**batch, generation_config=gen)[:, batch["input_ids"].shape[1]:]
            for row in seqs.tolist():
                tokens += next((k + 1 for k, t in enumerate(row) if t == tok.eos_token_id), len(row))
    return {"time_s": time.perf_counter() - start, "generated_tokens": tokens}


def run_peer(name: str, work: Path, args) -> dict:
    """In this (child) process: one peer, its result plus peak RSS."""
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if name == "spinlm":
        result = peer_spinlm(work, args)
    elif name in ("trl_live", "trl_precompute"):
        result = peer_trl(work, name == "trl_precompute")
    else:
        result = peer_generate(work, name == "generate_spinlm", args.max_new_tokens)
    return {**result, "peak_rss_mb": peak_rss_mb()}


def matmul_gflops(threads: int, n: int = 2048, reps: int = 5) -> float:
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    start = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9


def count_tokens(work: Path) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spinlm.tokens import encode_prompt, encode_response

    tok = AutoTokenizer.from_pretrained(work / "model")
    rows = [json.loads(line) for line in (work / "generations.jsonl").read_text().splitlines()]
    p = [len(encode_prompt(tok, r["prompt"])) for r in rows]
    real = [len(encode_response(tok, r["prompt"], r["real"])) for r in rows]
    gen = [len(encode_response(tok, r["prompt"], r["generated"])) for r in rows]
    model = AutoModelForCausalLM.from_pretrained(work / "model")
    params = sum(x.numel() for x in model.parameters())
    return {"pairs": len(rows), "prompt_tokens": sum(p), "real_tokens": sum(real), "generated_tokens": sum(gen),
            "unique_tokens": sum(p) + sum(real) + sum(gen), "parameters": params,
            "prompt_len_min_median_max": [min(p), sorted(p)[len(p) // 2], max(p)],
            "response_len_min_median_max": [min(real + gen), sorted(real + gen)[len(real + gen) // 2], max(real + gen)]}


def child(name: str, work: Path, args) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.run", "--peer", name, "--work", str(work), "--threads", str(args.threads),
           "--max-new-tokens", str(args.max_new_tokens)] + [f"--spinlm-flag={f}" for f in args.spinlm_flags]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT.parent)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark peer {name} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(runs: dict, tokens: dict, gflops: float, meta: dict) -> dict:
    """The ratios of the peers that ran (--peers)."""
    def best(name, key):
        return min(r[key] for r in runs[name])

    res = {**meta, "tokens": tokens, "matmul_gflops": gflops, "runs": runs,
           "peak_rss_mb": {name: max(r["peak_rss_mb"] for r in rs) for name, rs in runs.items() if rs}}
    if runs.get("spinlm"):
        sp_train, sp_score = best("spinlm", "train_s"), best("spinlm", "score_s")
        useful = 6 * tokens["parameters"] * tokens["unique_tokens"] / sp_train / 1e9
        res.update({"spinlm_train_s": sp_train, "spinlm_score_s": sp_score,
                    # a forward is a third of a training step's work: the target is <= 0.4
                    "score_train_time_ratio": sp_score / sp_train,
                    "score_train_cpu_ratio": best("spinlm", "score_cpu_s") / best("spinlm", "train_cpu_s"),
                    "train_useful_flop_utilization": useful / gflops, "useful_gflops_per_s": useful,
                    "spinlm_train_tokens_per_s": tokens["unique_tokens"] / sp_train})
    if runs.get("spinlm") and runs.get("trl_live"):
        live = best("trl_live", "total_s")
        res.update({"train_speedup_vs_trl_live": live / sp_train,
                    # TRL's live-reference run does the reference passes inside training: compare it with both stages
                    "score_train_speedup_vs_trl_live": live / (sp_score + sp_train),
                    "score_train_cpu_speedup_vs_trl_live": best("trl_live", "total_cpu_s")
                    / (best("spinlm", "score_cpu_s") + best("spinlm", "train_cpu_s")),
                    "train_peak_mem_ratio_vs_trl_live": res["peak_rss_mb"]["spinlm"] / res["peak_rss_mb"]["trl_live"],
                    "trl_live_s": live, "trl_live_tokens_per_s": tokens["unique_tokens"] / live})
    if runs.get("spinlm") and runs.get("trl_precompute"):
        pre = best("trl_precompute", "total_s")
        res.update({"train_speedup_vs_trl_precompute": pre / sp_train,
                    "score_train_speedup_vs_trl_precompute": pre / (sp_score + sp_train), "trl_precompute_s": pre})
    if runs.get("generate_spinlm") and runs.get("generate_naive"):
        gen_sp = max(r["generated_tokens"] / r["time_s"] for r in runs["generate_spinlm"])
        gen_naive = max(r["generated_tokens"] / r["time_s"] for r in runs["generate_naive"])
        res.update({"generate_speedup_vs_naive": gen_sp / gen_naive, "generate_spinlm_tokens_per_s": gen_sp,
                    "generate_naive_tokens_per_s": gen_naive})
    return res


def table(res: dict) -> str:
    rows = [("train: spinlm vs TRL, live reference", "train_speedup_vs_trl_live", "{:.2f}x", 1, "2.5x"),
            ("train: spinlm vs TRL, precomputed reference", "train_speedup_vs_trl_precompute", "{:.2f}x", 1, "1.8x"),
            ("score+train: spinlm vs TRL precompute+train", "score_train_speedup_vs_trl_precompute", "{:.2f}x", 1,
             "1.8x"),
            ("score+train: spinlm vs TRL, live reference", "score_train_speedup_vs_trl_live", "{:.2f}x", 1, "-"),
            ("same, in process CPU time", "score_train_cpu_speedup_vs_trl_live", "{:.2f}x", 1, "-"),
            ("train peak memory: spinlm / TRL live", "train_peak_mem_ratio_vs_trl_live", "{:.2f}", 1, "<= 0.6"),
            ("generation tokens/s: spinlm / naive", "generate_speedup_vs_naive", "{:.2f}x", 1, "1.5x"),
            ("train useful-FLOP utilization", "train_useful_flop_utilization", "{:.0f}%", 100, "50%"),
            ("score / train time, same pairs", "score_train_time_ratio", "{:.2f}", 1, "<= 0.4"),
            ("score / train CPU time, same pairs", "score_train_cpu_ratio", "{:.2f}", 1, "<= 0.4")]
    lines = ["| measure | result | target |", "|---|---|---|"] + [
        f"| {name} | {fmt.format(scale * res[key])} | {target} |" for name, key, fmt, scale, target in rows
        if key in res]
    t = res["tokens"]
    times = []
    if "spinlm_score_s" in res:
        times.append(f"spinlm score {res['spinlm_score_s']:.1f}, train {res['spinlm_train_s']:.1f}")
    if "trl_live_s" in res:
        times.append(f"TRL live {res['trl_live_s']:.1f}")
    if "trl_precompute_s" in res:
        times.append(f"TRL precompute+train {res['trl_precompute_s']:.1f}")
    lines.append(f"\n{res.get('pair_set', 'bench')} pairs: {t['pairs']}, {t['unique_tokens']} unique tokens, "
                 f"{t['parameters'] / 1e6:.1f}M parameters; times (s): {'; '.join(times)}; "
                 f"matmul peak {res['matmul_gflops']:.0f} GFLOP/s; peak RSS MB {res['peak_rss_mb']}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="A seconds-long run on a tiny model (CI).")
    ap.add_argument("--pairs", type=int, help="Number of pairs (default 512; smoke 16).")
    ap.add_argument("--repeats", type=int, default=1, help="Rounds; peers are interleaved, the best time is kept.")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--max-new-tokens", type=int, help="Generation length for the generation comparison.")
    ap.add_argument("--work", type=Path, default=ROOT / "work")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "latest.json")
    ap.add_argument("--pair-set", choices=("bench", "users", "short"), default="bench",
                    help="The pairs: bench (skewed single-turn lengths), users (multi-turn histories of ~200 "
                         "tokens and short prompts, ~100-token responses) or short (users' short prompts only).")
    ap.add_argument("--peers", default=",".join(PEERS),
                    help="Comma-separated peers to run (e.g. spinlm: its score/train time ratio only).")
    ap.add_argument("--peer", help=argparse.SUPPRESS)
    ap.add_argument("--spinlm-flag", dest="spinlm_flags", action="append", default=[],
                    help="Extra --section.key=value flag for spinlm's peer (e.g. packing.enabled=false).")
    args = ap.parse_args()
    args.spinlm_flags = [f if f.startswith("--") else f"--{f}" for f in args.spinlm_flags]
    size = SIZES["smoke" if args.smoke else "full"]
    args.max_new_tokens = args.max_new_tokens or size["max_new_tokens"]
    if args.peer:
        print(json.dumps(run_peer(args.peer, args.work, args)))
        return
    work = args.work / (("smoke" if args.smoke else "full") + ("" if args.pair_set == "bench" else f"-{args.pair_set}"))
    work.mkdir(parents=True, exist_ok=True)
    make_inputs(work, size, args.pairs or size["pairs"], pair_set=args.pair_set)
    tokens = count_tokens(work)
    matmul_before = matmul_gflops(args.threads)
    peers = [p for p in args.peers.split(",") if p]
    unknown = sorted(set(peers) - set(PEERS))
    if unknown:
        ap.error(f"--peers: unknown {', '.join(unknown)}; choose from {', '.join(PEERS)}")
    runs: dict = {p: [] for p in peers}
    for _ in range(args.repeats):
        for p in peers:
            runs[p].append(child(p, work, args))
            print(f"{p}: {runs[p][-1]}", flush=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "threads": args.threads, "command": "python -m benchmarks.run " + " ".join(sys.argv[1:]),
            "smoke": args.smoke, "batch_size": BATCH, "beta": BETA, "learning_rate": LR, "loss": "sigmoid",
            "max_new_tokens": args.max_new_tokens, "spinlm_flags": args.spinlm_flags, "pair_set": args.pair_set,
            "load_average": os.getloadavg()}
    # the peak is the better of two readings, before and after the peers (the machine's speed drifts)
    meta["matmul_gflops_readings"] = [matmul_before, matmul_gflops(args.threads)]
    res = summarize(runs, tokens, max(meta["matmul_gflops_readings"]), meta)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=2) + "\n")
    os.replace(tmp, args.out)
    print(table(res))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
