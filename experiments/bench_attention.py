"""Benchmark: prefill (TTFT) and decode (ms/token) of KV-Latent students at several (k_dim, v_dim),
side by side in one process, as ratios to the symmetric full-dim (64, 64) student; beside each
strided student with reduced keys, a ``qk_energy`` one (per-KV-head RoPE frequencies, DESIGN.md
§2.6) as a ratio to it.

Asymmetric configs must be at least as fast as the symmetric config of their larger dim (the
attention pads the smaller side so fused kernels stay in use), and per-head frequencies must cost
nothing measurable. Students are measured round-robin, so drift in machine load hits all of them
alike; each number is a median over rounds.

    python experiments/bench_attention.py                 # CPU, tiny architecture, 2K and 8K
    python experiments/bench_attention.py --device cuda --dtype bfloat16 --contexts 2048 8192 32768
"""

from __future__ import annotations

import argparse

import torch

from benchlib import add_model_args, describe, random_llama, round_robin
from kv_latent.calibration import second_moments
from kv_latent.evaluation.efficiency import kv_bytes_per_token
from kv_latent.surgery import build_student

DIMS = [(64, 64), (32, 32), (16, 16), (32, 64), (64, 32)]
INITS = ["strided", "qk_energy"]  # qk_energy only where keys are reduced (at full width it is strided)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser, contexts=[2048, 8192])
    parser.add_argument("--gqa-groups", type=int, default=1, help="query heads per KV head")
    args = parser.parse_args()

    dtype = getattr(torch, args.dtype)
    original = random_llama(args, gqa_groups=args.gqa_groups)
    stats = second_moments(original, torch.randint(0, args.vocab, (4, 256), device=args.device))
    students = {
        (dims, init): build_student(original, k_dim=dims[0], v_dim=dims[1], qk_init=init, stats=stats)
        for dims in DIMS for init in INITS if init == "strided" or dims[0] < 64
    }
    print(describe(args, original))
    for context in args.contexts:
        ids = torch.randint(0, args.vocab, (1, context), device=args.device)
        ttft, mspt = round_robin(students, ids, new_tokens=args.new_tokens, rounds=args.rounds)
        base = (DIMS[0], "strided")
        print(f"\ncontext {context}")
        print(f"{'':>23}{'strided':^40}| {'qk_energy':^34}")
        print(f"{'k_dim/v_dim':>12} {'KV B/token':>10} {'TTFT s':>8} {'x (64,64)':>9} {'ms/token':>9} "
              f"{'x (64,64)':>9} | {'TTFT s':>8} {'x strided':>9} {'ms/token':>9} {'x strided':>9}")
        for dims in DIMS:
            strided = (dims, "strided")
            t, m = ttft[strided], mspt[strided]
            kv = kv_bytes_per_token(students[strided].config, dtype=dtype)
            row = (f"{dims[0]:>5}/{dims[1]:<6} {kv:>10} {t:>8.3f} {t / ttft[base]:>9.2f} {m:>9.2f} "
                   f"{m / mspt[base]:>9.2f} | ")
            energy = (dims, "qk_energy")
            if energy in students:
                te, me = ttft[energy], mspt[energy]
                row += f"{te:>8.3f} {te / t:>9.2f} {me:>9.2f} {me / m:>9.2f}"
            else:
                row += f"{'(full-width keys: strided)':>38}"
            print(row)


if __name__ == "__main__":
    main()
