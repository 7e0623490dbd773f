"""Packed, prefix-shared log-probs equal the plain per-sequence computation."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config, GemmaConfig, LlamaConfig, MistralConfig, Qwen2Config

from spinlm.config import Config
from spinlm.logprobs import chunked_target_logps
from spinlm.packing import (
    Layout,
    attention_bias,
    build,
    chunk_logits_possible,
    chunk_rows_for,
    enable_packing,
    group_length,
    pack,
    packed_logps,
    plain_logps,
    prepare,
    score_groups,
    score_plan,
    shared_prompts,
    takes_bool_logits_to_keep,
)

COMMON = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=2, eos_token_id=1)
ARCHS = {"llama": lambda: LlamaConfig(**COMMON), "qwen2": lambda: Qwen2Config(**COMMON),
         "mistral": lambda: MistralConfig(**COMMON), "gemma": lambda: GemmaConfig(head_dim=8, **COMMON)}


def _groups(seed=0, shapes=((3, 5, 7), (10, 1, 4), (1, 2, 2), (20, 9, 3), (6, 6, 6), (30, 30, 30))):
    g = torch.Generator().manual_seed(seed)

    def r(n):
        return torch.randint(5, 250, (n,), generator=g).tolist()

    return [(r(p), [r(a), r(b)]) for p, a, b in shapes]


def _unpacked_reference(model, prompt, response) -> float:
    """Independent computation: one unpadded sequence, full log-softmax, sum over the response."""
    logits = model(input_ids=torch.tensor([prompt + response])).logits[0].double()
    logps = torch.log_softmax(logits, -1)
    return sum(logps[len(prompt) - 1 + k, t].item() for k, t in enumerate(response))


# native=None: kept logits selected as this transformers version can (a boolean logits_to_keep from 5.21 on);
# native=False: always by the output layer's pre-hook, the path older versions (vLLM's pins) take.
# chunk_rows=3: the output layer and log-softmax three kept positions at a time (packing.chunk_logits).
@pytest.mark.parametrize("chunk_rows", [None, 3], ids=["whole", "chunked"])
@pytest.mark.parametrize("native", [None, False], ids=["auto", "head-hook"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_packed_equals_unpacked_reference(arch, attn, native, chunk_rows):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(ARCHS[arch](), attn_implementation=attn).eval()
    groups = _groups()
    with torch.no_grad():
        # several rows and groups a row
        packed = packed_logps(model, groups, budget=40, pad_id=0, native=native, chunk_rows=chunk_rows)
        for (prompt, responses), got in zip(groups, packed):
            for response, (value, count) in zip(responses, got):
                assert count == len(response)
                assert value.item() == pytest.approx(_unpacked_reference(model, prompt, response), abs=1e-4)


@pytest.mark.parametrize("chunk_rows", [None, 1, 7], ids=["whole", "chunks-of-1", "chunks-of-7"])
@pytest.mark.parametrize("native", [None, False], ids=["auto", "head-hook"])
def test_packing_gradients_equal_plain(native, chunk_rows):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(ARCHS["llama"]())
    groups = _groups(1)
    grads = []
    for fn in (lambda: packed_logps(model, groups, 64, 0, native=native, chunk_rows=chunk_rows),
               lambda: plain_logps(model, groups, 0)):
        model.zero_grad()
        total = sum(v * (k + 1) for per in fn() for k, (v, _) in enumerate(per))
        total.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-4, rtol=1e-4)


def test_layout_positions_and_mask():
    groups = [([11, 12], [[21, 22, 23], [31]]), ([41], [[51, 52]])]
    batch = build(groups, budget=100, pad_id=0)
    assert batch.input_ids.tolist() == [[11, 12, 21, 22, 23, 31, 41, 51, 52]]
    # responses restart at the end of their prompt; the second group restarts at 0
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 2, 0, 1, 2]]
    allowed = attention_bias(batch, torch.float32)[0, 0] == 0
    assert allowed[5, :2].all() and not allowed[5, 2:5].any()  # generated sees prompt, not real
    assert allowed[4, :5].all() and not allowed[4, 5:].any()  # real sees prompt and itself, causally
    assert not allowed[6, :6].any() and allowed[8, 6:9].all()  # second group sees nothing of the first
    # kept logits: last prompt position predicts both responses' first tokens
    assert batch.keep.tolist() == [[False, True, True, True, False, False, True, True, False]]


def test_identical_responses_are_laid_out_once():
    # a dead pair (generated == real) and a T-SPIN triplet whose y0 equals y: each distinct response once
    groups = [([11, 12], [[21, 22], [21, 22]]), ([41], [[51], [61, 62], [51]])]
    batch = build(groups, budget=100, pad_id=0)
    assert batch.input_ids.tolist() == [[11, 12, 21, 22, 41, 51, 61, 62]]
    # kept logits: each prompt's last position (predicting every response's first token) and the distinct
    # responses' own positions (22's predictor, 62's predictor)
    assert batch.keep.tolist() == [[False, True, True, False, True, False, True, False]]
    assert batch.targets[0][0] is batch.targets[0][1] and batch.targets[1][0] is batch.targets[1][2]
    assert pack(groups, budget=4) == [[0], [1]]  # lengths 4 and 4, not 6 and 6


@pytest.mark.parametrize("native", [None, False], ids=["auto", "head-hook"])
def test_identical_responses_give_the_values_and_gradients_of_separate_copies(native):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(ARCHS["llama"]())
    groups = [(p, [a, a]) for p, (a, _) in _groups(2)] + [(p, [a, b, a]) for p, (a, b) in _groups(3)]
    results, grads = [], []
    for fn in (lambda: packed_logps(model, groups, 64, 0, native=native), lambda: plain_logps(model, groups, 0)):
        model.zero_grad()
        out = fn()
        # weights differ per copy, so a copy counted once (or its gradient once) would show
        total = sum(v * (k + 1) for per in out for k, (v, _) in enumerate(per))
        total.backward()
        results.append([[v.item() for v, _ in per] for per in out])
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    for packed, plain in zip(*results):
        assert packed == pytest.approx(plain, abs=1e-4)
        assert packed[0] == packed[-1]  # the copies are one value, exactly
    assert torch.allclose(grads[0], grads[1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("native", [None, False], ids=["auto", "head-hook"])
def test_logits_gradient_does_not_grow_with_the_number_of_responses(native):
    # Each autograd node that reads the (n_kept, vocab) logits gives them a dense gradient of that
    # size in the backward: one node per response costs gigabytes at a real vocabulary (128k x a few
    # thousand kept positions). Their number must not depend on how many responses are packed.
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(ARCHS["llama"]())
    seen = []
    model.get_output_embeddings().register_forward_hook(lambda module, args, out: seen.append(out))

    def readers_of_logits(groups):
        seen.clear()
        out = packed_logps(model, groups, 64, 0, native=native)
        total = sum(v for per in out for v, _ in per)
        (logits,) = seen
        stack, visited, readers = [total.grad_fn], set(), 0
        while stack:
            node = stack.pop()
            if node is None or node in visited:
                continue
            visited.add(node)
            nexts = [n for n, _ in node.next_functions]
            readers += logits.grad_fn in nexts
            stack += nexts
        return readers

    groups = _groups(4)
    few, many = readers_of_logits(groups[:1]), readers_of_logits(groups)
    assert 0 < few == many, (few, many)  # 2 responses vs 12


def test_pack_respects_budget_and_keeps_every_group():
    lengths = [50, 10, 30, 45, 5, 5, 70, 100]
    groups = [([1] * (n - 1), [[2]]) for n in lengths]
    rows = pack(groups, budget=60)
    assert sorted(i for row in rows for i in row) == list(range(len(groups)))
    for row in rows:
        total = sum(lengths[i] for i in row)
        assert total <= 60 or len(row) == 1


def test_pack_spreads_groups_over_its_rows_so_they_pad_less():
    # first-fit decreasing: rows [100 + 90, 80 + 20], padded to 190; spread over the same 2 rows: [100 + 20, 90 + 80]
    groups = [([1] * (n - 1), [[2]]) for n in (100, 90, 80, 20)]
    rows = pack(groups, budget=200)
    assert sorted(sorted(row) for row in rows) == [[0, 3], [1, 2]]
    assert build(groups, 200, 0).input_ids.shape == (2, 170)
    # where spreading would not shorten the longest row (or would break the budget), first-fit's rows stay
    groups = [([1] * (n - 1), [[2]]) for n in (60, 50, 50, 40)]
    assert pack(groups, budget=100) == [[0, 3], [1, 2]]
    groups = [([1] * (n - 1), [[2]]) for n in (300, 10)]  # a group over the budget keeps a row of its own
    assert pack(groups, budget=100) == [[0], [1]]


def test_sliding_window_model_falls_back_to_plain(caplog):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Gemma2Config(head_dim=8, sliding_window=16, **COMMON),
                                             attn_implementation="eager").eval()
    with caplog.at_level(logging.WARNING, logger="spinlm"):
        assert enable_packing(model, _groups(), pad_id=0, budget=64) is False
    assert "using the plain padded path" in caplog.text
    llama = AutoModelForCausalLM.from_config(ARCHS["llama"]()).eval()
    assert enable_packing(llama, _groups(), pad_id=0, budget=64) is True


def test_kept_logits_selection_follows_the_transformers_version():
    """Where transformers has `slice_logits_to_keep` its models take the boolean mask; the hook that
    replaces it leaves no trace on the model."""
    import transformers.modeling_utils

    model = AutoModelForCausalLM.from_config(ARCHS["llama"]()).eval()
    assert takes_bool_logits_to_keep(model) == hasattr(transformers.modeling_utils, "slice_logits_to_keep")
    packed_logps(model, _groups(), budget=40, pad_id=0, native=False)
    assert not model.get_output_embeddings()._forward_pre_hooks
    full = model(input_ids=torch.tensor([[5, 6, 7]])).logits
    assert full.shape == (1, 3, COMMON["vocab_size"])


def test_chunked_target_logps_by_hand():
    """The chunked op against log_softmax written out in float64, values and gradients (bias included), with a
    position in several pairs (a prompt's last position predicts each response's first token)."""
    g = torch.Generator().manual_seed(0)
    n, hidden, vocab = 11, 8, 37
    h = torch.randn(n, hidden, generator=g, dtype=torch.float64)
    w = torch.randn(vocab, hidden, generator=g, dtype=torch.float64)
    b = torch.randn(vocab, generator=g, dtype=torch.float64)
    index = torch.tensor([0, 0, 3, 10, 10, 10, 5])
    targets = torch.tensor([1, 2, 36, 0, 0, 7, 5])
    upstream = torch.randn(len(index), generator=g, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (h, w, b)]
    z = leaves[0] @ leaves[1].T + leaves[2]
    want = (z - z.exp().sum(-1, keepdim=True).log())[index, targets]
    want_grads = torch.autograd.grad((want * upstream).sum(), leaves)
    for rows in (1, 4, 11, 50):
        mine = [t.float().requires_grad_() for t in (h, w, b)]
        got = chunked_target_logps(*mine, index, targets, rows)
        assert got.dtype == torch.float32 and got.shape == (len(index),)
        assert torch.allclose(got.double(), want.detach(), atol=1e-5)
        for a, e in zip(torch.autograd.grad((got * upstream.float()).sum(), mine), want_grads):
            assert torch.allclose(a.double(), e, atol=1e-5)


@pytest.mark.parametrize("native", [None, False], ids=["auto", "head-hook"])
def test_chunked_equals_whole_within_1e5_and_keeps_no_vocabulary_sized_tensor(native):
    """Values and every parameter's gradient of the chunked path equal the whole-logits path within 1e-5
    (fp32), and what autograd saves for backward holds no (kept positions x vocabulary) tensor."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(ARCHS["qwen2"]())
    groups = _groups(2)
    n_kept = int(build(groups, 64, 0).keep.sum())  # positions predicting a response token
    results = {}
    for rows in (None, 5):
        saved = []

        def keep_shape(t):  # the size of every saved tensor with a vocabulary-sized last dimension
            saved.append(t.numel() if t.dim() and t.shape[-1] == COMMON["vocab_size"] else 0)
            return t

        model.zero_grad()
        with torch.autograd.graph.saved_tensors_hooks(keep_shape, lambda t: t):
            out = packed_logps(model, groups, 64, 0, native=native, chunk_rows=rows)
        values = torch.stack([v for per in out for v, _ in per])
        (values * torch.linspace(-1, 2, len(values))).sum().backward()
        results[rows] = (values.detach(), torch.cat([p.grad.flatten() for p in model.parameters()]), max(saved))
    assert torch.allclose(results[5][0], results[None][0], atol=1e-5)
    assert torch.allclose(results[5][1], results[None][1], atol=1e-5)
    vocab = COMMON["vocab_size"]
    assert results[None][2] >= n_kept * vocab  # the whole path keeps the logits (so the check can fail)
    assert results[5][2] == 0  # the chunked one keeps no logits at all


def test_chunk_policy_and_models_that_cannot_chunk():
    llama = AutoModelForCausalLM.from_config(ARCHS["llama"]()).eval()
    capped = AutoModelForCausalLM.from_config(Gemma2Config(head_dim=8, final_logit_softcapping=30.0, **COMMON)).eval()
    mb = 4 * 256 * 10 / 2**20  # ten positions of a 256-token vocabulary
    assert chunk_rows_for(llama, 11, Layout(64, "auto", mb)) == 10
    assert chunk_rows_for(llama, 10, Layout(64, "auto", mb)) is None  # fits in one chunk: whole
    assert chunk_rows_for(llama, 3, Layout(64, "always", mb)) == 10
    assert chunk_rows_for(llama, 11, Layout(64, "never", mb)) is None
    assert chunk_logits_possible(llama) and not chunk_logits_possible(capped)
    assert chunk_rows_for(capped, 11, Layout(64, "always", mb)) is None
    cfg = Config()
    cfg.packing.chunk_logits = "always"
    assert prepare(llama, _groups(), 0, cfg.packing) == Layout(cfg.packing.max_tokens, "always", 256.0)
    cfg.packing.enabled = False
    assert prepare(llama, _groups(), 0, cfg.packing) is None


def test_the_probe_keeps_no_graph():
    """prepare()'s probe compares values only: its forwards run without gradients (with them, each variant's
    activations stayed alive until the last one was compared: the bench's train stage peaked 0.8 GB higher), on a
    model in training mode, which it leaves in training mode."""
    model = AutoModelForCausalLM.from_config(ARCHS["llama"]()).train()
    seen = []
    model.register_forward_hook(lambda module, args, out: seen.append((torch.is_grad_enabled(), module.training)))
    cfg = Config()
    cfg.packing.chunk_logits = "always"
    assert prepare(model, _groups(), 0, cfg.packing) == Layout(cfg.packing.max_tokens, "always", 256.0)
    assert len(seen) == 3 and seen == [(False, False)] * 3  # plain, packed whole, packed chunked
    assert model.training and torch.is_grad_enabled()


def test_a_model_whose_chunked_path_differs_keeps_packing_unchunked(caplog):
    """The probe compares the chunked path with the plain one too: a model that transforms its logits
    after the output layer without saying so in its config (here: a hook that soft-caps them) keeps
    packing, unchunked, with one log line."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(ARCHS["llama"]()).eval()
    model.lm_head.register_forward_hook(lambda module, args, out: 5 * torch.tanh(out / 5))
    cfg = Config()
    with caplog.at_level(logging.WARNING, logger="spinlm"):
        layout = prepare(model, _groups(), 0, cfg.packing)
    assert layout == Layout(cfg.packing.max_tokens, "never", cfg.packing.logits_chunk_mb)
    assert "with the output layer in chunks" in caplog.text


@pytest.mark.parametrize("layout", [Layout(48, score_tokens=96), Layout(48, "always", 1e-4, 96), None],
                         ids=["packed", "packed-chunked", "plain"])
def test_score_groups_computes_a_shared_prompt_once_in_forwards_within_the_budgets(layout):
    """Groups of one prompt (the same real response, other samples, a repeated sample) are computed as one
    group; every value equals the independent per-sequence computation in float64 within 1e-5 nats per token
    (fp32 sums of 40 tokens are only good to ~4e-5 absolute); rows keep packing.max_tokens and forwards
    packing.score_max_tokens (a row over it gets a forward of its own); on the plain path, batch_size groups a
    forward."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(ARCHS["llama"]()).eval()
    exact = copy.deepcopy(model).double()
    base = _groups(shapes=((3, 5, 7), (10, 1, 4), (20, 9, 3), (6, 6, 6), (30, 30, 30), (2, 40, 8)))
    groups = base + [(p, [real, gen[::-1]]) for p, (real, gen) in base] + [base[0]]
    merged, units, plan = score_plan(groups, layout, batch_size=4)
    assert units[:6] == [[0, 6, 12], [1, 7], [2, 8], [3, 9], [4, 10], [5, 11]]
    tokens = []
    model.register_forward_pre_hook(lambda m, a, kw: tokens.append(kw["input_ids"].numel()), with_kwargs=True)
    scores = score_groups(model, groups, 0, layout, batch_size=4)
    assert len(tokens) == len(plan)
    if layout:
        for members, rows in plan:
            batch = build([merged[k] for k in members], layout.budget, 0, rows)
            lengths = [int((s >= 0).sum()) for s in batch.segment]
            assert all(n <= layout.budget or len(row) == 1 for n, row in zip(lengths, rows))
            assert batch.input_ids.numel() <= layout.score_tokens or len(rows) == 1
        assert len(plan) < len(merged)
    else:
        assert [len(members) for members, _ in plan] == [4, 2] and all(rows is None for _, rows in plan)
    distinct_tokens = sum(group_length(g) for g in merged)
    assert distinct_tokens == sum(len(p) + len(r) + len(g) + len(g) for p, (r, g) in base)  # real once
    with torch.no_grad():
        for (prompt, responses), got in zip(groups, scores):
            for response, (value, n) in zip(responses, got):
                assert n == len(response)
                assert abs(value - _unpacked_reference(exact, prompt, response)) <= 1e-5 * n


def test_a_prompt_repeated_many_times_is_not_merged_into_one_long_row():
    prompt = [7] * 10
    groups = [(prompt, [[k] * 10, [k + 1] * 10]) for k in range(20, 220, 10)]  # 20 rows of one prompt
    units = shared_prompts(groups, budget=64)
    assert sorted(i for u in units for i in u) == list(range(20))
    merged = [group_length((prompt, [r for i in u for r in groups[i][1]])) for u in units]
    assert max(merged) <= 64 and len(units) > 1
