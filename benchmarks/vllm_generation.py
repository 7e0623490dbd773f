"""Generation throughput through vLLM: spinlm's three backends against vLLM driven alone, one run.

    python -m benchmarks.vllm_generation [--prompts 64] [--max-new-tokens 128] [--out FILE]

Same model (the bench Llama: hidden 512, 7 layers, 22.3M parameters, head_dim 64), the same
prompts (digit strings of skewed lengths rendered by spinlm's chat template), the same sampling
(temperature 1, top_p 1, one seed per row, stops on spinlm's stop ids) for every peer:

- spinlm, local backend (transformers `generate`, spinlm's batching: batch_size 64);
- spinlm -> a vLLM server (`generation.backend: server`, one request per row, concurrency = rows);
- spinlm -> vLLM in process (`generation.backend: vllm`);
- vLLM alone, server: one `/v1/completions` request carrying every prompt (vLLM's best case);
- vLLM alone, in process: one `vllm.LLM.generate` call with every prompt and its SamplingParams.

Throughput is generated tokens (the stop token included) over the seconds of generating alone:
a server's start-up and an engine's construction and shutdown are reported apart. vLLM runs from
`.venv-vllm` (`make vllm`), fp32, `--enforce-eager`, `--no-enable-chunked-prefill`,
`VLLM_CPU_KVCACHE_SPACE=4`; the rest from the calling environment. Each peer runs in its own process.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VLLM_PY = Path(os.environ.get("SPINLM_VLLM_VENV", ROOT / ".venv-vllm")) / "bin" / "python"
ENV = {"VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}
# chunked prefill off: vLLM's CPU build (0.32) dies at a seeded request whose prompt is prefilled in
# parts ("CPU Generator does not use offset"), which 64 prompts of up to 384 tokens in flight cause.
VLLM_FLAGS = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "1024", "--no-enable-chunked-prefill"]


def make_inputs(work: Path, n: int) -> dict:
    """The bench model and n prompts (data.jsonl in spinlm's prompt/response format)."""
    import random

    from benchmarks.run import SIZES, digits, skewed_length
    from spinlm.demo.build import build_tiny

    size = SIZES["full"]
    model = work / "model"
    if not (model / "model.safetensors").exists():
        build_tiny(model, ["0123456789 " * 20, "user assistant"], vocab_size=300, hidden_size=size["hidden"],
                   num_layers=size["layers"], num_heads=size["heads"], max_position_embeddings=2048)
    rng = random.Random(0)
    rows = [{"id": f"g{i}", "prompt": digits(rng, skewed_length(rng, 16, 384, 40)), "response": "0"} for i in range(n)]
    (work / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"model": str(model), "data": str(work / "data.jsonl")}


def _cfg(work: Path, args, *extra):
    from spinlm import config

    cfg = config.build(None, [f"--model.name_or_path={work / 'model'}", f"--run.dir={work / 'run'}",
                              "--run.progress=false", "--data.max_prompt_length=512", "--data.max_length=1024",
                              f"--generation.max_new_tokens={args.max_new_tokens}", "--generation.batch_size=64",
                              f"--generation.concurrency={args.prompts}", *extra])
    config.validate(cfg, need=("model",))
    return cfg


def _inputs(work: Path, cfg):
    """(examples, tokenizer, prompt ids, row seeds, stop ids) as spinlm's generate stage builds them."""
    from spinlm.data import load_examples
    from spinlm.generation.local import checkpoint_generation_config, row_seed
    from spinlm.modeling import load_tokenizer
    from spinlm.tokens import encode_prompt, stop_ids

    examples = load_examples(str(work / "data.jsonl"))
    tok = load_tokenizer(str(work / "model"), cfg.model)
    prompts = [encode_prompt(tok, ex.prompt, cfg.data.max_prompt_length) for ex in examples]
    seeds = [row_seed(cfg.run.seed, 0, ex.id) for ex in examples]
    return examples, tok, prompts, seeds, stop_ids(tok, checkpoint_generation_config(str(work / "model")))


def peer_spinlm(work: Path, args, backend: str) -> dict:
    from spinlm.io import read_jsonl
    from spinlm.stages.generate import generate_file

    extra = {"local": [], "server": ["--generation.backend=server", f"--generation.server_url={args.url}"],
             "vllm": ["--generation.backend=vllm", "--generation.vllm_args=" + " ".join(VLLM_FLAGS)]}[backend]
    cfg = _cfg(work, args, *extra)
    examples = _inputs(work, cfg)[0]
    out = work / f"spinlm-{backend}.jsonl"
    for stale in work.glob(f"spinlm-{backend}.jsonl*"):
        stale.unlink()
    timings = _VllmTimes()
    logging.getLogger("spinlm").addHandler(timings)
    logging.getLogger("spinlm").setLevel(logging.INFO)
    start = time.perf_counter()
    generate_file(cfg.model.name_or_path, examples, out, cfg, 0)
    total = time.perf_counter() - start
    tokens = sum(len(r["generated_ids"]) for r in read_jsonl(out))
    seconds = timings.generate_s if backend == "vllm" else total
    result = {"tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds, "stage_s": total}
    if backend == "vllm":
        result["engine_up_s"] = timings.engine_s
    return result


class _VllmTimes(logging.Handler):
    """The in-process backend's own timings, from its log records."""

    def __init__(self):
        super().__init__()
        self.engine_s = self.generate_s = None

    def emit(self, record):
        if record.msg.startswith("vLLM engine on"):
            self.engine_s = record.args[1]
        elif record.msg.startswith("vLLM generated"):
            self.generate_s = record.args[2]


def peer_vllm_alone_inprocess(work: Path, args) -> dict:
    import vllm

    from spinlm.generation.vllm_engine import sampling_params

    cfg = _cfg(work, args)
    _, _, prompts, seeds, stops = _inputs(work, cfg)
    start = time.perf_counter()
    llm = vllm.LLM(model=str(work / "model"), dtype="float32", enforce_eager=True, max_model_len=1024, seed=0,
                   generation_config="vllm", enable_chunked_prefill=False)
    up = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], [sampling_params(cfg, s, stops) for s in seeds],
                        use_tqdm=False)
    seconds = time.perf_counter() - up
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    llm.llm_engine.engine_core.shutdown()
    return {"tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds, "engine_up_s": up - start}


def peer_vllm_alone_server(work: Path, args) -> dict:
    cfg = _cfg(work, args)
    _, _, prompts, _, stops = _inputs(work, cfg)
    body = {"model": str(work / "model"), "prompt": prompts, "max_tokens": args.max_new_tokens, "temperature": 1.0,
            "top_p": 1.0, "top_k": -1, "stop_token_ids": stops, "return_token_ids": True, "seed": 0}
    request = urllib.request.Request(args.url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=1800) as r:
        answer = json.loads(r.read())
    seconds = time.perf_counter() - start
    tokens = sum(len(c["token_ids"]) for c in answer["choices"])
    return {"tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds}


PEERS = {"spinlm-local": lambda w, a: peer_spinlm(w, a, "local"),
         "spinlm-server": lambda w, a: peer_spinlm(w, a, "server"),
         "spinlm-vllm": lambda w, a: peer_spinlm(w, a, "vllm"), "vllm-alone-server": peer_vllm_alone_server,
         "vllm-alone-inprocess": peer_vllm_alone_inprocess}


def _run_peer(python: Path, name: str, args) -> dict:
    cmd = [str(python), "-m", "benchmarks.vllm_generation", "--peer", name, "--work", str(args.work),
           "--prompts", str(args.prompts), "--max-new-tokens", str(args.max_new_tokens), "--url", args.url or ""]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **ENV})
    if proc.returncode != 0:
        raise SystemExit(f"peer {name} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{name}: {result}", flush=True)
    return result


def _start_server(work: Path):
    from spinlm.generation.process import free_port

    port = free_port()
    log = open(work / "server.log", "wb")
    start = time.perf_counter()
    proc = subprocess.Popen([str(VLLM_PY), "-m", "vllm.entrypoints.openai.api_server", "--model", str(work / "model"),
                             "--host", "127.0.0.1", "--port", str(port), *VLLM_FLAGS], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **ENV})
    url = f"http://127.0.0.1:{port}"
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"vLLM server exited; see {work / 'server.log'}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    return proc, url, time.perf_counter() - start
        except OSError:
            time.sleep(0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "work" / "vllm")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "vllm-generation.json")
    ap.add_argument("--peer", help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peer:
        print(json.dumps(PEERS[args.peer](args.work, args)))
        return
    if not VLLM_PY.exists():
        print(f"no vLLM venv at {VLLM_PY.parents[1]} (`make vllm` builds it): vLLM generation benchmark skipped")
        return
    args.work.mkdir(parents=True, exist_ok=True)
    make_inputs(args.work, args.prompts)
    runs = {"spinlm-local": _run_peer(Path(sys.executable), "spinlm-local", args)}
    from spinlm.generation.process import stop_process_group

    proc, args.url, startup = _start_server(args.work)
    try:
        runs["vllm-alone-server"] = _run_peer(Path(sys.executable), "vllm-alone-server", args)
        runs["spinlm-server"] = _run_peer(Path(sys.executable), "spinlm-server", args)
    finally:
        stop_process_group(proc)
    args.url = None
    runs["vllm-alone-inprocess"] = _run_peer(VLLM_PY, "vllm-alone-inprocess", args)
    runs["spinlm-vllm"] = _run_peer(VLLM_PY, "spinlm-vllm", args)
    result = {"prompts": args.prompts, "max_new_tokens": args.max_new_tokens, "server_startup_s": startup,
              "runs": runs,
              "spinlm_server_vs_vllm_server": runs["spinlm-server"]["tok_s"] / runs["vllm-alone-server"]["tok_s"],
              "spinlm_vllm_vs_vllm_inprocess": runs["spinlm-vllm"]["tok_s"] / runs["vllm-alone-inprocess"]["tok_s"],
              "spinlm_server_vs_vllm_inprocess": runs["spinlm-server"]["tok_s"] / runs["vllm-alone-inprocess"]["tok_s"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(table(result))


def table(res: dict) -> str:
    r = res["runs"]
    row = lambda name, label: (f"| {label} | {r[name]['tok_s']:.0f} | {r[name]['tokens']} | {r[name]['seconds']:.2f} |")
    return "\n".join([
        f"{res['prompts']} prompts x up to {res['max_new_tokens']} new tokens; vLLM server start-up "
        f"{res['server_startup_s']:.1f} s, in-process engine up "
        f"{r['spinlm-vllm'].get('engine_up_s', 0):.1f} s (spinlm) / "
        f"{r['vllm-alone-inprocess']['engine_up_s']:.1f} s (alone)", "",
        "| peer | tokens/s | tokens | seconds |", "|---|---|---|---|",
        row("spinlm-local", "spinlm, local backend (transformers generate)"),
        row("spinlm-server", "spinlm -> vLLM server"),
        row("vllm-alone-server", "vLLM server alone, one request with every prompt"),
        row("spinlm-vllm", "spinlm -> vLLM in process"),
        row("vllm-alone-inprocess", "vLLM in process alone, one `LLM.generate`"), "",
        f"spinlm -> server / vLLM server alone: **{res['spinlm_server_vs_vllm_server']:.2f}x**; "
        f"spinlm in process / vLLM in process alone: **{res['spinlm_vllm_vs_vllm_inprocess']:.2f}x** (target >= 0.9x)"])


if __name__ == "__main__":
    main()
