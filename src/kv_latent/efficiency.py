"""Efficiency: KV-cache bytes (analytic and measured) and generation latency (TTFT, ms/token)."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PretrainedConfig


def layer_kv_dims(config: PretrainedConfig) -> list[tuple[int, int]]:
    """``(k_dim, v_dim)`` per layer for a KV-Latent config or a stock Llama config."""
    n = config.num_hidden_layers
    k = getattr(config, "k_dim", None) or [config.head_dim] * n
    v = getattr(config, "v_dim", None) or [config.head_dim] * n
    return list(zip(k, v))


def kv_bytes_per_token(config: PretrainedConfig, *, dtype: torch.dtype) -> int:
    """KV-cache bytes per token from the config: ``sum_layers n_kv * (k_dim + v_dim) * bytes``
    (``L * n_kv * (d_qk + d_vo) * bytes`` when all layers agree)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return sum(config.num_key_value_heads * (k + v) * itemsize for k, v in layer_kv_dims(config))


def cache_bytes(cache: DynamicCache) -> int:
    """Bytes actually held by the keys and values of a cache."""
    return sum(
        t.numel() * t.element_size() for layer in cache.layers if layer.is_initialized for t in (layer.keys, layer.values)
    )


def measured_kv_bytes_per_token(model: torch.nn.Module, input_ids: torch.Tensor) -> float:
    """Prefill ``input_ids`` (B, T) and return the cache's bytes divided by ``B * T``."""
    with torch.inference_mode():
        out = model(input_ids=input_ids, use_cache=True)
    return cache_bytes(out.cache) / input_ids.numel()


@dataclass
class Latency:
    """Median over repeats: time to first token (s) and ms per output token after it."""

    ttft_s: float
    ms_per_token: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def measure_latency(
    model: torch.nn.Module, input_ids: torch.Tensor, *, new_tokens: int, repeats: int = 5, warmup: int = 1
) -> Latency:
    """Greedy decoding of ``new_tokens`` after prefilling ``input_ids`` (1, T), with the cache.

    TTFT is the prefill (which yields the first token); ms/token is the mean time of each later
    step. Both are medians over ``repeats`` after ``warmup`` untimed runs. The loop is explicit
    (not ``generate``) so neither number includes generation-utility overhead.
    """
    device = input_ids.device
    ttfts, per_token = [], []
    for run in range(warmup + repeats):
        _sync(device)
        start = time.perf_counter()
        out = model(input_ids=input_ids, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)  # (1, 1)
        _sync(device)
        prefill_end = time.perf_counter()
        cache = out.cache
        for _ in range(new_tokens - 1):
            out = model(input_ids=token, cache=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
        _sync(device)
        end = time.perf_counter()
        if run >= warmup:
            ttfts.append(prefill_end - start)
            per_token.append((end - prefill_end) * 1000 / max(new_tokens - 1, 1))
    return Latency(ttft_s=statistics.median(ttfts), ms_per_token=statistics.median(per_token))
