#!/usr/bin/env bash
# The GPU part of how the embedded tiny models were made (README, "The embedded models"), as one
# device-session script: pretrain both from scratch and export them (src/pretrain.py recipe=scratch,
# conf/recipe/scratch.yaml; the export measures the quality bar into provenance.json), pack the
# assets to bring back, then check the attention paths and one retraining job on the GPU.
# Retrieval comes after, on the CPU: python src/pretrain.py recipe=copy_circuit model=<name> export=true.
# Usage: bash experiments/pretrain_tiny_gpu.sh OUT_DIR
set -euo pipefail
out=${1:?usage: pretrain_tiny_gpu.sh OUT_DIR}
runs=/tmp/kvl_pretrain
nvidia-smi --query-gpu=name,memory.total --format=csv
for model in tiny_mha tiny_gqa; do
  python3 src/pretrain.py recipe=scratch model=$model trainer=gpu output_root=$runs export=true
done
tar -C src/kv_latent/assets -cf /tmp/assets.tar tiny_mha tiny_gqa
split -b 15M -d /tmp/assets.tar "$out/assets.tar.part"
timeout 150 python3 experiments/bench_attention.py --device cuda --dtype bfloat16 --contexts 2048 8192 32768 --rounds 5 --new-tokens 64
python3 src/run.py model=tiny_gqa kv.k_dim=32 kv.v_dim=16 rope=freq_aware trainer=gpu logger=none output_root=$runs
cp "$runs"/runs/tiny_gqa/k32_v16_*/record.json "$out/retrain_gpu_record.json"
