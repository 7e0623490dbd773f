"""The generation server backend (`generation.backend: server`): an OpenAI-compatible server samples.

    spinlm generate --model MODEL --data DATA.jsonl --out generations.jsonl \\
        --generation.backend=server --generation.server_command='vllm serve {model} --port {port}'

Two modes. Unmanaged (`generation.server_url`): requests go to a server someone else runs.
Managed (`generation.server_command`): spinlm starts the command for the model being generated
with and stops it afterwards (spinlm.generation.process). The HTTP goes through
spinlm.generation.client (the openai client: retries, API key, no proxy for loopback servers).

Requests go to `POST /v1/completions` (not chat completions), so the prompt is rendered by
spinlm's chat template (`spinlm.tokens.encode_prompt`), the same rendering score and train
see, and never by the server's. The prompt is sent as token ids where the server accepts
them (vLLM and SGLang do; they add no BOS to ids): text would be tokenized again by the server,
which may split differently. `transformers serve` (5.x) answers a token-id prompt with
HTTP 400 (TGI's schema may take only text as well; not checked), so the first row is sent
as ids, and if that is rejected (HTTP 400/422) it is re-sent as the decoded text (special
tokens kept, the BOS left for the server to add where the tokenizer adds one by default) and
every row after it as text; a warning says when the server's own tokenization of that text
will differ.

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

Several processes (torchrun): rank 0 alone feeds the server, which batches the requests by itself;
the stage then gathers rank 0's rows to the others (run.dist_timeout_min bounds their wait).
"""

from __future__ import annotations

import http.client
import logging
import shlex
import shutil
import urllib.error
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager

from spinlm import dist, preempt
from spinlm.config import Config, GenerationConfig
from spinlm.errors import Preempted, UserError
from spinlm.generation.client import Endpoint, Rejected, api_key, base_url, completion, endpoint, opener, require_openai
from spinlm.generation.local import checkpoint_generation_config
from spinlm.generation.process import managed_server
from spinlm.hub import is_hub_id, snapshot_dir
from spinlm.io import RowLog
from spinlm.modeling import release_device_memory
from spinlm.progress import bar as progress_bar
from spinlm.tokens import adds_bos, stop_ids

log = logging.getLogger("spinlm")


class ServerBackend:
    """`generation.backend: server` (spinlm.generation.Backend): no model is loaded in this process."""

    needs_local_model = False

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def preflight(self) -> None:
        preflight(self.cfg.generation)

    def generate(self, model_path: str, tokenizer, prompts: list[list[int]], seeds: list[int], rowlog: RowLog,
                 desc: str = "generate") -> list[dict]:
        """Rows in input order; rank 0 fills the rows `rowlog` lacks, the other processes only those it holds."""
        release_device_memory()  # the server needs the device: every process returns its cached memory
        results = [rowlog.done.get(i, {}) for i in range(len(prompts))]
        todo = [i for i in range(len(prompts)) if i not in rowlog.done]
        if dist.is_main() and todo:  # one client (rank 0) feeds the server; it batches by itself

            def finished(j: int, result: dict) -> None:
                results[todo[j]] = result
                rowlog.add([(todo[j], result)])

            try:
                generate_server(tokenizer, [prompts[i] for i in todo], [seeds[i] for i in todo], self.cfg,
                                model_path, finished, progress=self.cfg.run.progress, desc=desc,
                                stops=stop_ids(tokenizer, checkpoint_generation_config(model_path,
                                                                                       self.cfg.model.revision)))
            except Preempted:  # while the server started; the stage stops every process together
                pass
        return results


def generate_server(tokenizer, prompts: list[list[int]], seeds: list[int], cfg: Config, model_path: str,
                    on_result: Callable[[int, dict], None], progress: bool = True, desc: str = "generate",
                    stops: list[int] | None = None) -> None:
    """Sample one response per token-id prompt from a server; on_result(i, row) in this thread. After
    a preemption signal (spinlm.preempt) no further row is waited for: it returns (Preempted while
    a managed server is still starting), and the server is stopped.

    Each row: {"text", "tokens" (count, stop token excluded), "finish": "eos" | "length"}, and
    "ids" (the sampled ids, with the stop token that ended the row) where the server returns them;
    rows arrive in any order. `stops`: the ids that end a response (default: the tokenizer's EOS).
    """
    g = cfg.generation
    require_openai()
    api_key(g.api_key_env)
    if not prompts:
        return
    stops = sorted(set(stops or [tokenizer.eos_token_id]))
    model_path = _served(model_path, cfg)
    with _server(g, model_path) as (url, alive):
        ep = endpoint(url, g.server_model or model_path, g.api_key_env, g.timeout_s, g.retries, alive)
        log.info("sending %d prompts to %s", len(prompts), url)
        bar = progress_bar(len(prompts), desc, progress)
        try:
            _generate_all(ep, tokenizer, prompts, seeds, g, on_result, bar, stops)
        finally:
            bar.close()
        ep.client.close()  # not on an error: requests still in flight are abandoned, not cut off


def _served(model_path: str, cfg: Config) -> str:
    """What a managed server is started on: a Hub model at model.revision becomes the local snapshot of that
    commit (a server command takes a model but not always a revision); otherwise `model_path` itself."""
    if cfg.generation.server_url or not cfg.model.revision or not is_hub_id(model_path):
        return model_path
    return snapshot_dir(model_path, cfg.model.revision)


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
    if preempt.requested():
        return
    pool = ThreadPoolExecutor(max_workers=g.concurrency, thread_name_prefix="spinlm-request")
    try:
        futures = {pool.submit(_complete, endpoint, _prompt(tokenizer, prompts[i], as_text), seeds[i], g, extras): i
                   for i in range(1, len(prompts))}
        for future in as_completed(futures):
            i = futures[future]
            on_result(i, _parse(future.result(), tokenizer, None if as_text else prompts[i], stops))
            bar.update(1)
            if preempt.requested():  # the rows finished are kept; those in flight are abandoned
                return
    finally:
        # Without waiting: on an error or Ctrl-C, queued rows are dropped and in-flight ones abandoned.
        pool.shutdown(wait=False, cancel_futures=True)


def _first_row(endpoint: Endpoint, tokenizer, ids: list[int], seed: int, g: GenerationConfig,
               stops: list[int]) -> tuple[bool, dict]:
    """(whether prompts go as text, the first row's response)."""
    try:
        return False, _complete(endpoint, ids, seed, g, stops)
    except Rejected as e:
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
    """The prompt as sent: its ids, or as text without the leading BOS where the tokenizer adds one by
    default, since a server tokenizes a text prompt with the defaults (vLLM's /v1/completions:
    add_special_tokens true; `transformers serve`: tokenizer(prompt)) and would put a second BOS in front."""
    if not as_text:
        return ids
    if ids[:1] == [tokenizer.bos_token_id] and adds_bos(tokenizer):
        ids = ids[1:]
    return tokenizer.decode(ids, skip_special_tokens=False)


def _complete(endpoint: Endpoint, prompt: list[int] | str, seed: int, g: GenerationConfig,
              stops: list[int] | None = None) -> dict:
    """One completion request (the client retries); the server's answer as a dict. With `stops`,
    vLLM's extras too: sampled ids back, these stop ids, and every other sampling setting neutral (so
    that no generation_config of the checkpoint fills them in)."""
    extra = {"top_k": g.top_k} if g.top_k > 0 else {}  # not in the OpenAI schema: vLLM's and SGLang's
    if stops is not None:
        extra.update(return_token_ids=True, stop_token_ids=stops, top_k=g.top_k if g.top_k > 0 else -1, min_p=0.0,
                     repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0)
    return completion(endpoint, prompt, max_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p,
                      seed=seed, extra_body=extra or None)


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


def preflight(g: GenerationConfig) -> None:
    """What `spinlm validate` can check of a server setup without generating: the API key
    variable, that an unmanaged server answers at all, that a managed command exists; and that the
    openai client is installed."""
    require_openai()
    api_key(g.api_key_env)
    if g.server_url:
        url = base_url(g.server_url)
        try:
            with opener(url).open(url + "/health", timeout=10):
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
