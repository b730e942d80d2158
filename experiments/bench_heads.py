"""Benchmark: decode (ms/token) and prefill (TTFT) of head-compressed models (DESIGN.md §5) against
the original, side by side in one process: ``rope_pca`` (a stock GQA Llama) at each KV-head count
beside the KV-cache bound (its share of the original's KV bytes per token), and ``svd_a`` (which
computes every original key, rotates it and projects it after RoPE) as a ratio to ``rope_pca`` at
the same cache.

At long contexts decode is bound by reading the cache, so ``rope_pca``'s ms/token ratio should
approach its KV share from above, and ``svd_a``'s overhead over ``rope_pca`` is the price of its
post-RoPE projection. Models are measured round-robin, so drift in machine load hits all of them
alike; each number is a median over rounds.

    python experiments/bench_heads.py                  # CPU, tiny_mha's architecture, 2K and 8K
    python experiments/bench_heads.py --device cuda --dtype bfloat16 --contexts 8192 32768
"""

from __future__ import annotations

import argparse

import torch

from benchlib import add_model_args, describe, random_llama, round_robin
from kv_latent.calibration import second_moments
from kv_latent.evaluation.efficiency import kv_bytes_per_token
from kv_latent.heads import compress_heads

MODES = ["rope_pca", "svd_a"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser, contexts=[2048, 8192])
    args = parser.parse_args()

    dtype = getattr(torch, args.dtype)
    original = random_llama(args)  # MHA
    n_kv = original.config.num_key_value_heads
    counts = [n for n in range(n_kv // 2, 0, -1) if n_kv % n == 0]  # every compression: 4 -> 2, 1
    blocks = torch.randint(0, args.vocab, (4, 256), device=args.device)
    models = {("original", n_kv): original}
    for kv_heads in counts:
        stats = second_moments(original, blocks, group_size=n_kv // kv_heads)
        for mode in MODES:
            models[mode, kv_heads] = compress_heads(original, mode=mode, kv_heads=kv_heads, stats=stats)
    print(describe(args, original))
    full_bytes = kv_bytes_per_token(original.config, dtype=dtype)
    for context in args.contexts:
        ids = torch.randint(0, args.vocab, (1, context), device=args.device)
        ttft, mspt = round_robin(models, ids, new_tokens=args.new_tokens, rounds=args.rounds)
        base = ("original", n_kv)
        print(f"\ncontext {context}")
        print(f"{'model':>10} {'KV heads':>8} {'KV B/token':>10} {'KV share':>8} {'TTFT s':>8} {'x orig':>7} "
              f"{'ms/token':>9} {'x orig':>7} {'x rope_pca':>10}")
        for key, model in models.items():
            mode, kv_heads = key
            kv = kv_bytes_per_token(model.config, dtype=dtype)
            vs_rope = f"{mspt[key] / mspt['rope_pca', kv_heads]:>10.2f}" if mode == "svd_a" else f"{'':>10}"
            print(f"{mode:>10} {kv_heads:>8} {kv:>10} {kv / full_bytes:>8.2f} {ttft[key]:>8.3f} "
                  f"{ttft[key] / ttft[base]:>7.2f} {mspt[key]:>9.2f} {mspt[key] / mspt[base]:>7.2f} {vs_rope}")


if __name__ == "__main__":
    main()
