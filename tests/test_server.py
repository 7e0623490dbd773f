"""generation.backend = server, against real servers: `transformers serve` with a tiny model built
here, and small HTTP servers run by the test itself that misbehave in scripted ways."""

from __future__ import annotations

import logging
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from spinlm import cli, config
from spinlm.data import load_examples
from spinlm.errors import UserError
from spinlm.generation.process import free_port, stop_process_group
from spinlm.io import read_jsonl
from spinlm.stages.generate import generate_file

from conftest import scripted_server

TRANSFORMERS = str(Path(sys.executable).parent / "transformers")
MAX_NEW = 8


@pytest.fixture(autouse=True)
def _server_logs_in_tmp_path(tmp_path, monkeypatch):
    """Logs of failed managed servers are kept on purpose: keep them in the test's own folder."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


def _cfg(model, run_dir, *extra):
    cfg = config.build(None, [f"--model.name_or_path={model}", f"--run.dir={run_dir}", "--run.progress=false",
                              f"--generation.max_new_tokens={MAX_NEW}", "--data.max_length=128",
                              "--data.max_prompt_length=64", "--generation.backend=server", "--generation.retries=1",
                              *extra])
    config.validate(cfg, need=("model",))
    return cfg


def _cli(argv, capsys) -> tuple[int, str]:
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    return code, capsys.readouterr().err


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


# ---------------------------------------------------------------- a real `transformers serve`


@pytest.fixture(scope="module")
def served_model(tiny_model, tmp_path_factory) -> Path:
    """The tiny model, changed so that EOS is likely (rows end both ways) and the checkpoint samples:
    transformers serve samples only when the checkpoint's generation_config says do_sample."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("served")
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight  # tied: also the output layer
        ids = tok("<|user|>What is 2 plus 3?<|end|><|assistant|>", add_special_tokens=False)["input_ids"]
        hidden = model.model(input_ids=torch.tensor([ids])).last_hidden_state[0].mean(0)
        lse = torch.logsumexp(model(input_ids=torch.tensor([ids])).logits[0], -1).mean()
        emb[tok.eos_token_id] = hidden / hidden.dot(hidden) * (lse + torch.log(torch.tensor(0.12)))
    model.generation_config.do_sample = True
    model.generation_config.top_k = None
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@contextmanager
def _transformers_serve(model: Path):
    port = free_port()
    proc = subprocess.Popen([TRANSFORMERS, "serve", str(model), "--port", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.monotonic() + 120
        while not _port_open(port):
            assert proc.poll() is None and time.monotonic() < deadline, "transformers serve did not start"
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process_group(proc, grace_s=10)


@pytest.fixture(scope="module")
def tf_server(served_model):
    with _transformers_serve(served_model) as url:
        yield url


@pytest.fixture(scope="module")
def examples(task_data):
    return load_examples(str(task_data["train"]), max_rows=8)


def test_transformers_serve_rows_in_order_with_valid_finish(served_model, tf_server, examples, tmp_path):
    cfg = _cfg(served_model, tmp_path, f"--generation.server_url={tf_server}", "--generation.concurrency=3")
    stats = generate_file(str(served_model), examples, tmp_path / "gen.jsonl", cfg, 0)
    rows = read_jsonl(tmp_path / "gen.jsonl")
    assert [r["id"] for r in rows] == [ex.id for ex in examples]
    assert stats["rows"] == len(examples)
    for r in rows:
        assert isinstance(r["generated"], str)
        assert r["finish"] in ("eos", "length")
        # transformers serve reports "length" exactly when it produced max_tokens tokens; EOS is not counted
        assert (r["finish"] == "length") == (r["generated_tokens"] == MAX_NEW)
        assert 0 <= r["generated_tokens"] <= MAX_NEW
        assert r["generated_tokens"] > 0 or r["generated"] == ""


def test_transformers_serve_honours_seeds_one_request_at_a_time(served_model, tf_server, examples, tmp_path):
    """transformers serve sets torch's global seed per request; with one request in flight the
    samples repeat, and other seeds give other samples. (With several in flight they do not:
    the seeds race, measured with concurrency 4: 4 of 8 rows differed between two runs.)"""
    cfg = _cfg(served_model, tmp_path, f"--generation.server_url={tf_server}", "--generation.concurrency=1")
    texts = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        cfg.run.seed = seed
        generate_file(str(served_model), examples, tmp_path / f"{name}.jsonl", cfg, 0)
        texts.append([r["generated"] for r in read_jsonl(tmp_path / f"{name}.jsonl")])
    assert texts[0] == texts[1]
    assert texts[0] != texts[2]
    finishes = {r["finish"] for name in "abc" for r in read_jsonl(tmp_path / f"{name}.jsonl")}
    assert finishes == {"eos", "length"}  # the served model ends rows both ways


def test_managed_transformers_serve_is_started_and_stopped(served_model, examples, tmp_path, caplog):
    command = f"{shlex.quote(TRANSFORMERS)} serve {{model}} --port {{port}}"
    cfg = _cfg(served_model, tmp_path, f"--generation.server_command={command}")
    with caplog.at_level(logging.INFO, logger="spinlm"):
        generate_file(str(served_model), examples[:4], tmp_path / "gen.jsonl", cfg, 0)
    assert len(read_jsonl(tmp_path / "gen.jsonl")) == 4
    ready = re.search(r"generation server ready at http://127.0.0.1:(\d+) \(pid (\d+)\)", caplog.text)
    assert ready, caplog.text
    port, pid = int(ready[1]), int(ready[2])
    assert not _port_open(port)
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # neither the server nor anything it started is left


def test_managed_server_that_dies_shows_its_output(task_data, tiny_model, tmp_path, capsys):
    script = "import sys; print('cannot load {model}: boom'); sys.exit(3)  # {port}"
    command = f"{shlex.quote(sys.executable)} -c {shlex.quote(script)}"
    code, err = _cli(["generate", "--model", str(tiny_model), "--data", str(task_data["train"]),
                      "--out", str(tmp_path / "gen.jsonl"), "--run.progress=false", "--generation.backend=server",
                      f"--generation.server_command={command}"], capsys)
    assert code == 2
    assert "exited with code 3 before becoming healthy" in err
    assert f"cannot load {tiny_model}: boom" in err
    assert "Traceback" not in err


# ---------------------------------------------------------------- scripted HTTP servers


def _completion(body, finish="stop"):
    return 200, {"choices": [{"text": f"answer {body['seed'] % 1000}", "finish_reason": finish}],
                 "usage": {"completion_tokens": 4}}


def _generate_cli(tiny_model, task_data, tmp_path, url, *extra):
    return ["generate", "--model", str(tiny_model), "--data", str(task_data["train"]), "--out",
            str(tmp_path / "run" / "gen.jsonl"), f"--run.dir={tmp_path / 'run'}", "--run.progress=false",
            "--generation.backend=server", f"--generation.server_url={url}", *extra]


def test_unreachable_server_is_a_user_error(task_data, tiny_model, tmp_path, capsys):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    code, err = _cli(_generate_cli(tiny_model, task_data, tmp_path, url, "--generation.retries=1"), capsys)
    assert code == 2
    assert url in err and "unreachable" in err and "2 tries" in err
    assert "Traceback" not in err


def test_503_is_retried_then_succeeds(task_data, tiny_model, tmp_path, examples):
    def answer(n, headers, body):
        return (503, {"detail": "loading"}) if n <= 2 else _completion(body)

    with scripted_server(answer) as (url, st):
        cfg = _cfg(tiny_model, tmp_path, f"--generation.server_url={url}", "--generation.retries=2")
        generate_file(str(tiny_model), examples[:3], tmp_path / "gen.jsonl", cfg, 0)
    rows = read_jsonl(tmp_path / "gen.jsonl")
    assert [r["id"] for r in rows] == [ex.id for ex in examples[:3]]
    assert len(st["requests"]) == 2 + 3
    assert all(r["generated"].startswith("answer ") and r["finish"] == "eos" for r in rows)
    assert all(r["generated_tokens"] == 3 for r in rows)  # usage's 4 counts the stop token


def test_400_shows_the_servers_message_without_retrying(task_data, tiny_model, tmp_path, capsys):
    message = "max_tokens is too large for this model"
    with scripted_server(lambda n, h, body: (400, {"error": {"message": message}})) as (url, state):
        code, err = _cli(_generate_cli(tiny_model, task_data, tmp_path, url, "--generation.retries=3"), capsys)
    assert code == 2
    assert message in err and "HTTP 400" in err and "Traceback" not in err
    # Once as token ids, once as text (servers that take only text prompts answer 400 to ids); no retries.
    prompts = [body["prompt"] for _, _, body in state["requests"]]
    assert len(prompts) == 2 and isinstance(prompts[0], list) and isinstance(prompts[1], str)


def test_text_prompts_when_the_server_rejects_token_ids(tiny_model, tmp_path, examples):
    def answer(n, headers, body):
        return (400, {"detail": "prompt must be a string."}) if isinstance(body["prompt"], list) else _completion(body)

    with scripted_server(answer) as (url, state):
        cfg = _cfg(tiny_model, tmp_path, f"--generation.server_url={url}")
        generate_file(str(tiny_model), examples[:4], tmp_path / "gen.jsonl", cfg, 0)
    kinds = [type(body["prompt"]).__name__ for _, _, body in state["requests"]]
    assert kinds == ["list", "str", "str", "str", "str"]  # only the first row ever goes as ids
    assert all(body["prompt"].endswith("<|assistant|>") for _, _, body in state["requests"][1:])


def test_concurrency_bound(tiny_model, tmp_path, task_data):
    examples = load_examples(str(task_data["train"]), max_rows=13)
    with scripted_server(lambda n, h, body: _completion(body, "length"), delay_s=0.1) as (url, state):
        cfg = _cfg(tiny_model, tmp_path, f"--generation.server_url={url}", "--generation.concurrency=3")
        generate_file(str(tiny_model), examples, tmp_path / "gen.jsonl", cfg, 0)
    assert len(state["requests"]) == 13
    assert state["max_in_flight"] == 3
    rows = read_jsonl(tmp_path / "gen.jsonl")
    assert [r["id"] for r in rows] == [ex.id for ex in examples]
    assert all(r["finish"] == "length" and r["generated_tokens"] == 4 for r in rows)


def test_api_key_is_sent_and_never_written(task_data, tiny_model, tmp_path, capsys, caplog, monkeypatch):
    key = "sk-test-5f3a9c0e1d2b"
    monkeypatch.setenv("SPINLM_TEST_KEY", key)

    def answer(n, headers, body):
        if headers.get("Authorization") != f"Bearer {key}":
            return 401, {"detail": "bad key"}
        return _completion(body)

    with caplog.at_level(logging.DEBUG), scripted_server(answer) as (url, state):
        code, err = _cli(_generate_cli(tiny_model, task_data, tmp_path, url,
                                       "--generation.api_key_env=SPINLM_TEST_KEY"), capsys)
    assert code == 0, err
    assert len(state["requests"]) == 48
    assert key not in err and key not in caplog.text
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert (tmp_path / "run" / "gen.jsonl") in files
    assert all(key.encode() not in p.read_bytes() for p in files)


def test_missing_api_key_variable_is_a_user_error(task_data, tiny_model, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SPINLM_TEST_KEY", raising=False)
    code, err = _cli(_generate_cli(tiny_model, task_data, tmp_path, "http://127.0.0.1:9",
                                   "--generation.api_key_env=SPINLM_TEST_KEY"), capsys)
    assert code == 2 and "SPINLM_TEST_KEY" in err and "Traceback" not in err


def test_server_settings_are_validated():
    with pytest.raises(UserError) as e:
        config.validate(config.build(None, ["--model.name_or_path=m", "--generation.backend=server"]), need=("model",))
    assert "exactly one of generation.server_url" in str(e.value)
    with pytest.raises(UserError) as e:
        config.validate(config.build(None, ["--model.name_or_path=m", "--generation.backend=remote",
                                            "--generation.concurrency=0"]), need=("model",))
    assert "generation.backend must be one of local, server, vllm" in str(e.value)
    assert "generation.concurrency must be > 0" in str(e.value)
    with pytest.raises(UserError) as e:
        config.validate(config.build(None, ["--model.name_or_path=m", "--generation.backend=server",
                                            "--generation.server_command=vllm serve {model}"]), need=("model",))
    assert "must contain {port}" in str(e.value)


def test_every_configured_backend_has_an_implementation():
    """generation.backend's choices (the config's) and spinlm.generation.backend_for's table agree."""
    import typing

    from spinlm.generation import backend_for

    names = typing.get_args(typing.get_type_hints(config.GenerationConfig)["backend"])
    assert set(names) == {"local", "server", "vllm"}
    for name in names:
        backend = backend_for(config.build(None, ["--model.name_or_path=m", f"--generation.backend={name}"]))
        assert backend.needs_local_model == (name == "local")
    cfg = config.build(None, ["--model.name_or_path=m"])
    cfg.generation.backend = "remote"
    with pytest.raises(UserError, match="generation.backend must be one of local, server, vllm; got 'remote'"):
        backend_for(cfg)


def test_managed_server_health_timeout(task_data, tiny_model, tmp_path, capsys):
    script = "import time; print('still loading {model} on {port}', flush=True); time.sleep(60)"
    command = f"{shlex.quote(sys.executable)} -c {shlex.quote(script)}"
    code, err = _cli(["generate", "--model", str(tiny_model), "--data", str(task_data["train"]),
                      "--out", str(tmp_path / "gen.jsonl"), "--run.progress=false", "--generation.backend=server",
                      f"--generation.server_command={command}", "--generation.server_start_timeout_s=1"], capsys)
    assert code == 2
    assert "did not answer" in err and "/health within 1 s" in err and "still loading" in err
    assert "Traceback" not in err


MINI_SERVER = '''
import json, os, sys
from http.server import BaseHTTPRequestHandler, HTTPServer

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        data = json.dumps({"choices": [{"text": "hi", "finish_reason": "stop"}]}).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(data))); self.end_headers()
        self.wfile.write(data); self.wfile.flush()
        if "--die-after-answering" in sys.argv:
            os._exit(5)

HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
'''


def test_managed_server_is_stopped_on_interrupt(tiny_model, tmp_path, caplog):
    from transformers import AutoTokenizer

    from spinlm.generation.server import generate_server

    (tmp_path / "serve.py").write_text(MINI_SERVER)
    command = f"{shlex.quote(sys.executable)} {shlex.quote(str(tmp_path / 'serve.py'))} {{port}} # {{model}}"
    cfg = _cfg(tiny_model, tmp_path, f"--generation.server_command={command}")
    tok = AutoTokenizer.from_pretrained(tiny_model)
    seen = []

    def on_result(i, row):
        seen.append(row)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with caplog.at_level(logging.INFO, logger="spinlm"), pytest.raises(KeyboardInterrupt):
        generate_server(tok, [[5, 6, 7]] * 6, list(range(6)), cfg, str(tiny_model), on_result, progress=False)
    hi_tokens = len(tok("hi", add_special_tokens=False)["input_ids"])  # no usage in the answer: counted here
    assert seen[0] == {"text": "hi", "tokens": hi_tokens, "finish": "eos"}
    port = int(re.search(r"ready at http://127.0.0.1:(\d+)", caplog.text)[1])
    assert not _port_open(port)


def test_no_openai_setting_of_the_environment_reaches_the_server(tiny_model, tmp_path, examples, monkeypatch):
    """The openai client reads OPENAI_API_KEY, OPENAI_BASE_URL, organization and project ids and
    proxies from the environment: none of them may reach (or redirect) spinlm's server requests."""
    for name, value in (("OPENAI_API_KEY", "sk-real-secret-0c1d"), ("OPENAI_ORG_ID", "org-real"),
                        ("OPENAI_PROJECT_ID", "proj-real"), ("OPENAI_BASE_URL", "http://127.0.0.1:9/v1"),
                        ("OPENAI_CUSTOM_HEADERS", "Authorization: Bearer sk-custom-secret"),
                        ("HTTP_PROXY", "http://127.0.0.1:9"), ("ALL_PROXY", "http://127.0.0.1:9")):
        monkeypatch.setenv(name, value)
    with scripted_server(lambda n, h, body: _completion(body)) as (url, state):
        cfg = _cfg(tiny_model, tmp_path, f"--generation.server_url={url}")
        generate_file(str(tiny_model), examples[:3], tmp_path / "gen.jsonl", cfg, 0)
    assert [path for path, _, _ in state["requests"]] == ["/v1/completions"] * 3
    for _, headers, _ in state["requests"]:
        sent = {k.lower(): v for k, v in headers.items()}
        assert sent["authorization"] == "Bearer EMPTY"  # the client's placeholder: no generation.api_key_env
        assert "openai-organization" not in sent and "openai-project" not in sent
        assert not any("secret" in v or "real" in v for v in sent.values())


def test_a_dead_managed_server_is_not_retried(tiny_model, tmp_path, capsys):
    """generation.retries=6 would back off for about 20 s against a server that is gone; spinlm stops
    retrying once the managed server's process has exited, and says so with its exit code."""
    (tmp_path / "serve.py").write_text(MINI_SERVER)
    serve = shlex.quote(str(tmp_path / "serve.py"))
    command = f"{shlex.quote(sys.executable)} {serve} {{port}} --die-after-answering # {{model}}"
    data = tmp_path / "data.jsonl"
    data.write_text("".join(f'{{"id": "r{i}", "prompt": "What is {i} plus 3?", "response": "{i + 3}"}}\n'
                            for i in range(4)))
    start = time.monotonic()
    code, err = _cli(["generate", "--model", str(tiny_model), "--data", str(data), "--out", str(tmp_path / "gen.jsonl"),
                      "--run.progress=false", "--generation.backend=server", f"--generation.server_command={command}",
                      "--generation.retries=6", "--generation.concurrency=1"], capsys)
    assert code == 2 and "Traceback" not in err
    assert "no retries: its process has exited" in err and "the generation server exited with code 5" in err
    assert time.monotonic() - start < 15  # server start-up and stop included; the backoff alone would be ~20 s


def test_without_the_openai_client_one_clear_error(tiny_model, task_data, tmp_path):
    """A real Python in which `import openai` fails (None in sys.modules is how Python blocks an
    import): spinlm imports, and the server backend and `spinlm judge` each give one UserError."""
    run = ("import sys; sys.modules['openai'] = None; from spinlm.cli import main; import spinlm.generation.server, "
           "spinlm.eval.judge; sys.exit(main(sys.argv[1:]))")
    (tmp_path / "q.jsonl").write_text('{"question_id": 1, "category": "math", "turns": ["What is 2 plus 3?"]}\n')
    (tmp_path / "run.yaml").write_text(f"model: {{name_or_path: {tiny_model}}}\ndata: {{train: {task_data['train']}}}\n"
                                       f"run: {{dir: {tmp_path / 'run'}}}\n")
    server = ["--generation.backend=server", "--generation.server_url=http://127.0.0.1:9"]
    for argv, what in ((["validate", str(tmp_path / "run.yaml"), *server], "generation.backend: server"),
                       (["generate", "--model", str(tiny_model), "--data", str(task_data["train"]), "--out",
                         str(tmp_path / "gen.jsonl"), "--run.progress=false", *server], "generation.backend: server"),
                       (["judge", "--model", str(tiny_model), "--questions", str(tmp_path / "q.jsonl"), "--judge-url",
                         "http://127.0.0.1:9", "--judge-model", "j", "--out", str(tmp_path / "judge")],
                        "spinlm judge")):
        proc = subprocess.run([sys.executable, "-c", run, *argv], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert f"{what} talks to the server through the openai client" in proc.stderr
        assert "pip install 'spinlm[server]'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "judge" / "answers-a.log").exists()  # before any answer was generated
