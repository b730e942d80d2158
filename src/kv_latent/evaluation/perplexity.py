"""Held-out perplexity: token-weighted next-token NLL on unpadded token blocks."""

from __future__ import annotations

import math

import torch

from kv_latent.training.losses import token_nll


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
