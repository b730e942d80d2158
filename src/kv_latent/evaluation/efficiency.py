"""Efficiency: KV-cache bytes (analytic and measured) and generation latency (TTFT, ms/token)."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PretrainedConfig

from kv_latent.evaluation.decoding import greedy_tokens


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
    """Greedy decoding of ``new_tokens`` after prefilling ``input_ids`` (1, T), with the cache
    (:func:`~kv_latent.evaluation.decoding.greedy_tokens`).

    TTFT is the prefill (which yields the first token); ms/token is the mean time of each later
    step. Both are medians over ``repeats`` after ``warmup`` untimed runs.
    """
    device = input_ids.device
    ttfts, per_token = [], []
    for run in range(warmup + repeats):
        steps = greedy_tokens(model, input_ids, new_tokens=new_tokens)
        _sync(device)
        start = time.perf_counter()
        next(steps)
        _sync(device)
        prefill_end = time.perf_counter()
        for _ in steps:
            pass
        _sync(device)
        end = time.perf_counter()
        if run >= warmup:
            ttfts.append(prefill_end - start)
            per_token.append((end - prefill_end) * 1000 / max(new_tokens - 1, 1))
    return Latency(ttft_s=statistics.median(ttfts), ms_per_token=statistics.median(per_token))


def param_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


@torch.inference_mode()
def peak_memory_bytes(model: torch.nn.Module, input_ids: torch.Tensor, *, new_tokens: int) -> int:
    """Memory of one greedy generation of ``new_tokens`` after ``input_ids`` (1, T).

    On CUDA: the peak allocation during the run above what was allocated before it, plus the
    model's own parameters (so another model resident on the same device does not count). On CPU
    torch's allocator keeps no peak counter (and ``tracemalloc`` does not see its buffers), so the
    number is parameters + the KV cache of the full sequence from the config (which
    :func:`compare_efficiency` checks against the measured cache): a floor without activations.
    """
    device = input_ids.device
    if device.type != "cuda":
        dtype = next(model.parameters()).dtype
        cache = kv_bytes_per_token(model.config, dtype=dtype) * (input_ids.shape[1] + new_tokens)
        return param_bytes(model) + cache
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    measure_latency(model, input_ids, new_tokens=new_tokens, repeats=1, warmup=0)
    return torch.cuda.max_memory_allocated(device) - before + param_bytes(model)


def compare_efficiency(
    student: torch.nn.Module,
    original: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    new_tokens: int,
    repeats: int,
    warmup: int = 1,
) -> dict[str, float]:
    """A student and its original measured side by side on the same prompt ``input_ids`` (1, T).

    Latency runs alternate between the two models (one run each per round, after ``warmup``
    runs each), so load drift on a shared machine hits both alike; TTFT and ms/token are medians
    over ``repeats`` rounds. KV bytes per token come from the config and from the cache after the
    prefill; a mismatch raises ``RuntimeError``. Returns ``efficiency/<name>`` for the student,
    ``original/efficiency/<name>`` for the original and ``efficiency/<name>_ratio`` (student /
    original) for ``kv_bytes`` (per token), ``ttft``, ``ms_per_token`` and ``peak_memory``.
    """
    if input_ids.shape[0] != 1:
        raise ValueError(f"the latency protocol uses batch 1; got input_ids of shape {tuple(input_ids.shape)}")
    models = {"efficiency": student, "original/efficiency": original}
    metrics: dict[str, float] = {}
    for prefix, model in models.items():
        model.eval()
        analytic = kv_bytes_per_token(model.config, dtype=next(model.parameters()).dtype)
        measured = measured_kv_bytes_per_token(model, input_ids)
        if measured != analytic:
            raise RuntimeError(f"{prefix}: KV bytes per token from the cache ({measured}) != from the config ({analytic})")
        metrics[f"{prefix}/kv_bytes_per_token"] = float(analytic)
        metrics[f"{prefix}/peak_memory_bytes"] = float(peak_memory_bytes(model, input_ids, new_tokens=new_tokens))
    runs: dict[str, list[Latency]] = {prefix: [] for prefix in models}
    for i in range(repeats):
        for prefix, model in models.items():
            runs[prefix].append(
                measure_latency(model, input_ids, new_tokens=new_tokens, repeats=1, warmup=warmup if i == 0 else 0)
            )
    for prefix, latencies in runs.items():
        metrics[f"{prefix}/ttft_s"] = statistics.median(r.ttft_s for r in latencies)
        metrics[f"{prefix}/ms_per_token"] = statistics.median(r.ms_per_token for r in latencies)
    for name, key in (("kv_bytes", "kv_bytes_per_token"), ("ttft", "ttft_s"),
                      ("ms_per_token", "ms_per_token"), ("peak_memory", "peak_memory_bytes")):
        metrics[f"efficiency/{name}_ratio"] = metrics[f"efficiency/{key}"] / metrics[f"original/efficiency/{key}"]
    return metrics
