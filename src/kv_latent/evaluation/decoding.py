"""Greedy decoding with the model's KV cache: the loop the needle grid and the latency protocol share.

The loop is explicit (not ``generate``), so a timed run includes no generation-utility overhead
and works the same for the project's students and stock Llama models.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


@torch.inference_mode()
def greedy_tokens(model, input_ids: torch.Tensor, *, new_tokens: int) -> Iterator[torch.Tensor]:
    """Yield ``new_tokens`` greedy tokens (each of shape (B,)) after ``input_ids`` (B, T).

    The first comes from the prefill of the prompt (logits of its last position only), each later
    one from a single cached step. The generator is lazy: each ``next`` runs exactly one forward
    pass, so a caller can time the prefill and the decode steps apart.
    """
    out = model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1].argmax(-1)  # (B,)
    yield token
    for _ in range(new_tokens - 1):
        out = model(input_ids=token[:, None], cache=out.cache, use_cache=True)  # input (B, 1)
        token = out.logits[:, -1].argmax(-1)  # (B,)
        yield token


def greedy_decode(model, input_ids: torch.Tensor, *, new_tokens: int) -> torch.Tensor:
    """The :func:`greedy_tokens` after ``input_ids`` (B, T) as one tensor (B, new_tokens)."""
    return torch.stack(list(greedy_tokens(model, input_ids, new_tokens=new_tokens)), dim=1)  # (B, new_tokens)
