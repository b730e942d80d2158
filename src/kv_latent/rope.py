"""RoPE frequency schedules: a schedule name maps to ``inv_freq`` for a (reduced) key dim.

A new schedule is one function ``(dim, theta) -> inv_freq`` decorated with ``@register``. Besides
the schedules, :func:`pair_inv_freq` gives the original frequencies of chosen ``rotate_half`` pairs
(the per-head frequency sets of data-aware inits, DESIGN.md §2.6).
This module imports only torch: it travels with saved checkpoints (``trust_remote_code``).
"""

from __future__ import annotations

from typing import Callable

import torch

ROPE_SCHEDULES: dict[str, Callable[[int, float], torch.Tensor]] = {}


def register(name: str):
    """Register ``fn(dim, theta) -> inv_freq`` (float32, ``dim // 2`` entries) under ``name``."""

    def wrap(fn):
        ROPE_SCHEDULES[name] = fn
        return fn

    return wrap


@register("standard")
def standard(dim: int, theta: float) -> torch.Tensor:
    """Standard RoPE at ``dim``: ``theta ** (-arange(0, dim, 2) / dim)``."""
    arr = torch.arange(0, dim, 2, dtype=torch.float64)
    return (theta ** (-arr / dim)).float()


def freq_aware_exponents(dim: int) -> torch.Tensor:
    """The exponents ``arr`` of frequency-aware RoPE at ``dim`` (``inv_freq = theta^(-arr/dim)``):
    ``cat(arange(d/4, 3d/4, 2), arange(3d/4, d, 1))``, ``dim // 2`` integers (int64)."""
    if dim % 4:
        raise ValueError(f"freq_aware RoPE needs a key dim divisible by 4, got {dim}")
    return torch.cat([torch.arange(dim // 4, 3 * dim // 4, 2), torch.arange(3 * dim // 4, dim, 1)])


@register("freq_aware")
def freq_aware(dim: int, theta: float) -> torch.Tensor:
    """KV-Latent frequency-aware RoPE (paper Eq. 11): drop the highest frequencies and sample the
    low band twice as densely (:func:`freq_aware_exponents`)."""
    arr = freq_aware_exponents(dim).double()
    return (theta ** (-arr / dim)).float()


def pair_inv_freq(pairs: torch.Tensor, *, head_dim: int, theta: float) -> torch.Tensor:
    """The original frequencies ``theta^(-2j/head_dim)`` of ``rotate_half`` pairs ``j`` (any
    shape), in float64; cast to float32 they equal ``standard(head_dim, theta)[j]`` exactly."""
    return theta ** (-(2 * pairs.double()) / head_dim)


def rope_as_run(schedule: str, *, k_dim: int, head_dim: int, at_full_dim: bool = False,
                own_frequencies: bool = False) -> str:
    """The RoPE a layer of key dim ``k_dim`` runs when ``schedule`` is asked: a schedule applies to
    reduced keys only, unless ``at_full_dim`` (so a full-width layer under ``freq_aware`` runs
    ``standard``); ``original`` where the kept pairs keep their own original frequencies
    (``own_frequencies``: the ``qk_energy`` init) at a reduced dim."""
    if k_dim == head_dim and not at_full_dim:
        return "standard"
    return "original" if own_frequencies else schedule


def inv_freq(schedule: str, *, dim: int, theta: float) -> torch.Tensor:
    """``inv_freq`` of ``schedule`` for key dim ``dim`` and base ``theta``."""
    if schedule not in ROPE_SCHEDULES:
        raise KeyError(f"unknown RoPE schedule {schedule!r}; known: {sorted(ROPE_SCHEDULES)}")
    return ROPE_SCHEDULES[schedule](dim, theta)


def autocorrelation(freqs: torch.Tensor, distances: torch.Tensor) -> torch.Tensor:
    """Expected score of two identical all-ones vectors at the given distances under RoPE with
    ``freqs``: ``a(m) = (2/d) * sum_j cos(m * inv_freq_j)``, so ``a(0) = 1`` (DESIGN.md §2.2)."""
    angles = distances.double()[:, None] * freqs.double()[None, :]  # (M, d/2)
    return angles.cos().mean(dim=-1)
