"""Prefix-shared, padding-free log-probs: one forward per micro-batch, each prompt once.

A group is a prompt with one or more responses (a SPIN pair: [prompt | real | generated]).
Each group is laid out as one token run whose responses restart their position ids at the
end of the prompt and attend to the prompt and to themselves only, never to each other
(the prefix-sharing idea of arXiv 2410.20305). Groups are packed into rows of at most
`budget` tokens (first-fit decreasing) with a block-diagonal mask, so almost no padding
is computed. Logits are computed only at positions that predict a response token: transformers
versions whose models take a boolean `logits_to_keep` (`slice_logits_to_keep`, 5.21 on) select them
in the model's forward; on older ones (vLLM pins such versions) a pre-hook on the output layer
selects its input, so the rest of the forward (DDP's bookkeeping, LoRA, logit soft-capping) is
unchanged either way.

The mask is 4D and additive (0 allowed, dtype-min blocked): transformers uses such a mask
as given for sdpa and eager attention, and with explicit position_ids the log-probs equal
separate per-sequence forwards (tests: Llama, Qwen2, Mistral, Gemma, sdpa and eager).
Models where that does not hold (sliding-window layers, kernels that ignore custom masks)
are caught by `packing_matches_plain` and run on the plain padded path instead.

Scoring (no gradients, `score_groups`) packs a whole chunk of groups into such rows, groups of one
prompt merged into one (`shared_prompts`), and runs as many rows a forward as `Layout.score_tokens` allows.

Identical responses of one group (a dead pair: the sample equals the real response; T-SPIN's y0
equal to either) are laid out and computed once, and each copy gets that one log-prob tensor: the
same function of the weights, so the values and gradients are those of separate copies, without
their tokens in the forward.
"""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from spinlm.logprobs import chunked_target_logps, sequence_logps

log = logging.getLogger("spinlm")
Group = tuple[list[int], list[list[int]]]  # (prompt ids, [response ids, ...])
PLAIN_ATTENTION = ("flash_attention_2", "flash_attention_3", "flex_attention")
_warned: set = set()  # (model type, attention) pairs already reported in this process


def _warn_once(model, message: str, *args) -> None:
    key = (model.config.model_type, getattr(model.config, "_attn_implementation", None))
    if key not in _warned:
        _warned.add(key)
        log.warning(message, *args)


def distinct(responses: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    """The group's distinct responses (first occurrences, in order), and for each response the
    index of its distinct copy."""
    first: dict[tuple[int, ...], int] = {}
    for r in responses:
        first.setdefault(tuple(r), len(first))
    return [list(r) for r in first], [first[tuple(r)] for r in responses]


def group_length(group: Group) -> int:
    """Tokens the group takes in a packed row (each distinct response once)."""
    prompt, responses = group
    return len(prompt) + sum(len(r) for r in distinct(responses)[0])


def pack(groups: list[Group], budget: int) -> list[list[int]]:
    """Group indices per row, rows of <= budget tokens (a longer group gets a row of its own).
    First-fit decreasing decides how many rows; the groups are then spread over that many rows,
    longest first onto the emptiest, when that makes the longest row shorter: rows are padded to
    the longest, and first-fit leaves its last row nearly empty (the demo's SFT batches: 1006
    tokens computed for 786 before, 790 after)."""
    lengths = [group_length(g) for g in groups]
    order = sorted(range(len(groups)), key=lambda i: lengths[i], reverse=True)
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        slot = next((k for k, free in enumerate(room) if free >= lengths[i]), None)
        if slot is None:
            rows.append([i])
            room.append(budget - lengths[i])
        else:
            rows[slot].append(i)
            room[slot] -= lengths[i]
    spread: list[list[int]] = [[] for _ in rows]
    load = [0] * len(rows)
    for i in order:
        k = min(range(len(rows)), key=load.__getitem__)
        spread[k].append(i)
        load[k] += lengths[i]
    fits = all(n <= budget or len(row) == 1 for n, row in zip(load, spread))
    return spread if fits and max(load, default=0) < budget - min(room, default=0) else rows


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # (rows, L)
    position_ids: torch.Tensor  # (rows, L)
    segment: torch.Tensor  # (rows, L): group slot within the row, -1 for padding
    part: torch.Tensor  # (rows, L): 0 prompt, k = k-th response, -1 padding
    keep: torch.Tensor  # (rows, L) bool: positions whose logits are needed
    # per group: per response (kept-logit index, token ids); identical responses share one entry
    targets: list[list[tuple[torch.Tensor, torch.Tensor]]]


@dataclass(frozen=True)
class Layout:
    """How log-probs are computed for a model (from `prepare`): packed rows of at most `budget` tokens, and the
    output layer in chunks of `logits_chunk_mb` float32 logits (`chunk_logits`: auto = only when a forward's
    kept logits would exceed one chunk, always, never). Scoring (no gradients) puts as many rows in one forward
    as fit in `score_tokens` tokens, padding included."""

    budget: int
    chunk_logits: str = "auto"
    logits_chunk_mb: float = 256.0
    score_tokens: int = 2048


def _lay_row(groups: list[Group]):
    """Flat token ids, positions, labels, and for each response token the position predicting it
    (`groups` with their distinct responses only: `build` removes the copies)."""
    ids, pos, seg, part, sources = [], [], [], [], []
    for g, (prompt, responses) in enumerate(groups):
        end_of_prompt = len(ids) + len(prompt) - 1
        ids += prompt
        pos += range(len(prompt))
        seg += [g] * len(prompt)
        part += [0] * len(prompt)
        for k, response in enumerate(responses, start=1):
            first = len(ids)
            ids += response
            pos += range(len(prompt), len(prompt) + len(response))
            seg += [g] * len(response)
            part += [k] * len(response)
            # token 0 is predicted by the prompt's last position, token j by position j-1 of this response
            sources.append(([end_of_prompt] + list(range(first, first + len(response) - 1)))[: len(response)])
    return ids, pos, seg, part, sources


def build(groups: list[Group], budget: int, pad_id: int, rows: list[list[int]] | None = None) -> PackedBatch:
    """Pack `groups` into rows (or lay them out as `rows` says: group indices per row); targets come back in the
    order of `groups`."""
    copies = [distinct(responses) for _, responses in groups]  # each distinct response is laid out once
    groups = [(prompt, unique) for (prompt, _), (unique, _) in zip(groups, copies)]
    rows = pack(groups, budget) if rows is None else rows
    laid = [_lay_row([groups[i] for i in members]) for members in rows]
    width = max(len(ids) for ids, *_ in laid)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    segment = torch.full(shape, -1, dtype=torch.long)
    part = torch.full(shape, -1, dtype=torch.long)
    keep = torch.zeros(shape, dtype=torch.bool)
    for r, (ids, pos, seg, prt, sources) in enumerate(laid):
        n = len(ids)
        input_ids[r, :n], position_ids[r, :n] = torch.tensor(ids), torch.tensor(pos)
        segment[r, :n], part[r, :n] = torch.tensor(seg), torch.tensor(prt)
        for src in sources:
            keep[r, src] = True
    kept_index = (torch.cumsum(keep.flatten().long(), 0) - 1).view(shape)  # row-major, as mask indexing is
    targets: list = [None] * len(groups)
    for r, members in enumerate(rows):
        sources = iter(laid[r][4])
        for i in members:
            laid_out = [(kept_index[r, torch.tensor(next(sources), dtype=torch.long)],
                         torch.tensor(resp, dtype=torch.long))
                        for resp in groups[i][1]]
            targets[i] = [laid_out[k] for k in copies[i][1]]
    return PackedBatch(input_ids, position_ids, segment, part, keep, targets)


def attention_bias(batch: PackedBatch, dtype: torch.dtype) -> torch.Tensor:
    """(rows, 1, L, L) additive mask: causal, within a group, responses blind to each other.
    Padding positions attend to themselves only (their outputs are never used)."""
    seg, part = batch.segment, batch.part
    width = seg.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same_group = seg[:, :, None] == seg[:, None, :]
    visible = (part[:, None, :] == 0) | (part[:, :, None] == part[:, None, :])
    allowed = causal & same_group & visible & (seg[:, :, None] >= 0)
    allowed |= torch.eye(width, dtype=torch.bool)
    bias = torch.zeros(allowed.shape, dtype=dtype)
    bias.masked_fill_(~allowed, torch.finfo(dtype).min)
    return bias[:, None]


def _inner(model):
    """The transformers model inside DDP / DeepSpeed (`.module`) and PEFT (`get_base_model`) wrappers."""
    while True:
        if isinstance(getattr(model, "module", None), torch.nn.Module):
            model = model.module
        elif callable(getattr(model, "get_base_model", None)):
            model = model.get_base_model()
        else:
            return model


def takes_bool_logits_to_keep(model) -> bool:
    """Whether the model's forward selects logits with a boolean (rows, L) `logits_to_keep`: its
    module uses transformers' `slice_logits_to_keep` (5.21 on). Older versions slice
    `hidden[:, logits_to_keep, :]`, which fails on a 2-D mask."""
    forward_owner = next((c for c in type(_inner(model)).__mro__ if "forward" in c.__dict__), None)
    module = sys.modules.get(getattr(forward_owner, "__module__", ""))
    return getattr(module, "slice_logits_to_keep", None) is not None


def can_pack(model) -> bool:
    """Kept logits can be selected: natively, or on the input of the output layer."""
    return takes_bool_logits_to_keep(model) or isinstance(_inner(model).get_output_embeddings(), torch.nn.Module)


@contextmanager
def _select_head_input(model, keep: torch.Tensor):
    """Feed the output layer only the kept positions: (rows, L, hidden) -> (n_kept, hidden)."""
    head = _inner(model).get_output_embeddings()
    handle = head.register_forward_pre_hook(lambda module, args: (args[0][keep], *args[1:]))
    try:
        yield
    finally:
        handle.remove()


def packed_logps(model, groups: list[Group], budget: int, pad_id: int, native: bool | None = None,
                 chunk_rows: int | None = None, rows: list[list[int]] | None = None
                 ) -> list[list[tuple[torch.Tensor, int]]]:
    """Per group, per response: (summed log-prob as a 0-dim tensor, token count); one forward.
    `native`: select kept logits in the model's forward (default: where it can). `chunk_rows`: compute the
    output layer and log-softmax that many kept positions at a time, recomputed in backward, so no
    (kept positions x vocabulary) tensor exists (None: all at once). `rows`: the rows already packed (group
    indices per row), as `score_plan` packs them."""
    dev = next(model.parameters()).device
    batch = build(groups, budget, pad_id, rows)
    bias = attention_bias(batch, next(model.parameters()).dtype).to(dev)
    keep = batch.keep.to(dev)
    inputs = dict(input_ids=batch.input_ids.to(dev), position_ids=batch.position_ids.to(dev), attention_mask=bias,
                  use_cache=False)
    # One gather for every response token and one segment sum: indexing the logits once per
    # response would make each response's backward a dense (n_kept, vocab) gradient
    # (gigabytes at a 128k vocabulary). A response laid out once (identical copies in a group)
    # is one segment, summed once.
    slot: dict[int, int] = {}
    index, tokens = [], []
    for per_response in batch.targets:
        for idx, tok in per_response:
            if id(idx) not in slot:
                slot[id(idx)] = len(index)
                index.append(idx)
                tokens.append(tok)
    flat_index, flat_tokens = torch.cat(index).to(dev), torch.cat(tokens).to(dev)
    if native is None:
        native = takes_bool_logits_to_keep(model)
    with _head_gives_target_logps(model, flat_index, flat_tokens, chunk_rows):
        if native:
            out = model(**inputs, logits_to_keep=keep).logits
        else:
            with _select_head_input(model, keep):
                out = model(**inputs).logits
    if chunk_rows:
        per_token = out.reshape(-1)  # (n_targets,): the output layer gave the target log-probs
    else:
        logits = out.float()  # (n_kept, vocab)
        per_token = logits[flat_index, flat_tokens] - torch.logsumexp(logits, dim=-1)[flat_index]
    lengths = torch.tensor([len(t) for t in tokens], device=dev)
    owner = torch.repeat_interleave(torch.arange(len(index), device=dev), lengths)
    sums = torch.zeros(len(index), device=dev, dtype=per_token.dtype).index_add(0, owner, per_token).unbind()
    return [[(sums[slot[id(idx)]], len(tok)) for idx, tok in per_response] for per_response in batch.targets]


@contextmanager
def _head_gives_target_logps(model, index: torch.Tensor, targets: torch.Tensor, chunk_rows: int | None):
    """With chunk_rows, the output layer's forward returns the log-probs of `targets` at its input positions
    `index` (chunked_target_logps) instead of logits. It runs inside the layer's own call, so wrappers' hooks
    (FSDP's unshard, DDP, DeepSpeed's gather) see an ordinary forward of that layer."""
    if not chunk_rows:
        yield
        return
    head = _inner(model).get_output_embeddings()
    head.forward = lambda hidden: chunked_target_logps(hidden.reshape(-1, hidden.shape[-1]), head.weight, head.bias,
                                                       index, targets, chunk_rows)
    try:
        yield
    finally:
        del head.forward


def chunk_rows_for(model, n_kept: int, layout: Layout) -> int | None:
    """How many kept positions' logits to compute at a time, or None for all at once (layout.chunk_logits).
    Only a plain linear output layer whose logits the model does not transform afterwards can be chunked."""
    if layout.chunk_logits == "never" or not chunk_logits_possible(model):
        return None
    # out_features, not weight.shape: under ZeRO-3 a partitioned weight is an empty tensor outside the layer's forward
    vocab = _inner(model).get_output_embeddings().out_features
    rows = max(1, int(layout.logits_chunk_mb * 2**20 // (4 * vocab)))
    return rows if layout.chunk_logits == "always" or n_kept > rows else None


def chunk_logits_possible(model) -> bool:
    """The output layer is an nn.Linear (FSDP's and DeepSpeed's wrapping keep that; a LoRA layer is not) and the
    model does not soft-cap or scale its logits after it (Gemma-2, Cohere, Granite do)."""
    head = _inner(model).get_output_embeddings()
    cfg = getattr(model, "config", None)
    transformed = any(getattr(cfg, name, None) not in (None, 1, 1.0) for name in
                      ("final_logit_softcapping", "logit_scale", "logits_scaling"))
    return isinstance(head, torch.nn.Linear) and not transformed


def plain_logps(model, groups: list[Group], pad_id: int) -> list[list[tuple[torch.Tensor, int]]]:
    """The same result from one right-padded forward per (prompt, distinct response) sequence."""
    copies = [distinct(responses) for _, responses in groups]
    seqs = [(prompt, response) for (prompt, _), (unique, _) in zip(groups, copies) for response in unique]
    sums, counts = sequence_logps(model, seqs, pad_id)
    out, k = [], 0
    for unique, copy_of in copies:
        out.append([(sums[k + j], int(counts[k + j])) for j in copy_of])
        k += len(unique)
    return out


def response_logps(model, groups: list[Group], pad_id: int, layout: Layout | None,
                   rows: list[list[int]] | None = None):
    """Packed rows as `layout` says (a layout from `prepare`; `rows`: already packed), or plain padded sequences
    if None."""
    if layout:
        kept = sum(len(r) for _, responses in groups for r in distinct(responses)[0])
        return packed_logps(model, groups, layout.budget, pad_id, chunk_rows=chunk_rows_for(model, kept, layout),
                            rows=rows)
    return plain_logps(model, groups, pad_id)


@torch.no_grad()
def enable_packing(model, groups: list[Group], pad_id: int, budget: int, tolerance: float | None = None,
                   chunk_rows: int | None = None) -> bool:
    """Check once, on a few real groups, that packed log-probs (with the output layer in chunks of
    `chunk_rows` positions, if given) equal the plain ones for this model. Says so once in the log if not."""
    return _probe(model, groups, pad_id, budget, [chunk_rows], tolerance)[0]


@torch.no_grad()  # values only: with gradients every variant's activations stayed alive until the last compared
def _probe(model, groups: list[Group], pad_id: int, budget: int, variants: list[int | None],
           tolerance: float | None = None) -> list[bool]:
    """For each variant (chunk_rows of the output layer, None = whole): do packed log-probs on the first
    groups equal the plain computation (one plain forward for all variants, eval mode, no gradients)?"""
    attn = getattr(model.config, "_attn_implementation", None)
    if attn in PLAIN_ATTENTION or not groups or not can_pack(model):
        if groups and attn in PLAIN_ATTENTION:
            _warn_once(model, "packing: attention '%s' does not take custom masks; using the plain padded path", attn)
        elif groups:
            _warn_once(model, "packing: %s has no output layer to select kept positions on; using the plain padded "
                       "path", model.config.model_type)
        return [False] * len(variants)
    fp32 = next(model.parameters()).dtype == torch.float32
    tol = tolerance if tolerance is not None else (1e-3 if fp32 else 5e-2)
    sample, was_training = groups[:4], model.training
    model.eval()
    plain = plain_logps(model, sample, pad_id)
    oks = []
    for chunk_rows in variants:
        packed = packed_logps(model, sample, budget, pad_id, chunk_rows=chunk_rows)
        worst = max(abs(a.item() - b.item()) / max(n, 1) for ga, gb in zip(packed, plain)
                    for (a, n), (b, _) in zip(ga, gb))
        oks.append(worst <= tol)
        if worst > tol:
            _warn_once(model, "packing: %s gives %.3g nats/token difference from the plain computation "
                       "(tolerance %g)%s; using the %s path for this model", model.config.model_type, worst, tol,
                       " with the output layer in chunks" if chunk_rows else "",
                       "unchunked packed" if chunk_rows else "plain padded")
    model.train(was_training)
    return oks


def shared_prompts(groups: list[Group], budget: int) -> list[list[int]]:
    """Indices of the groups to compute as one, in order of first appearance: groups of identical prompt ids
    (a mix window's files hold each prompt, with its real response, once per iteration; `build` lays the real
    response out once). A merged group grows to at most max(budget, twice its first group's length) tokens:
    a prompt repeated many times would otherwise make one row whose attention grows as its square."""
    units: list[list[int]] = []
    open_unit: dict[tuple[int, ...], int] = {}
    for i, (prompt, responses) in enumerate(groups):
        u = open_unit.get(tuple(prompt))
        if u is not None:
            grown = group_length((prompt, [r for j in units[u] for r in groups[j][1]] + responses))
            if grown <= max(budget, 2 * group_length(groups[units[u][0]])):
                units[u].append(i)
                continue
        open_unit[tuple(prompt)] = len(units)
        units.append([i])
    return units


def score_plan(groups: list[Group], layout: Layout | None, batch_size: int):
    """How `score_groups` computes `groups`: (merged groups, the group indices each one answers for, forwards),
    a forward being (merged group indices, its rows as positions in that list; None on the plain path).
    Packed: the merged groups are packed into balanced rows of layout.budget tokens, as training's are (not
    longer: a row's attention costs its length squared, the mask being dense), longest first, and one forward
    takes as many rows as fit in layout.score_tokens tokens, padding included (no activations are kept without
    gradients). Plain: batch_size groups a forward, longest first."""
    units = shared_prompts(groups, layout.budget if layout else 0)
    merged = [(groups[u[0]][0], [r for i in u for r in groups[i][1]]) for u in units]
    lengths = [group_length(g) for g in merged]
    if not layout:
        order = sorted(range(len(merged)), key=lengths.__getitem__, reverse=True)
        return merged, units, [(order[s:s + batch_size], None) for s in range(0, len(order), batch_size)]
    rows = sorted(pack(merged, layout.budget), key=lambda row: sum(lengths[k] for k in row), reverse=True)
    plan: list[tuple[list[int], list[list[int]]]] = []
    width = 0  # of the forward's first row, its longest
    for row in rows:
        if plan and (len(plan[-1][1]) + 1) * width <= layout.score_tokens:
            members, laid = plan[-1]
        else:
            members, laid, width = [], [], sum(lengths[k] for k in row)
            plan.append((members, laid))
        laid.append(list(range(len(members), len(members) + len(row))))
        members.extend(row)
    return merged, units, plan


@torch.no_grad()
def score_groups(model, groups: list[Group], pad_id: int, layout: Layout | None, batch_size: int,
                 progress=None, planned=None) -> list[list[tuple[float, int]]]:
    """Summed log-probs and counts of every response, in input order, in the forwards of `score_plan` (groups of
    one prompt computed as one, each distinct response of it once); `planned`: that plan, if already made."""
    merged, units, plan = planned or score_plan(groups, layout, batch_size)
    out: list = [None] * len(groups)
    for members, rows in plan:
        results = response_logps(model, [merged[k] for k in members], pad_id, layout, rows)
        for k, res in zip(members, results):
            values = iter([(s.item(), n) for s, n in res])
            for i in units[k]:
                out[i] = [next(values) for _ in groups[i][1]]
            if progress is not None:
                progress.update(len(units[k]))
    return out


def prepare(model, groups: list[Group], pad_id: int, packing_cfg) -> Layout | None:
    """How to compute log-probs with this model: None (plain path) unless packing is enabled and verified
    equal to the plain computation on the first groups; chunked output-layer computation kept only if it
    is verified too (on chunks of 3 positions, so that several chunks run)."""
    if not packing_cfg.enabled:
        return None
    chunkable = packing_cfg.chunk_logits != "never" and chunk_logits_possible(model)
    oks = _probe(model, groups[:4], pad_id, packing_cfg.max_tokens, [None, 3] if chunkable else [None])
    if not oks[0]:
        return None
    chunk = packing_cfg.chunk_logits if chunkable and oks[-1] else "never"
    return Layout(packing_cfg.max_tokens, chunk, packing_cfg.logits_chunk_mb, packing_cfg.score_max_tokens)
