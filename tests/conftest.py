"""Shared fixtures: a real tiny Llama and tokenizer built locally, and small task data."""

from __future__ import annotations

import json
import os
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `make test` runs the suite in two pytest-xdist workers (PYTEST_XDIST_WORKER is set in each): one thread each,
# in the worker and in what it starts, so the two share the cores instead of oversubscribing them. Threads that
# wait for one another when the cores are busy spin: on the loaded 2-core machine one test's `spinlm run` took
# 25-100 s of CPU with two threads and 3-6 s with one; the tiny models gain little from a second thread.
# SUBPROCESS_THREADS: for the tests' subprocesses that set their own count, 2 as before, 1 in a worker.
WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if WORKER:
    os.environ["OMP_NUM_THREADS"] = "1"
SUBPROCESS_THREADS = "1" if WORKER else "2"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1 if WORKER else 2)



def built_once(tmp_path_factory, name: str, build):
    """`build(folder)`'s result (JSON: str, list, dict), built once per test run into a folder that every
    pytest-xdist worker of the run sees (the parent of the workers' own temporary folders; the run's one
    folder without xdist), under a file lock; a worker that comes second reads the first one's result.
    For inputs that are read, never written: the tiny models, the task data, reference runs."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    root = (root.parent if WORKER else root) / "built-once"
    root.mkdir(exist_ok=True)
    folder, result = root / name, root / f"{name}.json"
    with FileLock(str(root / f"{name}.lock")):
        if not result.exists():
            if folder.exists():  # a build that failed part way
                import shutil

                shutil.rmtree(folder)
            folder.mkdir()
            result.write_text(json.dumps(build(folder)))
    return json.loads(result.read_text())


@pytest.fixture(scope="session")
def task_data(tmp_path_factory) -> dict[str, Path]:
    """train/val/test JSONL files of the demo task, small."""
    from spinlm.demo.task import write_splits

    files = built_once(tmp_path_factory, "data", lambda d: {k: str(v) for k, v in
                                                            write_splits(d, seed=0, n_train=48, n_val=16,
                                                                         n_test=16).items()})
    return {k: Path(v) for k, v in files.items()}


def task_model(tmp_path_factory, task_data: dict, name: str, **size) -> Path:
    """A Llama of `size` (hidden_size, num_layers, num_heads) with a BPE tokenizer trained on the task text,
    built once per run under `name`."""
    from spinlm.demo.build import build_tiny

    texts = [v for line in task_data["train"].read_text().splitlines()
             for k, v in json.loads(line).items() if k in ("prompt", "response")]
    return Path(built_once(tmp_path_factory, name, lambda d: str(build_tiny(
        d, texts, max_position_embeddings=256, **size))))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, task_data) -> Path:
    """A 2-layer, width-32 Llama with a BPE tokenizer trained on the task text."""
    return task_model(tmp_path_factory, task_data, "tiny", hidden_size=32, num_layers=2, num_heads=2)


@pytest.fixture(scope="session")
def offline_hub(tmp_path_factory):
    """A Hugging Face cache (HF_HOME) holding tiny stand-ins under the recipes' real model and dataset ids, at
    pinned commits (tests/offline_hub.py). Use it from a subprocess: `env=offline_hub.env()` sets HF_HOME and
    HF_HUB_OFFLINE=1; `offline_hub.models` / `.datasets` list each id's commits, `.splits` the row counts."""
    import offline_hub

    return offline_hub.build(tmp_path_factory.mktemp("hf_home"))


@pytest.fixture(scope="session")
def other_model(tiny_model, tmp_path_factory):
    """The tiny model with perturbed weights: it answers differently."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("other")
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    return out


COMMON = ["--data.max_prompt_length=64", "--data.max_length=128", "--run.progress=false"]


@pytest.fixture(scope="session")
def pairs(tiny_model, task_data, tmp_path_factory) -> Path:
    """Scored pairs of the tiny model's own generations (`spinlm generate` then `spinlm score`)."""
    from spinlm.cli import main

    def build(d: Path) -> str:
        assert main(["generate", "--model", str(tiny_model), "--data", str(task_data["train"]), "--out",
                     str(d / "gens.jsonl"), "--generation.max_new_tokens=8", *COMMON]) == 0
        assert main(["score", "--model", str(tiny_model), "--generations", str(d / "gens.jsonl"), "--out",
                     str(d / "pairs.jsonl"), *COMMON]) == 0
        return str(d / "pairs.jsonl")

    return Path(built_once(tmp_path_factory, "pairs", build))


@contextmanager
def scripted_server(answer, delay_s: float = 0.0):
    """A real loopback HTTP server for tests of HTTP clients: answer(n, headers, body) -> (status,
    payload) for the n-th POST. state["requests"] holds (path, headers, body) of each request;
    state["max_in_flight"] the most requests served at once (each held `delay_s`)."""
    state = {"requests": [], "in_flight": 0, "max_in_flight": 0}
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with lock:
                state["requests"].append((self.path, dict(self.headers), body))
                state["in_flight"] += 1
                state["max_in_flight"] = max(state["max_in_flight"], state["in_flight"])
                n = len(state["requests"])
            time.sleep(delay_s)
            status, payload = answer(n, self.headers, body)
            with lock:
                state["in_flight"] -= 1
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()
        server.server_close()


# Test files whose module-scoped fixtures are expensive (a whole `spinlm run`, a served model): under pytest-xdist
# each goes to one worker whole, so that each fixture is built once. The other tests are handed out one at a time.
# (xdist's own `--dist loadgroup` would do this from xdist_group marks, but on pytest 9.2 xdist 3.8 no longer
# sees them: pytest-dev/pytest-xdist#1386.)
ONE_WORKER = ("test_vllm.py", "test_publish.py", "test_server.py", "test_report.py", "test_lora.py")  # largest first


def _order(item) -> tuple[int, int]:
    """When a test is handed out: the whole-file units first (the largest), then the tests marked slow, then
    the rest, so that the last tests, when one worker may wait for the other, are short."""
    if item.path.name in ONE_WORKER:
        return 0, ONE_WORKER.index(item.path.name)
    return (1 if item.get_closest_marker("slow") is not None else 2), 0


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: without it installed, pytest ignores it
def pytest_xdist_make_scheduler(config, log):
    """`make test` runs `pytest -n 2`: xdist's load scheduling, by the units of ONE_WORKER, in the order
    the workers collected (pytest_collection_modifyitems below). Another --dist keeps xdist's own."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class Units(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return path if Path(path).name in ONE_WORKER else nodeid

    config.option.loadscopereorder = False  # keep the collected order (its default sorts units by size)
    return Units(config, log)


def pytest_collection_modifyitems(config, items):
    """In an xdist worker, the order its tests are handed out in (`_order`; each part in the files' order).
    Run alone (or in a pytest that a worker started), pytest's own order."""
    if hasattr(config, "workerinput"):
        items.sort(key=_order)  # stable
