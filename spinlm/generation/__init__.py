"""Generation backends: who samples the generate stage's responses (`generation.backend`).

- local (spinlm.generation.local): transformers `generate` in this process, the model loaded here;
- server (spinlm.generation.server): an OpenAI-compatible server, running already or started and
  stopped by spinlm (spinlm.generation.process), reached through spinlm.generation.client;
- vllm (spinlm.generation.vllm_engine): a vLLM engine in this process.

`backend_for(cfg)` is the one place that picks a backend by the name in `generation.backend`;
the stage (spinlm.stages.generate), `spinlm validate` and the memory estimate ask the backend it
returns, never the name. Every backend samples each row from its own seed, fills a `RowLog` as
rows finish and skips the rows it already holds, and returns the rows in input order.
"""

from __future__ import annotations

from typing import Protocol

from spinlm.config import Config
from spinlm.errors import UserError
from spinlm.io import RowLog


class Backend(Protocol):
    """A generation backend, bound to the run's config by `backend_for`."""

    # Whether generation loads the model into this process with transformers (its weights and KV
    # cache count in this process's memory); an engine or a server holds memory of its own.
    needs_local_model: bool

    def preflight(self) -> None:
        """What `spinlm validate` can check without generating (packages, a server's reachability)."""

    def generate(self, model_path: str, tokenizer, prompts: list[list[int]], seeds: list[int], rowlog: RowLog,
                 desc: str = "generate") -> list[dict]:
        """One response per token-id prompt, sampled with `model_path` and the row's seed, in input order:
        {"text", "tokens" (count, stop token excluded), "finish": "eos" | "length"}, and "ids" (the sampled
        ids, with the stop token that ended the row) where the backend has them. Rows `rowlog` holds are
        not generated again; each finished one is added to it. Under several processes a row another
        process generates is {} (`spinlm.generation.local.gather_rows` merges them)."""


def backend_for(cfg: Config) -> Backend:
    """The backend `cfg.generation.backend` names, bound to `cfg`."""
    name = cfg.generation.backend
    # Imported here, not at the top: importing any module of this package (the judge imports the
    # client) runs this file, and must not pull in torch and transformers with the local backend.
    if name == "local":
        from spinlm.generation.local import LocalBackend

        return LocalBackend(cfg)
    if name == "server":
        from spinlm.generation.server import ServerBackend

        return ServerBackend(cfg)
    if name == "vllm":
        from spinlm.generation.vllm_engine import VllmBackend

        return VllmBackend(cfg)
    raise UserError(f"generation.backend must be one of local, server, vllm; got {name!r}")
