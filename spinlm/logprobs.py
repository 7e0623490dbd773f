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
