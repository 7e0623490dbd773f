"""Summed response log-probabilities of (prompt, response) token sequences.

One right-padded forward over the batch; log-softmax is evaluated only at the response
positions (gather minus logsumexp), so no (batch, seq, vocab) log-prob tensor is built.
"""

from __future__ import annotations

import torch


def collate(seqs: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-padded input_ids, attention_mask and the response-label mask.

    Returns input_ids (n, T), attention_mask (n, T), and target_mask (n, T-1) which is
    True where logits at position i predict a response token at i+1.
    """
    lengths = [len(p) + len(r) for p, r in seqs]
    width = max(lengths)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    target_mask = torch.zeros((len(seqs), width - 1), dtype=torch.bool)
    for i, (prompt, response) in enumerate(seqs):
        ids = prompt + response
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, : len(ids)] = 1
        target_mask[i, len(prompt) - 1 : len(ids) - 1] = True
    return input_ids, attention_mask, target_mask


def token_logps(logits: torch.Tensor, input_ids: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """Log-probs of the target tokens at the masked positions, flattened (n_targets,)."""
    picked = logits[:, :-1][target_mask].float()  # (n_targets, vocab)
    targets = input_ids[:, 1:][target_mask]
    return picked.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(picked, dim=-1)


def sequence_logps(model, seqs: list[tuple[list[int], list[int]]], pad_id: int):
    """Summed response log-probs (n,) and response token counts (n,), with grad if enabled."""
    input_ids, attention_mask, target_mask = collate(seqs, pad_id)
    dev = next(model.parameters()).device
    input_ids, attention_mask, target_mask = input_ids.to(dev), attention_mask.to(dev), target_mask.to(dev)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    per_token = token_logps(logits, input_ids, target_mask)
    counts = target_mask.sum(-1)
    row = torch.repeat_interleave(torch.arange(len(seqs), device=dev), counts)
    sums = torch.zeros(len(seqs), device=dev, dtype=per_token.dtype).index_add(0, row, per_token)
    return sums, counts


class _ChunkedTargetLogps(torch.autograd.Function):
    """log softmax(h W^T + b)[target] for (position, target) pairs, `rows` positions at a time.

    Forward keeps only the log-sum-exp of each position (n,); backward recomputes each chunk's logits.
    With p = softmax(z_i) and g_k the gradient of pair k = (i, t):
        dL/dz_i = sum_{k at i} g_k (onehot(t_k) - p_i) = onehot terms - G_i p_i,   G_i = sum_{k at i} g_k
    so the dense part is G_i p_i per chunk and the onehot part is a sparse scatter (no (n, vocab) tensor).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, index, targets, rows):
        lse = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        picked = torch.empty(index.shape[0], dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], rows):
            z = _logits(hidden[start:start + rows], weight, bias)  # (rows, vocab) float32
            inside = (index >= start) & (index < start + rows)
            picked[inside] = z[index[inside] - start, targets[inside]]
            lse[start:start + rows] = _logsumexp_(z)  # z is spent
        ctx.save_for_backward(hidden, weight, bias, index, targets, lse)
        ctx.rows = rows
        return picked - lse[index]

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, index, targets, lse = ctx.saved_tensors
        grad = grad.float()
        total = torch.zeros_like(lse).index_add_(0, index, grad)  # G_i
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        grad_bias = None if bias is None else torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device)
        for start in range(0, hidden.shape[0], ctx.rows):
            h = hidden[start:start + ctx.rows]
            # in place: one (rows, vocab) buffer per chunk, not three (each a fresh, page-faulted allocation)
            dz = _logits(h, weight, bias).sub_(lse[start:start + ctx.rows, None]).exp_()
            dz.mul_(-total[start:start + ctx.rows, None])
            torch.matmul(dz.to(hidden.dtype), weight, out=grad_hidden[start:start + ctx.rows])
            if h.dtype == torch.float32:
                grad_weight.addmm_(dz.t(), h)
            else:  # bf16/fp16 matmul (fp32 accumulation inside), the chunks summed in float32
                grad_weight += (dz.to(h.dtype).t() @ h).float()
            if grad_bias is not None:
                grad_bias += dz.sum(0)
        # the onehot terms: + g_k W[t_k] at position i_k, + g_k h_{i_k} at vocabulary row t_k
        grad_hidden.index_add_(0, index, (grad[:, None] * weight[targets].float()).to(hidden.dtype))
        grad_weight.index_add_(0, targets, grad[:, None] * hidden[index].float())
        if grad_bias is not None:
            grad_bias.index_add_(0, targets, grad)
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight.to(weight.dtype), grad_bias, None, None, None


def _logsumexp_(z: torch.Tensor) -> torch.Tensor:
    """torch.logsumexp(z, -1) of a 2-D float tensor, the same operations (max, masked to 0 where infinite, exp of
    the difference, sum, log, plus max) with the exp done in z's own storage: z is overwritten."""
    maxes = z.amax(-1, keepdim=True)
    maxes.masked_fill_(maxes.abs() == float("inf"), 0)
    return z.sub_(maxes).exp_().sum(-1).log_().add_(maxes.squeeze(-1))


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The output layer on a chunk of positions, as nn.Linear computes it, then float32."""
    return torch.nn.functional.linear(hidden, weight, bias).float()


def chunked_target_logps(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, index: torch.Tensor,
                         targets: torch.Tensor, rows: int) -> torch.Tensor:
    """log softmax(linear(hidden[index]))[targets], (m,) float32, with at most `rows` positions' logits held at a
    time (forward and backward): hidden (n, H), weight (vocab, H), index/targets (m,) (a position may appear in
    several pairs: a prompt's last position predicts the first token of each of its responses)."""
    return _ChunkedTargetLogps.apply(hidden, weight, bias, index, targets, max(1, int(rows)))
