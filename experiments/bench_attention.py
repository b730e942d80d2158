"""Benchmark: prefill (TTFT) and decode (ms/token) of KV-Latent students at several (k_dim, v_dim),
side by side in one process, as ratios to the symmetric full-dim (64, 64) student.

Asymmetric configs must be at least as fast as the symmetric config of their larger dim (the
attention pads the smaller side so fused kernels stay in use). Configs are measured round-robin,
so drift in machine load hits all of them alike; each number is a median over rounds.

    python experiments/bench_attention.py                 # CPU, tiny architecture, 2K and 8K
    python experiments/bench_attention.py --device cuda --dtype bfloat16 --contexts 2048 8192 32768
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kv_latent.evaluation.efficiency import kv_bytes_per_token, measure_latency
from kv_latent.surgery import build_student

DIMS = [(64, 64), (32, 32), (16, 16), (32, 64), (64, 32)]


def original_model(args) -> LlamaForCausalLM:
    """A randomly initialised model of the tiny architecture (speed does not depend on weights)."""
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64 // args.gqa_groups,
        head_dim=64,
        max_position_embeddings=max(args.contexts) + args.new_tokens,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192], help="prompt lengths")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens decoded after the prompt")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (median reported)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--gqa-groups", type=int, default=1, help="query heads per KV head")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--attn", default="sdpa", help="attention implementation (sdpa, eager, flash_attention_2)")
    args = parser.parse_args()

    dtype = getattr(torch, args.dtype)
    original = original_model(args).to(args.device, dtype).eval()
    original.set_attn_implementation(args.attn)
    students = {dims: build_student(original, k_dim=dims[0], v_dim=dims[1]) for dims in DIMS}
    print(
        f"device={args.device} dtype={args.dtype} attn={args.attn} threads={torch.get_num_threads()} "
        f"cores={os.cpu_count()} hidden={args.hidden} layers={args.layers} heads={original.config.num_attention_heads} "
        f"kv_heads={original.config.num_key_value_heads} new_tokens={args.new_tokens} rounds={args.rounds}"
    )
    for context in args.contexts:
        ids = torch.randint(0, args.vocab, (1, context), device=args.device)
        for model in students.values():  # warm-up: allocator, kernels
            measure_latency(model, ids, new_tokens=4, repeats=1, warmup=0)
        ttft, mspt = {d: [] for d in DIMS}, {d: [] for d in DIMS}
        for _ in range(args.rounds):
            for dims, model in students.items():
                lat = measure_latency(model, ids, new_tokens=args.new_tokens, repeats=1, warmup=0)
                ttft[dims].append(lat.ttft_s)
                mspt[dims].append(lat.ms_per_token)
        base_ttft, base_mspt = statistics.median(ttft[DIMS[0]]), statistics.median(mspt[DIMS[0]])
        print(f"\ncontext {context}")
        print(f"{'k_dim/v_dim':>12} {'KV B/token':>10} {'TTFT s':>8} {'x (64,64)':>9} {'ms/token':>9} {'x (64,64)':>9}")
        for dims in DIMS:
            t, m = statistics.median(ttft[dims]), statistics.median(mspt[dims])
            kv = kv_bytes_per_token(students[dims].config, dtype=dtype)
            print(f"{dims[0]:>5}/{dims[1]:<6} {kv:>10} {t:>8.3f} {t / base_ttft:>9.2f} {m:>9.2f} {m / base_mspt:>9.2f}")


if __name__ == "__main__":
    main()
