"""Benchmark: retraining throughput (tokens/s) of a reduced student against the unmodified model
under the same training step, and the overhead of distillation (KD, Stage I) over NTP.

Every arm runs the library's own loss (``RetrainModule.stage_loss``) with its AdamW step, the same
batches and the same trainable set (Q/K/V/O in full, LoRA on the MLP); arms are timed round-robin
so machine-load drift hits all of them alike, and each number is a median over rounds.

    python experiments/bench_training.py                     # embedded tiny_mha, CPU
    python experiments/bench_training.py --device cuda --model smollm2_135m
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from contextlib import nullcontext

import torch
import yaml

from kv_latent.base_models import load_base_model
from kv_latent.config import ModelConfig, TrainConfig
from kv_latent.data.corpus import default_cache_dir
from kv_latent.surgery import build_student
from kv_latent.training.fit import resolve_precision
from kv_latent.training.module import RetrainModule


def make_arm(model, teacher, stage: str, cfg: TrainConfig):
    cfg = copy.deepcopy(cfg)
    cfg.stages = [stage]
    module = RetrainModule(copy.deepcopy(model), teacher, cfg, total_steps=1000)
    optimizer = module.configure_optimizers()["optimizer"]
    return module, optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny_mha", help="a conf/model/<name>.yaml")
    parser.add_argument("--k-dim", type=int, default=32)
    parser.add_argument("--v-dim", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per arm and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="auto", help="auto: bf16 autocast where supported, else fp32")
    args = parser.parse_args()

    model_cfg = ModelConfig(**yaml.safe_load(open(f"conf/model/{args.model}.yaml")))
    original, _ = load_base_model(model_cfg, cache_dir=default_cache_dir(), device=args.device)
    student = build_student(original, k_dim=args.k_dim, v_dim=args.v_dim, rope="freq_aware")
    cfg = TrainConfig(tokens=1, batch_size=args.batch_size, seq_len=args.seq_len, lora_rank=16, lora_alpha=32)
    precision = resolve_precision(args.precision, "gpu" if args.device.startswith("cuda") else "cpu")
    autocast = (
        torch.autocast(device_type=torch.device(args.device).type, dtype=torch.bfloat16)
        if precision.startswith("bf16")
        else nullcontext()
    )
    arms = {
        "original ntp": make_arm(original, None, "ntp", cfg),
        "student ntp": make_arm(student, None, "ntp", cfg),
        "student kd": make_arm(student, original, "kd", cfg),
        "student intra": make_arm(student, original, "intra", cfg),
    }
    for module, _ in arms.values():
        module.to(args.device).train()
    generator = torch.Generator().manual_seed(0)
    vocab = original.config.vocab_size
    batches = [
        {"input_ids": torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=generator).to(args.device)}
        for _ in range(args.steps)
    ]

    def step(module, optimizer, batch, stage):
        with autocast:
            loss = module.stage_loss(stage, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    for (module, optimizer), name in zip(arms.values(), arms):  # warm-up
        step(module, optimizer, batches[0], name.split()[1])
    rates = {name: [] for name in arms}
    for _ in range(args.rounds):
        for name, (module, optimizer) in arms.items():
            sync()
            start = time.perf_counter()
            for batch in batches:
                step(module, optimizer, batch, name.split()[1])
            sync()
            rates[name].append(args.steps * args.batch_size * args.seq_len / (time.perf_counter() - start))

    print(
        f"model={args.model} student k_dim={args.k_dim} v_dim={args.v_dim} device={args.device} "
        f"precision={precision} batch={args.batch_size}x{args.seq_len} steps={args.steps} rounds={args.rounds} "
        f"threads={torch.get_num_threads()}"
    )
    median = {name: statistics.median(r) for name, r in rates.items()}
    for name, rate in median.items():
        print(f"{name:>14}: {rate:9.0f} tokens/s")
    print(f"student / original (NTP) throughput: {median['student ntp'] / median['original ntp']:.2f}x")
    print(f"KD overhead over NTP (time per token): {median['student ntp'] / median['student kd']:.2f}x")
    print(f"Stage I overhead over NTP (time per token): {median['student ntp'] / median['student intra']:.2f}x")


if __name__ == "__main__":
    main()
