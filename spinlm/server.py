"""Generation through an OpenAI-compatible server (`generation.backend: server`).

    spinlm generate --model MODEL --data DATA.jsonl --out generations.jsonl \\
        --generation.backend=server --generation.server_command='vllm serve {model} --port {port}'

Two modes. Unmanaged (`generation.server_url`): requests go to a server someone else runs.
Managed (`generation.server_command`): spinlm starts the command for the model being
generated with, on a free loopback port, waits for `GET /health`, generates, and stops the
server again (SIGTERM to its process group, SIGKILL after a grace period), also when
generation fails or is interrupted. The server's output goes to a log file whose last lines
are shown if it dies before becoming healthy.

Requests go to `POST /v1/completions` (not chat completions), so the prompt is rendered by
spinlm's chat template (`spinlm.tokens.encode_prompt`), the same rendering score and train
see, and never by the server's. The prompt is sent as token ids where the server accepts
them (vLLM and SGLang do): text would be tokenized again by the server, which may add a
second BOS or split differently. `transformers serve` (5.x) answers a token-id prompt with
HTTP 400 (TGI's schema may take only text as well; not checked), so the first row is sent
as ids, and if that is rejected (HTTP 400/422) it is re-sent as the decoded text (special
tokens kept) and every row after it as text; a warning says when the server's own
tokenization of that text will differ.

The first request also asks for vLLM's extras: the sampled ids back (`return_token_ids`), stops
on spinlm's stop tokens (`stop_token_ids`: the chat template's turn end and the EOS ids, see
`spinlm.tokens.stop_ids`), and neutral values for every sampling setting a server may otherwise
take from the checkpoint's generation_config (`top_k`, `min_p`, `repetition_penalty`, penalties).
The sampled ids are what score and train use (`generated_ids`); the prompt ids the server reports
(`prompt_token_ids`) must equal those sent. A server that rejects the extras or token-id prompts
gets the plain request (text prompt, OpenAI fields only) from then on, and its rows are stored as
text (re-encoded for scoring; the stage logs how many).

Each row sends its own `seed`, which vLLM, SGLang and TGI document as a per-request seed.
`transformers serve` (5.x) instead sets torch's global seed when a request arrives and
builds sampling from the checkpoint's generation_config: it samples only if that config has
`do_sample: true` (else it decodes greedily), and seeded rows reproduce only with
`generation.concurrency: 1`. It also rejects `top_k` (HTTP 422): keep `generation.top_k: 0`.

Token counts exclude the stop token, as in the local backend: servers count it in
`usage.completion_tokens`, so one is taken off rows that stopped.

A managed server that fails during generation (dies, or answers errors: e.g. vLLM's CPU kernels
refuse some head sizes only at the first request) ends the stage with one error that carries the
server's state and the last lines of its log; rows finished before are kept, and a re-run
generates only the others. Requests to a dead managed server are not retried.

`chat()` sends one `/v1/chat/completions` request through the same client; `spinlm judge` uses it
to reach its judge model (spinlm/judge.py).

The HTTP is the `openai` client's (`pip install 'spinlm[server]'`), as vLLM's and SGLang's docs use
it: a connection pool, `generation.timeout_s` per request, and `generation.retries` retries with
exponential backoff on connection errors, timeouts, HTTP 408/409/429 and 5xx. vLLM's fields go in
`extra_body` and come back in the answer's extra fields. What spinlm adds: the managed server, the
token-id prompt and its text fallback, the API key from `generation.api_key_env` alone (none of the
environment's OPENAI_* settings is sent), no proxy for loopback servers, and no retries once a
managed server's process has exited. `GET /health` (not an OpenAI endpoint) uses the standard
library.
"""

from __future__ import annotations

import http.client
import importlib
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .config import Config, GenerationConfig
from .errors import UserError
from .progress import bar as progress_bar

log = logging.getLogger("spinlm")

STOP_GRACE_S = 15.0  # SIGTERM -> SIGKILL
LOG_TAIL_LINES = 20


@dataclass
class Endpoint:
    url: str  # base URL without a trailing slash or /v1
    model: str
    client: object  # an openai.OpenAI: pooling, timeouts, retries with backoff; holds the API key, never log it
    retries: int
    role: str = "generation server"  # how error messages name it (the judge uses "judge server")
    retries_setting: str = "generation.retries"


class _Rejected(UserError):
    """An HTTP error the client does not retry (4xx other than 408/409/429): the same request cannot succeed."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def require_openai(what: str = "generation.backend: server"):
    """The openai package (the `server` extra), or one UserError saying how to install it."""
    try:
        import openai
    except ImportError:
        raise UserError(f"{what} talks to the server through the openai client, which is not installed in this "
                        f"environment ({sys.executable}): pip install 'spinlm[server]'") from None
    return openai


def endpoint(url: str, model: str, api_key_env: str | None, timeout_s: float, retries: int,
             alive: Callable[[], bool] | None = None, *, key_setting: str = "generation.api_key_env",
             role: str = "generation server", retries_setting: str = "generation.retries") -> Endpoint:
    """An OpenAI client for the server at `url` (a base URL, as base_url() returns).

    The key comes only from the variable `api_key_env` names; without one a placeholder goes (the
    client insists on a key). Nothing else of the environment's OpenAI settings (OPENAI_API_KEY,
    OPENAI_BASE_URL, organization and project ids) reaches the server. `alive`: whether a managed
    server's process still runs; once it has exited, requests fail at once instead of being retried."""
    openai = require_openai()
    key = _api_key(api_key_env, key_setting) or "EMPTY"
    client = openai.OpenAI(base_url=url + "/v1", api_key=key, timeout=timeout_s, max_retries=retries,
                           http_client=_http_client(openai, url, alive),
                           default_headers={"Authorization": f"Bearer {key}", "OpenAI-Organization": openai.Omit(),
                                            "OpenAI-Project": openai.Omit()})
    return Endpoint(url, model, client, retries, role, retries_setting)


def _http_client(openai, url: str, alive: Callable[[], bool] | None):
    """The client's own HTTP pool, except: loopback servers without the environment's proxies (a proxy
    set for the outside world must not catch them), and a managed server behind _WhileAlive."""
    if not _loopback(url):
        return None
    if alive is None:
        return openai.DefaultHttpxClient(trust_env=False)
    httpx = importlib.import_module(openai.DefaultHttpxClient.__mro__[1].__module__)  # httpx (or httpx2: openai 3)
    inner = httpx.HTTPTransport(limits=openai.DEFAULT_CONNECTION_LIMITS)
    return openai.DefaultHttpxClient(trust_env=False, transport=_WhileAlive(inner, alive, httpx.Response))


class _WhileAlive:
    """An HTTP transport that, once the managed server's process has exited, answers every request
    itself with HTTP 503 and `x-should-retry: false` (the header the openai client obeys), so a dead
    server ends the stage at once rather than after every retry's backoff."""

    def __init__(self, inner, alive: Callable[[], bool], response_cls):
        self.inner, self.alive, self.response_cls = inner, alive, response_cls

    def handle_request(self, request):
        if self.alive():
            try:
                return self.inner.handle_request(request)
            except Exception:
                if self.alive():
                    raise  # the client retries connection errors and timeouts
        return self.response_cls(503, headers={"x-should-retry": "false"}, request=request,
                                 json={"error": {"message": "the server's process has exited (not retried)"}})

    def close(self) -> None:
        self.inner.close()


def _loopback(url: str) -> bool:
    return (urllib.parse.urlsplit(url).hostname or "") in ("127.0.0.1", "localhost", "::1")


def _opener(url: str) -> urllib.request.OpenerDirector:
    """For `GET /health` (not an OpenAI endpoint): no proxy for loopback servers, as in _http_client."""
    return urllib.request.build_opener(urllib.request.ProxyHandler({})) if _loopback(url) else \
        urllib.request.build_opener()


def generate_server(tokenizer, prompts: list[list[int]], seeds: list[int], cfg: Config, model_path: str,
                    on_result: Callable[[int, dict], None], progress: bool = True, desc: str = "generate",
                    stops: list[int] | None = None) -> None:
    """Sample one response per token-id prompt from a server; on_result(i, row) in this thread.

    Each row: {"text", "tokens" (count, stop token excluded), "finish": "eos" | "length"}, and
    "ids" (the sampled ids, with the stop token that ended the row) where the server returns them;
    rows arrive in any order. `stops`: the ids that end a response (default: the tokenizer's EOS).
    """
    g = cfg.generation
    require_openai()
    _api_key(g.api_key_env)
    if not prompts:
        return
    stops = sorted(set(stops or [tokenizer.eos_token_id]))
    with _server(g, model_path) as (url, alive):
        ep = endpoint(url, g.server_model or model_path, g.api_key_env, g.timeout_s, g.retries, alive)
        log.info("sending %d prompts to %s", len(prompts), url)
        bar = progress_bar(len(prompts), desc, progress)
        try:
            _generate_all(ep, tokenizer, prompts, seeds, g, on_result, bar, stops)
        finally:
            bar.close()
        ep.client.close()  # not on an error: requests still in flight are abandoned, not cut off


def _api_key(api_key_env: str | None, setting: str = "generation.api_key_env") -> str | None:
    """The key from the variable named by `setting` (None without one); never logged or saved."""
    if not api_key_env:
        return None
    key = os.environ.get(api_key_env)
    if not key:
        raise UserError(f"{setting} names the environment variable {api_key_env}, which is not set "
                        "or empty: export it with the server's API key")
    return key


def base_url(url: str) -> str:
    """A server's base URL: without a trailing slash or /v1 (OpenAI clients' base_url style)."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


@contextmanager
def _server(g: GenerationConfig, model_path: str) -> Iterator[tuple[str, Callable[[], bool] | None]]:
    """(base URL, whether the server process still runs: None when spinlm does not run it)."""
    if g.server_url:
        yield base_url(g.server_url), None
    else:
        assert g.server_command, "validate() requires server_url or server_command"
        with managed_server(g.server_command, model_path, g.server_start_timeout_s) as (url, proc):
            yield url, lambda: proc.poll() is None


def _generate_all(endpoint: Endpoint, tokenizer, prompts, seeds, g: GenerationConfig, on_result, bar,
                  stops: list[int]) -> None:
    """The first row decides how prompts are sent (ids with vLLM's extras, or plain text); the rest
    run concurrently."""
    as_text, first = _first_row(endpoint, tokenizer, prompts[0], seeds[0], g, stops)
    extras = None if as_text else stops
    on_result(0, _parse(first, tokenizer, None if as_text else prompts[0], stops))
    bar.update(1)
    pool = ThreadPoolExecutor(max_workers=g.concurrency, thread_name_prefix="spinlm-request")
    try:
        futures = {pool.submit(_complete, endpoint, _prompt(tokenizer, prompts[i], as_text), seeds[i], g, extras): i
                   for i in range(1, len(prompts))}
        for future in as_completed(futures):
            i = futures[future]
            on_result(i, _parse(future.result(), tokenizer, None if as_text else prompts[i], stops))
            bar.update(1)
    finally:
        # Without waiting: on an error or Ctrl-C, queued rows are dropped and in-flight ones abandoned.
        pool.shutdown(wait=False, cancel_futures=True)


def _first_row(endpoint: Endpoint, tokenizer, ids: list[int], seed: int, g: GenerationConfig,
               stops: list[int]) -> tuple[bool, dict]:
    """(whether prompts go as text, the first row's response)."""
    try:
        return False, _complete(endpoint, ids, seed, g, stops)
    except _Rejected as e:
        if e.status not in (400, 422):
            raise
        log.info("%s does not take token-id prompts or vLLM's sampling extras (%s); sending prompts as text, "
                 "without them", endpoint.url, e)
    text = _prompt(tokenizer, ids, as_text=True)
    if list(tokenizer(text)["input_ids"]) != list(ids):
        log.warning("the server tokenizes text prompts itself, and its tokenizer's default encoding of the rendered "
                    "prompt differs from spinlm's (e.g. an added BOS): generation may see a different prompt "
                    "than score and train")
    return True, _complete(endpoint, text, seed, g)


def _prompt(tokenizer, ids: list[int], as_text: bool) -> list[int] | str:
    return tokenizer.decode(ids, skip_special_tokens=False) if as_text else ids


def _complete(endpoint: Endpoint, prompt: list[int] | str, seed: int, g: GenerationConfig,
              stops: list[int] | None = None) -> dict:
    """One completion request (the client retries); the server's answer as a dict. With `stops`,
    vLLM's extras too: sampled ids back, these stop ids, and every other sampling setting neutral (so
    that no generation_config of the checkpoint fills them in)."""
    extra = {"top_k": g.top_k} if g.top_k > 0 else {}  # not in the OpenAI schema: vLLM's and SGLang's
    if stops is not None:
        extra.update(return_token_ids=True, stop_token_ids=stops, top_k=g.top_k if g.top_k > 0 else -1, min_p=0.0,
                     repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0)
    return _ask(endpoint, "completion", lambda: endpoint.client.completions.create(
        model=endpoint.model, prompt=prompt, max_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p,
        seed=seed, extra_body=extra or None))


def chat(endpoint: Endpoint, messages: list[dict], max_tokens: int, temperature: float = 0.0) -> str:
    """One `/v1/chat/completions` request (non-streaming; the client retries); the reply's text."""
    answer = _ask(endpoint, "chat", lambda: endpoint.client.chat.completions.create(
        model=endpoint.model, messages=messages, max_tokens=max_tokens, temperature=temperature, stream=False))
    try:
        content = answer["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise UserError(f"the {endpoint.role}'s answer is not an OpenAI chat completion: {str(answer)[:500]}") from None
    return content or ""


def _ask(endpoint: Endpoint, kind: str, send: Callable) -> dict:
    """send() through the client, which retries connection errors, timeouts, HTTP 408/409/429 and 5xx
    with exponential backoff (0.5 s, 1 s, 2 s, ... at most 8 s, or the server's Retry-After); the
    answer as a dict, extra fields (vLLM's token ids) included. Failures: UserErrors naming the server
    and the setting to change."""
    openai = require_openai()
    try:
        return send().model_dump()
    except openai.APIStatusError as e:
        reason = f"HTTP {e.status_code}: {_error_message(e)}"
        if e.status_code in (408, 409, 429) or e.status_code >= 500:
            raise _failing(endpoint, reason, dead=e.response.headers.get("x-should-retry") == "false") from None
        raise _Rejected(f"the {endpoint.role} at {endpoint.url} rejected a {kind} request ({reason})",
                        e.status_code) from None
    except openai.APIConnectionError as e:  # timeouts too
        cause = e.__cause__
        raise _failing(endpoint, f"{type(e).__name__}: {cause or e}") from None
    except openai.OpenAIError as e:  # e.g. an answer that is not JSON
        raise UserError(f"the {endpoint.role} at {endpoint.url} gave an answer the openai client cannot read "
                        f"({type(e).__name__}: {e})") from None


def _failing(endpoint: Endpoint, reason: str, dead: bool = False) -> UserError:
    tries = "no retries: its process has exited" if dead else \
        f"{endpoint.retries + 1} {'try' if endpoint.retries == 0 else 'tries'}"
    return UserError(f"the {endpoint.role} at {endpoint.url} is unreachable or failing ({tries}; "
                     f"{endpoint.retries_setting}={endpoint.retries}): {reason}. "
                     "Check that the server is running and reachable at that address.")


def _error_message(error) -> str:
    """The server's own words: OpenAI's `error.message`, FastAPI's `detail`, or the raw body."""
    body = error.body  # the client has unwrapped OpenAI's {"error": {...}}
    if isinstance(body, dict):
        for value in (body.get("detail"), body.get("message"), body.get("error")):
            if value:
                return str(value)[:1000]
    text = error.response.text.strip() if body is None else str(body)
    return text[:1000] or error.response.reason_phrase


def _parse(answer: dict, tokenizer, sent: list[int] | None = None, stops: list[int] = ()) -> dict:
    """A completion answer -> {"text", "tokens" (stop token excluded), "finish"}, and "ids" where the
    answer has the sampled ids (vLLM's `return_token_ids`). `sent`: the prompt ids sent, which the
    server's `prompt_token_ids` must equal."""
    try:
        choice = answer["choices"][0]
        text = choice["text"]
    except (KeyError, IndexError, TypeError):
        text = None
    if not isinstance(text, str):
        raise UserError(f"the generation server's answer is not an OpenAI completion: {str(answer)[:500]}")
    finish = "length" if choice.get("finish_reason") == "length" else "eos"
    seen = choice.get("prompt_token_ids", answer.get("prompt_token_ids"))
    if sent is not None and seen is not None and list(seen) != list(sent):
        raise UserError(f"the generation server generated from other prompt ids than spinlm sent (sent {len(sent)} "
                        f"ids ending {list(sent)[-8:]}, it reports {len(seen)} ending {list(seen)[-8:]}); score and "
                        "train would see another prompt than generation did")
    ids = choice.get("token_ids")
    if sent is not None and isinstance(ids, list):
        ids = [int(t) for t in ids]
        ended = finish == "eos" and bool(ids) and ids[-1] in stops
        body = ids[:-1] if ended else ids
        return {"text": tokenizer.decode(body, skip_special_tokens=True), "tokens": len(body), "finish": finish,
                "ids": ids}
    count = (answer.get("usage") or {}).get("completion_tokens")
    if count is None:
        count = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    elif finish == "eos":
        count = max(count - 1, 0)  # the server counted the stop token
    return {"text": text, "tokens": count, "finish": finish}


# ---------------------------------------------------------------- managed server


def free_port() -> int:
    """A loopback port free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_args(command: str, model_path: str, port: int) -> list[str]:
    """The command split like a shell would (no shell runs), placeholders filled per argument."""
    return [a.replace("{model}", model_path).replace("{port}", str(port)) for a in shlex.split(command)]


@contextmanager
def managed_server(command: str, model_path: str, start_timeout_s: float) -> Iterator[tuple[str, subprocess.Popen]]:
    """Start the server, yield (its base URL, its process) once healthy, stop it
    on the way out (errors included). A UserError raised while it serves comes out with the server's
    state and the last lines of its log added.

    The log is deleted after a clean run and kept (its path logged) after a failure.
    """
    port = free_port()
    args = server_args(command, model_path, port)
    url = f"http://127.0.0.1:{port}"
    log_dir = Path(tempfile.mkdtemp(prefix="spinlm-server-"))
    log_path = log_dir / "server.log"
    log.info("starting the generation server: %s (log: %s)", shlex.join(args), log_path)
    with open(log_path, "wb") as log_file:
        try:
            # A session of its own: Ctrl-C does not reach it directly, and its workers stop with it.
            proc = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        except OSError as e:
            shutil.rmtree(log_dir, ignore_errors=True)
            raise UserError(f"generation.server_command: cannot start {args[0]!r}: {e}") from None
        try:
            _wait_healthy(proc, url, start_timeout_s, log_path)
            log.info("generation server ready at %s (pid %d)", url, proc.pid)
            try:
                yield url, proc
            except UserError as e:
                state = (f"the generation server is still running (pid {proc.pid})" if proc.poll() is None else
                         f"the generation server exited with code {proc.returncode}")
                raise UserError(f"{e}\n{state}; the last lines of its log ({log_path}):\n{_tail(log_path)}") from e
        except BaseException:
            log.info("generation server log kept at %s", log_path)
            raise
        finally:
            stop_process_group(proc)
    shutil.rmtree(log_dir, ignore_errors=True)


def _wait_healthy(proc: subprocess.Popen, url: str, timeout_s: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise UserError(f"the generation server exited with code {proc.returncode} before becoming healthy at "
                            f"{url}/health; the last lines of its log ({log_path}):\n{_tail(log_path)}")
        if _healthy(url):
            return
        if time.monotonic() > deadline:
            raise UserError(f"the generation server did not answer {url}/health within {timeout_s:g} s "
                            "(generation.server_start_timeout_s); the last lines of its log "
                            f"({log_path}):\n{_tail(log_path)}")
        time.sleep(0.5)


def _healthy(url: str) -> bool:
    try:
        with _opener(url).open(url + "/health", timeout=5) as response:
            return response.status == 200
    except (OSError, http.client.HTTPException):
        return False


_ERROR_LINE = re.compile(r"\b[A-Z]\w*(Error|Exception)\b: ")


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The log's last lines, after its last few distinct error lines where those came earlier (a
    server may print pages of shutdown noise after the error that stopped it)."""
    all_lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    tail = all_lines[-lines:]
    errors = list(dict.fromkeys(line.strip() for line in all_lines[:-lines] if _ERROR_LINE.search(line)))[-3:]
    shown = (["(errors earlier in the log:)", *errors, "(the log's last lines:)"] if errors else []) + tail
    return "\n".join(shown) or "(empty)"


def stop_process_group(proc: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM to the server's process group, SIGKILL to whatever is left after `grace_s`."""
    _signal_group(proc, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        log.warning("the generation server (pid %d) did not stop within %g s: killing it", proc.pid, grace_s)
    _signal_group(proc, signal.SIGKILL)  # also any worker processes the server left behind
    proc.wait()
    # Its workers (transformers serve >= 5.25 starts multiprocessing ones) are not our children: they
    # go once their new parent reaps them. Wait for the group to be empty, so that nothing of the
    # server (a worker holding GPU memory, say) outlives the stage; give up after `grace_s`.
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.1)
    log.warning("processes of the generation server's group (pgid %d) are still there after %g s", proc.pid, grace_s)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the group id is the pid: start_new_session=True
    except (ProcessLookupError, PermissionError):
        pass


def preflight(g: GenerationConfig) -> None:
    """What `spinlm validate` can check of a server setup without generating: the API key
    variable, that an unmanaged server answers at all, that a managed command exists; and that the
    openai client is installed."""
    require_openai()
    _api_key(g.api_key_env)
    if g.server_url:
        url = base_url(g.server_url)
        try:
            with _opener(url).open(url + "/health", timeout=10):
                pass
        except urllib.error.HTTPError:
            pass  # it answered: reachable (some OpenAI-compatible APIs have no /health)
        except (OSError, http.client.HTTPException) as e:
            reason = getattr(e, "reason", e)
            raise UserError(f"generation.server_url: the generation server at {url} is unreachable ({reason}); "
                            "start it, or fix the URL") from None
    elif g.server_command:
        program = shlex.split(g.server_command)[0]
        if shutil.which(program) is None:
            raise UserError(f"generation.server_command: {program!r} is not an executable on PATH")
