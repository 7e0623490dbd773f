"""The HTTP client for OpenAI-compatible servers: the generation server backend's and `spinlm judge`'s.

`endpoint()` builds a client for one server; `completion()` sends one `POST /v1/completions`
(the server backend, spinlm.generation.server) and `chat()` one `POST /v1/chat/completions`
(the judge, spinlm.eval.judge). Failures become UserErrors that name the server (its `role`) and
the setting to change.

The HTTP is the `openai` client's (`pip install 'spinlm[server]'`), as vLLM's and SGLang's docs use
it: a connection pool, a timeout per request, and `retries` retries with exponential backoff on
connection errors, timeouts, HTTP 408/409/429 and 5xx. vLLM's fields go in `extra_body` and come
back in the answer's extra fields. What spinlm adds: the API key from the one variable a setting
names (`api_key()`; none of the environment's OPENAI_* settings is sent), no proxy for loopback
servers, and no retries once a managed server's process has exited (`alive`). `GET /health` (not
an OpenAI endpoint) uses the standard library, through `opener()`.

The openai package is imported only when a client is built (`require_openai()`), so spinlm
imports and runs the other backends without it.
"""

from __future__ import annotations

import importlib
import os
import sys
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

from spinlm.errors import UserError


@dataclass
class Endpoint:
    url: str  # base URL without a trailing slash or /v1
    model: str
    client: object  # an openai.OpenAI: pooling, timeouts, retries with backoff; holds the API key, never log it
    retries: int
    role: str = "generation server"  # how error messages name it (the judge uses "judge server")
    retries_setting: str = "generation.retries"


class Rejected(UserError):
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


def api_key(api_key_env: str | None, setting: str = "generation.api_key_env") -> str | None:
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


def endpoint(url: str, model: str, api_key_env: str | None, timeout_s: float, retries: int,
             alive: Callable[[], bool] | None = None, *, key_setting: str = "generation.api_key_env",
             role: str = "generation server", retries_setting: str = "generation.retries") -> Endpoint:
    """An OpenAI client for the server at `url` (a base URL, as base_url() returns).

    The key comes only from the variable `api_key_env` names; without one a placeholder goes (the
    client insists on a key). Nothing else of the environment's OpenAI settings (OPENAI_API_KEY,
    OPENAI_BASE_URL, organization and project ids) reaches the server. `alive`: whether a managed
    server's process still runs; once it has exited, requests fail at once instead of being retried."""
    openai = require_openai()
    key = api_key(api_key_env, key_setting) or "EMPTY"
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


def opener(url: str) -> urllib.request.OpenerDirector:
    """For `GET /health` (not an OpenAI endpoint): no proxy for loopback servers, as in _http_client."""
    return urllib.request.build_opener(urllib.request.ProxyHandler({})) if _loopback(url) else \
        urllib.request.build_opener()


def completion(endpoint: Endpoint, prompt: list[int] | str, *, max_tokens: int, temperature: float, top_p: float,
               seed: int, extra_body: dict | None = None) -> dict:
    """One `/v1/completions` request (the client retries); the server's answer as a dict, extra
    fields included. `extra_body`: fields outside the OpenAI schema (vLLM's and SGLang's)."""
    return _ask(endpoint, "completion", lambda: endpoint.client.completions.create(
        model=endpoint.model, prompt=prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
        seed=seed, extra_body=extra_body))


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
        raise Rejected(f"the {endpoint.role} at {endpoint.url} rejected a {kind} request ({reason})",
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
