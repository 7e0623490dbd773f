"""The local generation backend (`generation.backend: local`, the default): transformers `generate`
in this process, one seeded sampler per row. Its `generate` also answers for evaluation
(spinlm.metrics) and `spinlm judge`.

Batches are sorted by prompt length and left-padded; the KV cache is on. Sampling uses
only the configured settings (never the checkpoint's generation defaults), and each row
draws from its own seeded generator, so a row's sample does not depend on which other
rows share its batch. Each row records whether it ended at EOS or hit max_new_tokens.
Several processes (torchrun): each generates every world-th batch with a model of its own, and
`gather_rows` brings the rows back together.

Also the helpers every backend's rows go through: `row_seed` (a row's seed), `gather_rows`, and
`checkpoint_generation_config` (a checkpoint's eos ids, for the stop ids of the other backends).
"""

from __future__ import annotations

import hashlib

import torch
from transformers import GenerationConfig as HFGenerationConfig
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from spinlm import dist, preempt
from spinlm.config import Config
from spinlm.io import RowLog, fault_point
from spinlm.modeling import load_model
from spinlm.progress import bar as progress_bar
from spinlm.tokens import stop_ids


class LocalBackend:
    """`generation.backend: local` (spinlm.generation.Backend): loads the model here and generates with it."""

    needs_local_model = True

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def preflight(self) -> None:
        pass  # it needs only the model and tokenizer, which validate checks anyway

    def generate(self, model_path: str, tokenizer, prompts: list[list[int]], seeds: list[int], rowlog: RowLog,
                 desc: str = "generate") -> list[dict]:
        """Rows in input order; this process's batches only (every world-th), the others stay {}."""
        cfg, g = self.cfg, self.cfg.generation
        model = load_model(model_path, cfg.model).eval()
        return generate(model, tokenizer, prompts, max_new_tokens=g.max_new_tokens, batch_size=g.batch_size,
                        batch_tokens=g.batch_tokens, seeds=seeds, temperature=g.temperature, top_p=g.top_p,
                        top_k=g.top_k, progress=cfg.run.progress and dist.is_main(), desc=desc,
                        rowlog=rowlog, shard=(dist.rank(), dist.world()))


def row_seed(seed: int, iteration: int, example_id: str) -> int:
    """A seed per (run seed, iteration, row): stable across processes and batchings."""
    digest = hashlib.sha256(f"{seed}:{iteration}:{example_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class _PerRowSampler(LogitsProcessor):
    """Samples each row with its own torch.Generator and forces that token.

    Runs after the temperature/top-k/top-p warpers inside a greedy `generate`, so the
    argmax picks exactly the sampled token.
    """

    def __init__(self, seeds: list[int], device: torch.device):
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = torch.softmax(scores.float(), dim=-1)  # (batch, vocab)
        picks = torch.stack([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, self.generators)])
        forced = torch.full_like(scores, float("-inf"))
        return forced.scatter_(1, picks, 0.0)


def _processors(seeds, temperature, top_k, top_p, device) -> LogitsProcessorList:
    steps = []
    if temperature != 1.0:
        steps.append(TemperatureLogitsWarper(temperature))
    if top_k > 0:
        steps.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        steps.append(TopPLogitsWarper(top_p))
    return LogitsProcessorList(steps + [_PerRowSampler(seeds, device)])


def length_batches(lengths: list[int], max_new_tokens: int, batch_size: int, batch_tokens: int) -> list[list[int]]:
    """Indices, longest prompts first, in batches of at most `batch_size` rows whose padded
    size rows x (longest prompt + max_new_tokens) stays within `batch_tokens`."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    batches: list[list[int]] = []
    for i in order:
        if batches:
            rows = len(batches[-1]) + 1
            width = lengths[batches[-1][0]] + max_new_tokens  # the first row is the batch's longest
            if rows <= batch_size and rows * width <= batch_tokens:
                batches[-1].append(i)
                continue
        batches.append([i])
    return batches


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, batch_size: int,
             batch_tokens: int | None = None, seeds: list[int] | None = None, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, progress: bool = True, desc: str = "generate",
             rowlog: RowLog | None = None, shard: tuple[int, int] = (0, 1), synced: bool = False) -> list[dict]:
    """Responses for token-id prompts, in input order; greedy when `seeds` is None.

    Each result: {"text", "tokens" (count, stop token excluded), "finish": "eos" | "length", "ids": the
    sampled token ids themselves, with the stop token that ended the response (re-encoding the text
    need not give them back)}. Generation stops on `spinlm.tokens.stop_ids`: the chat template's
    turn end, the EOS and the checkpoint's eos ids.
    With a `rowlog`, each finished batch is appended to it durably and batches it already
    holds are not generated again (the batches are the same on every attempt); after a
    preemption signal (spinlm.preempt) no further batch starts (the rows left stay {}). With
    `shard=(rank, world)` only every world-th batch is generated; the other rows stay {}.
    `synced`: a model sharded over the processes (FSDP), which all generate every batch together
    (each forward gathers the weights), stepping on until the last process is done.
    """
    dev = next(model.parameters()).device
    eos = stop_ids(tokenizer, model.generation_config)
    gen_config = HFGenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos,
                                    pad_token_id=tokenizer.pad_token_id, num_beams=1)
    model.generation_config = gen_config  # drop checkpoint defaults (top_k, repetition penalty, ...)
    batches = length_batches([len(p) for p in prompts], max_new_tokens, batch_size, batch_tokens or 1 << 62)
    results: list[dict] = [{}] * len(prompts)
    bar = progress_bar(len(prompts), desc, progress)
    for b, idx in enumerate(batches):
        if b % shard[1] != shard[0]:
            continue
        if rowlog is not None and not synced and preempt.requested():  # the stage stops every process together
            break
        if rowlog is not None and all(i in rowlog.done for i in idx):
            for i in idx:
                results[i] = rowlog.done[i]
            bar.update(len(idx))
            continue
        width = max(len(prompts[i]) for i in idx)
        input_ids = torch.full((len(idx), width), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, i in enumerate(idx):  # left padding: every prompt ends where generation starts
            input_ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
            attention_mask[row, width - len(prompts[i]):] = 1
        processors = None if seeds is None else _processors([seeds[i] for i in idx], temperature, top_k, top_p, dev)
        out = model.generate(input_ids=input_ids.to(dev), attention_mask=attention_mask.to(dev),
                             generation_config=gen_config, logits_processor=processors, synced_gpus=synced)
        for row, i in enumerate(idx):
            results[i] = _decode(tokenizer, out[row, width:].tolist(), eos)
        if rowlog is not None:
            rowlog.add([(i, results[i]) for i in idx])
            fault_point("generate-batch")
        bar.update(len(idx))
    bar.close()
    return results


def _decode(tokenizer, ids: list[int], eos: list[int]) -> dict:
    stop = next((k for k, t in enumerate(ids) if t in eos), None)
    body = ids if stop is None else ids[:stop]
    return {"text": tokenizer.decode(body, skip_special_tokens=True), "tokens": len(body),
            "finish": "length" if stop is None else "eos", "ids": ids if stop is None else ids[: stop + 1]}


def checkpoint_generation_config(model_path: str, revision: str | None = None):
    """The checkpoint's generation_config (for its eos ids only; a Hub model's at `revision`), or None where it
    has none."""
    try:
        return HFGenerationConfig.from_pretrained(model_path, revision=revision)
    except OSError:
        return None


def gather_rows(results: list[dict]) -> list[dict]:
    """Every process's finished rows, back in input order (one process: unchanged)."""
    if dist.world() == 1:
        return results
    merged = dict(dist.gather([(i, r) for i, r in enumerate(results) if r]))
    return [merged[i] for i in range(len(results))]
