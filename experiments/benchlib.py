"""What the benchmark scripts share: the tiny architecture with random weights (speed does not
depend on weights), its command-line options, and round-robin latency medians."""

from __future__ import annotations

import argparse
import os
import statistics

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kv_latent.evaluation.efficiency import measure_latency


def add_model_args(parser: argparse.ArgumentParser, *, contexts: list[int]) -> None:
    """Options for the architecture, the contexts and the timing of a latency benchmark."""
    parser.add_argument("--contexts", type=int, nargs="+", default=contexts, help="prompt lengths")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens decoded after the prompt")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (median reported)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--attn", default="sdpa", help="attention implementation (sdpa, eager, flash_attention_2)")


def random_llama(args: argparse.Namespace, *, gqa_groups: int = 1) -> LlamaForCausalLM:
    """A randomly initialised model of the tiny architecture, 64-wide heads, ``gqa_groups`` query
    heads per KV head, on ``args.device`` in ``args.dtype``, evaluation mode."""
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64 // gqa_groups,
        head_dim=64,
        max_position_embeddings=max(args.contexts) + args.new_tokens,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(args.device, getattr(torch, args.dtype)).eval()
    model.set_attn_implementation(args.attn)
    return model


def describe(args: argparse.Namespace, model: LlamaForCausalLM) -> str:
    """The benchmark's setting in one line."""
    return (f"device={args.device} dtype={args.dtype} attn={args.attn} threads={torch.get_num_threads()} "
            f"cores={os.cpu_count()} hidden={args.hidden} layers={args.layers} heads={model.config.num_attention_heads} "
            f"kv_heads={model.config.num_key_value_heads} new_tokens={args.new_tokens} rounds={args.rounds}")


def round_robin(models: dict, ids: torch.Tensor, *, new_tokens: int, rounds: int) -> tuple[dict, dict]:
    """Median TTFT (s) and ms/token per model over ``rounds``, each round timing every model once
    in turn, so drift in machine load hits all of them alike (after one warm-up each)."""
    for model in models.values():  # warm-up: allocator, kernels
        measure_latency(model, ids, new_tokens=4, repeats=1, warmup=0)
    ttft, mspt = {key: [] for key in models}, {key: [] for key in models}
    for _ in range(rounds):
        for key, model in models.items():
            lat = measure_latency(model, ids, new_tokens=new_tokens, repeats=1, warmup=0)
            ttft[key].append(lat.ttft_s)
            mspt[key].append(lat.ms_per_token)
    return ({key: statistics.median(t) for key, t in ttft.items()},
            {key: statistics.median(t) for key, t in mspt.items()})
