"""The losses of retraining (DESIGN.md §2.3), and the layer taps Stage I reads them through.

Plain torch, no Lightning: :func:`token_nll` is also the held-out perplexity of
:mod:`kv_latent.evaluation.perplexity`, so training and evaluation count tokens the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from functools import partial

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


def ntp_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Next-token cross-entropy averaged over the real (unpadded) predicted tokens."""
    nll_sum, n = token_nll(logits, input_ids, attention_mask)
    return nll_sum / n.clamp(min=1)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    temperature: float,
) -> torch.Tensor:
    """KL(teacher_T || student_T) per token, averaged over unpadded tokens, scaled by T².

    The T² keeps gradient magnitudes comparable across temperatures (Hinton et al.). Padded
    positions are dropped before the softmax, so their logits cannot leak in (not even as NaN).
    """
    if attention_mask is not None:
        keep = attention_mask.bool()
        student_logits, teacher_logits = student_logits[keep], teacher_logits[keep]  # (N, V)
    s_logp = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t_logp = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(s_logp, t_logp, log_target=True, reduction="none").sum(-1)  # (N,) or (B, T)
    return kl.sum() / max(kl.numel(), 1) * temperature**2


def masked_mse(student: torch.Tensor, teacher: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """MSE between hidden states ``(B, T, H)``, averaged over hidden size and unpadded tokens."""
    err = (student.float() - teacher.float()).pow(2).mean(-1)  # (B, T)
    if attention_mask is None:
        return err.mean()
    keep = attention_mask.bool()
    return torch.where(keep, err, torch.zeros_like(err)).sum() / keep.sum().clamp(min=1)


@contextmanager
def tap_layers(layers: Sequence[torch.nn.Module], feed: Sequence[torch.Tensor] | None = None):
    """Record each layer's input and output hidden states during the forward passes in the block.

    With ``feed``, layer ``i`` receives ``feed[i]`` as its input hidden state instead of the
    previous layer's output: this is how Stage I feeds the teacher's layer inputs to the student
    inside the student's own forward, which builds masks and RoPE exactly as in normal use.
    Yields ``(inputs, outputs)``, two lists filled by the forward pass.
    """
    inputs: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []

    def before(i, module, args, kwargs):
        if feed is not None:
            if args:
                args = (feed[i], *args[1:])
            else:
                kwargs = {**kwargs, "hidden_states": feed[i]}
        inputs.append(args[0] if args else kwargs["hidden_states"])
        return args, kwargs

    def after(module, args, output):
        outputs.append(output[0] if isinstance(output, tuple) else output)

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(partial(before, i), with_kwargs=True))
        handles.append(layer.register_forward_hook(after))
    try:
        yield inputs, outputs
    finally:
        for handle in handles:
            handle.remove()
