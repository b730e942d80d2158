"""Evaluation of a (student or original) causal LM. For now: perplexity on held-out token blocks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
    """Summed next-token negative log-likelihood and the number of predicted tokens.

    Position ``t`` predicts token ``t + 1``; a prediction counts only if both its context token and
    its target are real (mask 1), so padding on either side never enters the loss. The sum is in
    float32 whatever the logits' dtype (bf16 log-softmax over a large vocab loses digits).

    Returns ``(nll_sum, n_tokens)`` as 0-d tensors, so callers can take token-weighted means
    across batches and devices.
    """
    logits = logits[:, :-1].float()  # (B, T-1, V)
    targets = input_ids[:, 1:]  # (B, T-1)
    if attention_mask is None:
        keep = torch.ones_like(targets, dtype=torch.bool)
    else:
        keep = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
    nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (B, T-1)
    nll = torch.where(keep, nll, torch.zeros_like(nll))
    return nll.sum(), keep.sum()


@torch.no_grad()
def perplexity(model, blocks, *, batch_size: int, max_blocks: int | None = None) -> dict[str, float]:
    """Token-weighted mean next-token NLL of ``model`` over ``blocks`` and its exponential.

    ``blocks`` is a LongTensor ``[N, T]`` of unpadded token blocks (or a sequence of 1-D blocks of
    equal length). Returns ``{"loss": mean NLL (nats/token), "ppl": exp(loss), "tokens": n}``.
    The model is put in eval mode and left there.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size} must be positive")
    if not isinstance(blocks, torch.Tensor):
        blocks = torch.stack(list(blocks))  # (N, T)
    if max_blocks is not None:
        blocks = blocks[:max_blocks]
    if len(blocks) == 0:
        raise ValueError("perplexity needs at least one block")
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        input_ids = blocks[start : start + batch_size].to(device)  # (b, T)
        logits = model(input_ids=input_ids, use_cache=False).logits  # (b, T, V)
        nll_sum, n = token_nll(logits, input_ids)
        total += nll_sum.item()
        count += int(n)
    loss = total / count
    return {"loss": loss, "ppl": math.exp(loss), "tokens": count}
