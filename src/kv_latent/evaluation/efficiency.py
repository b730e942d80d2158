"""Efficiency: KV-cache bytes (analytic and measured) and generation latency (TTFT, ms/token)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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


CLOCKS = ("wall", "cpu")


def resolve_clock(clock: str, device: torch.device) -> str:
    """``auto`` is ``wall`` on CUDA (synchronised wall time, what a user waits) and ``cpu`` on a CPU,
    where a shared machine's load makes wall times of two models incomparable."""
    if clock == "auto":
        return "wall" if device.type == "cuda" else "cpu"
    if clock not in CLOCKS:
        raise ValueError(f"clock={clock!r} is unknown; choose auto, wall or cpu")
    return clock


@contextmanager
def _timer(clock: str, device: torch.device) -> Iterator[Callable[[], float]]:
    """The clock to read while timing. ``cpu``: the CPU time of the calling thread, with torch held
    to that one thread meanwhile, so every operation runs, and is counted, where it is read; it
    does not advance while the thread waits for a core, so a busy machine does not change it."""
    if clock == "wall":
        def now() -> float:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return time.perf_counter()
        yield now
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield time.thread_time
    finally:
        torch.set_num_threads(threads)


@torch.inference_mode()
def measure_latency(
    model: torch.nn.Module, input_ids: torch.Tensor, *, new_tokens: int, repeats: int = 5, warmup: int = 1,
    clock: str = "auto",
) -> Latency:
    """Greedy decoding of ``new_tokens`` after prefilling ``input_ids`` (1, T), with the cache
    (:func:`~kv_latent.evaluation.decoding.greedy_tokens`), timed by ``clock`` (:func:`resolve_clock`).

    TTFT is the prefill (which yields the first token, from logits of the last position only);
    ms/token is the median time of the later steps, each timed alone (a step slowed by a
    preemption does not move it). Both are medians over ``repeats`` after ``warmup`` untimed runs.
    """
    ttfts, per_token = [], []
    with _timer(resolve_clock(clock, input_ids.device), input_ids.device) as now:
        for run in range(warmup + repeats):
            steps = greedy_tokens(model, input_ids, new_tokens=new_tokens)
            start = now()
            next(steps)
            ticks = [now()]
            for _ in steps:
                ticks.append(now())
            if run >= warmup:
                ttfts.append(ticks[0] - start)
                gaps = [b - a for a, b in zip(ticks, ticks[1:])]
                per_token.append(1000 * statistics.median(gaps) if gaps else 0.0)
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
    clock: str = "auto",
) -> dict[str, float]:
    """A student and its original measured side by side on the same prompt ``input_ids`` (1, T).

    The two generate in lockstep (:func:`paired_latency`): each forward pass of one is timed next
    to the same pass of the other, in alternating order, so that a change of machine load (or an
    advantage of going first) hits both alike. ``ttft`` compares the prefills of each of
    ``repeats`` rounds (after ``warmup`` untimed rounds), ``ms_per_token`` every later step of every
    round; a ratio is the median of these paired student / original ratios, with the 25th and
    75th percentiles as its spread. The prefill computes logits at the last position only, as a
    server does; ``clock`` is :func:`measure_latency`'s.

    KV bytes per token come from the config and from the cache after the prefill; a mismatch
    raises ``RuntimeError``. Returns ``efficiency/<name>`` for the student and
    ``original/efficiency/<name>`` for the original (``kv_bytes_per_token``, ``peak_memory_bytes``,
    and the medians ``ttft_s``, ``ms_per_token``); ``efficiency/<name>_ratio`` (student / original)
    for ``kv_bytes``, ``peak_memory``, ``ttft`` and ``ms_per_token``, the latter two with
    ``_ratio_p25`` and ``_ratio_p75``; and ``efficiency/rounds``.
    """
    if input_ids.shape[0] != 1:
        raise ValueError(f"the latency protocol uses batch 1; got input_ids of shape {tuple(input_ids.shape)}")
    if repeats < 1 or new_tokens < 2:
        raise ValueError(f"repeats={repeats} must be >= 1 and new_tokens={new_tokens} >= 2 (a decode step to time)")
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
    rounds = [paired_latency(student, original, input_ids, new_tokens=new_tokens, clock=clock, student_first=i % 2 == 0)
              for i in range(warmup + repeats)][warmup:]
    for prefix, side in (("efficiency", 0), ("original/efficiency", 1)):
        metrics[f"{prefix}/ttft_s"] = statistics.median(r[side][0] for r in rounds)
        metrics[f"{prefix}/ms_per_token"] = 1000 * statistics.median(t for r in rounds for t in r[side][1:])
    paired = {"ttft": [s[0] / o[0] for s, o in rounds],
              "ms_per_token": [a / b for s, o in rounds for a, b in zip(s[1:], o[1:])]}
    for name, ratios in paired.items():
        low, mid, high = _quartiles(ratios)
        metrics |= {f"efficiency/{name}_ratio": mid, f"efficiency/{name}_ratio_p25": low,
                    f"efficiency/{name}_ratio_p75": high}
    for name, key in (("kv_bytes", "kv_bytes_per_token"), ("peak_memory", "peak_memory_bytes")):
        metrics[f"efficiency/{name}_ratio"] = metrics[f"efficiency/{key}"] / metrics[f"original/efficiency/{key}"]
    metrics["efficiency/rounds"] = float(repeats)
    return metrics


@torch.inference_mode()
def paired_latency(
    student: torch.nn.Module, original: torch.nn.Module, input_ids: torch.Tensor, *, new_tokens: int,
    clock: str = "auto", student_first: bool = True,
) -> tuple[list[float], list[float]]:
    """One round of greedy decoding of ``new_tokens`` after ``input_ids`` (1, T) by both models in
    lockstep: the prefills one after the other, then each decode step of one beside the same step
    of the other, the order alternating from pass to pass. Returns the seconds of every forward
    pass (prefill first) of the student and of the original."""
    runs = [greedy_tokens(student, input_ids, new_tokens=new_tokens),
            greedy_tokens(original, input_ids, new_tokens=new_tokens)]
    times: tuple[list[float], list[float]] = ([], [])
    with _timer(resolve_clock(clock, input_ids.device), input_ids.device) as now:
        for step in range(new_tokens):
            order = (0, 1) if (step % 2 == 0) == student_first else (1, 0)
            for side in order:
                start = now()
                next(runs[side])
                times[side].append(now() - start)
    return times


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    """25th percentile, median and 75th percentile of ``values`` (linear interpolation; one value:
    itself three times)."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    low, mid, high = statistics.quantiles(values, n=4, method="inclusive")
    return low, mid, high
