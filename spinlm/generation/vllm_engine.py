"""The vLLM generation backend (`generation.backend: vllm`): a vLLM engine in this process; needs `pip install vllm`.

    spinlm run CONFIG.yaml --generation.backend=vllm --generation.vllm_args='--max-model-len 4096'

A `vllm.LLM` engine is built on the model being generated with (p_t's saved directory), from
`generation.vllm_args`: the engine flags of `vllm serve` (`--tensor-parallel-size`,
`--max-model-len`, `--gpu-memory-utilization`, `--enforce-eager`, ...), parsed by vLLM's own
parser. spinlm adds `--dtype` (model.dtype; auto = bf16 on a GPU that has it, else fp32),
`--seed` (run.seed) and `--generation-config vllm` unless they are given, so the checkpoint's
generation_config never changes sampling; on a machine without CUDA also
`--no-enable-chunked-prefill` (vLLM's CPU build dies at a seeded request whose prompt is
prefilled in parts).

Prompts go in as token ids (spinlm's rendering: `spinlm.tokens.encode_prompt`), each row with
its own `SamplingParams` (its seed, the configured temperature / top_p / top_k, every other
setting neutral, stops on `spinlm.tokens.stop_ids`); the sampled ids and finish reasons come
out. Rows are generated in chunks of `CHUNK_ROWS`, each appended to the stage's row log, so a
killed stage resumes after the last finished chunk; a preemption signal (spinlm.preempt) stops it
between chunks. The engine is shut down (its engine-core process ended, its memory freed) before
the stage returns, so scoring and training get the device back.

Several processes (torchrun), `generation.vllm_layout`:
- `data` (default): each process generates its share of the rows (every world-th row) with an
  engine of its own, on its own GPU (data parallel; a `--tensor-parallel-size` in vllm_args then
  splits each engine further over GPUs the process must be given).
- `tensor`: rank 0 alone builds one engine over every GPU of its node (`--tensor-parallel-size`
  = the processes on the node, unless vllm_args sets it) and generates every row; the other
  processes release their cached device memory and wait (run.dist_timeout_min bounds the wait).
Every process first releases its cached device memory (spinlm.modeling.release_device_memory), so an engine finds
the GPU free of what training left behind. Tested on CPU under torchrun with two processes (both layouts, the
tensor one with `--tensor-parallel-size 1`); not run on GPUs here.

vLLM itself is imported only when an engine is built (`require_vllm()`), so spinlm imports and runs
the other backends where it is not installed.

vLLM starts its engine core with `spawn`, so a script that calls this must guard its entry point
with `if __name__ == "__main__":` (`spinlm` and `python -m spinlm` do).
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
import time
from contextlib import contextmanager

from spinlm import dist, preempt
from spinlm.config import Config
from spinlm.errors import UserError
from spinlm.generation.local import checkpoint_generation_config
from spinlm.io import RowLog, fault_point
from spinlm.modeling import inference_dtype, release_device_memory
from spinlm.tokens import stop_ids

log = logging.getLogger("spinlm")

CHUNK_ROWS = 1024  # rows per engine call: the unit of resumption
# torchrun's variables: an engine of one process must not take itself for a rank of spinlm's group
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                  "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


class VllmBackend:
    """`generation.backend: vllm` (spinlm.generation.Backend): an engine on the model, shut down before returning."""

    needs_local_model = False

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def preflight(self) -> None:
        require_vllm()

    def generate(self, model_path: str, tokenizer, prompts: list[list[int]], seeds: list[int], rowlog: RowLog,
                 desc: str = "generate") -> list[dict]:
        """generate_vllm's rows (`desc` unused: vLLM draws its own progress bar)."""
        release_device_memory()  # the engine needs the device: every process returns its cached memory
        return generate_vllm(model_path, tokenizer, prompts, seeds,
                             stop_ids(tokenizer, checkpoint_generation_config(model_path, self.cfg.model.revision)),
                             self.cfg, rowlog,
                             progress=self.cfg.run.progress and dist.is_main())


def require_vllm():
    """The vllm module, or a UserError saying how to get it."""
    try:
        import vllm
    except ImportError:
        raise UserError("generation.backend is vllm, but vLLM is not installed in this Python environment "
                        f"({sys.executable}): pip install vllm there, or use generation.backend: server with a "
                        "vLLM server started from another environment") from None
    return vllm


def engine_args(model_path: str, cfg: Config):
    """vLLM's EngineArgs for `model_path` from generation.vllm_args plus spinlm's defaults."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    given = shlex.split(cfg.generation.vllm_args or "")
    flags = {a.split("=", 1)[0] for a in given if a.startswith("--")}
    flags |= {"--tensor-parallel-size" for a in given if a == "-tp" or a.startswith("-tp=")}
    if "--model" in flags:
        raise UserError("generation.vllm_args: leave out --model; spinlm builds the engine on the model of each "
                        "iteration")
    defaults = []
    if "--dtype" not in flags:
        defaults += ["--dtype", str(inference_dtype(cfg.model.dtype)).removeprefix("torch.")]
    if "--seed" not in flags:
        defaults += ["--seed", str(cfg.run.seed)]
    if "--generation-config" not in flags:
        defaults += ["--generation-config", "vllm"]
    if not _cuda_count() and not flags & {"--enable-chunked-prefill", "--no-enable-chunked-prefill"}:
        # vLLM's CPU build (0.32) kills its engine at a seeded request whose prompt is prefilled in
        # parts ("CPU Generator does not use offset"), as chunked prefill does once the prompts in
        # flight exceed a step's token budget.
        defaults.append("--no-enable-chunked-prefill")
    if _tensor_layout(cfg) and "--tensor-parallel-size" not in flags:
        defaults += ["--tensor-parallel-size", str(_node_processes())]
    if cfg.model.trust_remote_code and "--trust-remote-code" not in flags:
        defaults.append("--trust-remote-code")
    if cfg.model.revision and "--revision" not in flags:
        defaults += ["--revision", cfg.model.revision]
    parser = EngineArgs.add_cli_args(FlexibleArgumentParser(prog="generation.vllm_args", exit_on_error=False))
    try:
        ns = parser.parse_args(["--model", model_path, *defaults, *given])
    except (SystemExit, Exception) as e:  # argparse reports to stderr and exits on a bad flag
        raise UserError(f"generation.vllm_args: vLLM does not take {cfg.generation.vllm_args!r} ({e})") from None
    return EngineArgs.from_cli_args(ns)


def _tensor_layout(cfg: Config) -> bool:
    return cfg.generation.vllm_layout == "tensor" and dist.world() > 1


def _node_processes() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", dist.world()))


@contextmanager
def _engine_environment(all_devices: bool):
    """Under torchrun: no launcher variables and, unless the engine spans the node
    (`all_devices`), this rank's GPU only, while the engine starts (its engine-core process is
    spawned with this environment)."""
    if dist.world() == 1:
        yield
        return
    saved = dict(os.environ)
    try:
        local = int(os.environ.get("LOCAL_RANK", dist.rank()))
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        devices = visible.split(",") if visible else [str(i) for i in range(_cuda_count())]
        if devices and not all_devices:
            os.environ["CUDA_VISIBLE_DEVICES"] = devices[local % len(devices)]
        for name in _LAUNCHER_VARS:
            os.environ.pop(name, None)
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count()


def sampling_params(cfg: Config, seed: int, stops: list[int]):
    """One row's SamplingParams: the configured sampling, every other setting neutral."""
    from vllm import SamplingParams

    g = cfg.generation
    return SamplingParams(n=1, temperature=g.temperature, top_p=g.top_p, top_k=g.top_k if g.top_k > 0 else -1,
                          min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
                          max_tokens=g.max_new_tokens, seed=seed, stop_token_ids=stops, skip_special_tokens=True)


def generate_vllm(model_path: str, tokenizer, prompts: list[list[int]], seeds: list[int], stops: list[int],
                  cfg: Config, rowlog: RowLog, progress: bool = True) -> list[dict]:
    """Rows in input order ({"text", "tokens", "finish", "ids"} as the local backend's); with several
    processes only this process's share is filled (every world-th row; layout tensor: every row on
    rank 0, none elsewhere), the others stay {}."""
    vllm = require_vllm()
    results: list[dict] = [{}] * len(prompts)
    tensor = _tensor_layout(cfg)
    mine = [i for i in range(len(prompts)) if (dist.is_main() if tensor else i % dist.world() == dist.rank())]
    for i in mine:
        if i in rowlog.done:
            results[i] = rowlog.done[i]
    todo = [i for i in mine if i not in rowlog.done]
    if not todo:
        return results
    args = engine_args(model_path, cfg)
    start = time.monotonic()
    with _engine_environment(all_devices=tensor):
        llm = vllm.LLM.from_engine_args(args)
    log.info("vLLM engine on %s up in %.1f s (vllm %s)", model_path, time.monotonic() - start, vllm.__version__)
    generating, tokens = 0.0, 0
    try:
        for first in range(0, len(todo), CHUNK_ROWS):
            if preempt.requested():  # finished chunks are kept; the stage stops every process together
                break
            chunk = todo[first : first + CHUNK_ROWS]
            began = time.monotonic()
            outputs = llm.generate([{"prompt_token_ids": prompts[i]} for i in chunk],
                                   [sampling_params(cfg, seeds[i], stops) for i in chunk], use_tqdm=progress)
            generating += time.monotonic() - began
            for i, out in zip(chunk, outputs):
                if list(out.prompt_token_ids) != list(prompts[i]):
                    raise UserError(f"vLLM generated from other prompt ids than spinlm passed (row {i})")
                results[i] = _row(tokenizer, out.outputs[0], stops)
            tokens += sum(len(results[i]["ids"]) for i in chunk)
            rowlog.add([(i, results[i]) for i in chunk])
            fault_point("generate-batch")
    finally:
        shutdown(llm)
        del llm
        release_device_memory()
    log.info("vLLM generated %d rows, %d tokens in %.2f s; engine shut down", sum(bool(results[i]) for i in todo),
             tokens, generating)
    return results


def _row(tokenizer, completion, stops: list[int]) -> dict:
    ids = [int(t) for t in completion.token_ids]
    finish = "length" if completion.finish_reason == "length" else "eos"
    ended = finish == "eos" and bool(ids) and ids[-1] in stops
    body = ids[:-1] if ended else ids
    return {"text": tokenizer.decode(body, skip_special_tokens=True), "tokens": len(body), "finish": finish,
            "ids": ids}


def shutdown(llm) -> None:
    """End the engine-core process (it holds the weights and the KV cache)."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None:
        core.shutdown()


