#!/usr/bin/env bash
# How the embedded tiny models were pretrained: on one GPU, conf/train/pretrain.yaml (16 epochs of
# the prose corpus, 872 steps of 64 x 1024 tokens) per model; with several budgets in TOKENS the
# best by val perplexity is exported into src/kv_latent/assets/<model>/ with its provenance.json
# (the export measures the quality bar: fp32 val ppl, unigram baseline, needle grid, val slice).
# Then a GPU check of the attention paths and of one retraining job.
# Usage: bash experiments/pretrain_tiny_gpu.sh OUT_DIR [TOKENS]   (TOKENS: comma-separated budgets)
set -euo pipefail
out=${1:?usage: pretrain_tiny_gpu.sh OUT_DIR [TOKENS]}
tokens=${2:-57147392}
runs=/tmp/kvl_pretrain
nvidia-smi --query-gpu=name,memory.total --format=csv
python3 -c "import torch, transformers, lightning; print('torch', torch.__version__, 'transformers', transformers.__version__, 'lightning', lightning.__version__)"
# eval.tasks=[]: lm-eval and its offline data need the registry; the needle grid still runs.
for model in tiny_mha tiny_gqa; do
  python3 src/run.py -m train=pretrain model=$model trainer=gpu logger=none output_root=$runs \
    data.eval_max_blocks=null eval.tasks=[] eval.efficiency.enabled=false train.tokens=$tokens
done
python3 - "$runs" <<'PY'
import json, sys
from pathlib import Path
from kv_latent.pipeline import export_embedded
for model in ("tiny_mha", "tiny_gqa"):
    recs = [json.loads(p.read_text()) for p in Path(sys.argv[1], "runs", model).glob("*/record.json")]
    for r in sorted(recs, key=lambda r: r["tokens_trained"]):
        print(model, r["tokens_trained"], "val/ppl %.3f" % r["metrics"]["val/ppl"], "%.0f s" % r["wall_time_s"],
              "%.0f tok/s" % r["metrics"]["train/tokens_per_s"])
    best = min(recs, key=lambda r: r["metrics"]["val/ppl"])
    print("export", model, best["tokens_trained"], export_embedded(Path(best["model_dir"]), best, name=model,
                                                                  cache_dir=Path(best["config"]["cache_dir"])))
PY
tar -C src/kv_latent/assets -cf /tmp/assets.tar tiny_mha tiny_gqa
split -b 15M -d /tmp/assets.tar "$out/assets.tar.part"
timeout 150 python3 experiments/bench_attention.py --device cuda --dtype bfloat16 --contexts 2048 8192 32768 --rounds 5 --new-tokens 64
python3 src/run.py model=tiny_gqa kv.k_dim=32 kv.v_dim=16 rope=freq_aware trainer=gpu logger=none output_root=$runs
cp "$runs"/runs/tiny_gqa/k32_v16_*/record.json "$out/retrain_gpu_record.json"
