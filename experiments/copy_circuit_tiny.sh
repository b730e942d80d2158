#!/usr/bin/env bash
# Give an embedded tiny model a copy circuit (induction heads) on the 2-core CPU, in three continued
# pre-training runs, and measure the quality bar after each (kv_latent.evaluation.base_model_quality:
# val perplexity, needle grid, copy probe):
#   1. experiments/copy_warmup.yaml: 64-token blocks, half repeat documents: the circuit forms;
#   2. experiments/copy_longctx.yaml, from step 1's model: 1024-token blocks, 30 % recall documents:
#      prose perplexity recovers, random sequences are copied, but the needle stays at 0 %;
#   3. experiments/copy_facts.yaml, from step 2's model: 128-token blocks, half recall documents:
#      the model retrieves facts by name, and the needle rises at 256 and 512 tokens.
# The shipped weights are left alone (nothing is exported); README "The embedded models" has the
# figures and why the result is not shipped.
# Usage: bash experiments/copy_circuit_tiny.sh [MODEL ...]   (default: tiny_mha tiny_gqa)
set -euo pipefail
runs=${KV_LATENT_OUTPUT:-/tmp/kvl_copy_circuit}
models=("$@")
[ ${#models[@]} -gt 0 ] || models=(tiny_mha tiny_gqa)
step() {  # step NAME MODEL [START_DIR]: run one step into its own output root; print its model's directory
  local name=$1 model=$2 start=${3:-}
  local from=(); [ -z "$start" ] || from=(model.source=hf "model.path=$start")
  KV_LATENT_OUTPUT=$runs/$name python src/run.py +experiment=$name model=$model "${from[@]}" >&2
  # The record of this step started from START_DIR (a rerun skips the job and rewrites nothing).
  python -c "import json, pathlib, sys
recs = [json.loads(p.read_text()) for p in pathlib.Path(sys.argv[1]).glob('*/record.json')]
print(max((r for r in recs if r['config']['model']['path'] == (sys.argv[2] or None)), key=lambda r: r['created'])['model_dir'])" \
    "$runs/$name/runs/$model" "$start"
}
for model in "${models[@]}"; do
  warm=$(step copy_warmup "$model")
  long=$(step copy_longctx "$model" "$warm")
  facts=$(step copy_facts "$model" "$long")
  for dir in "$warm" "$long" "$facts"; do
    python -c "import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
from kv_latent.evaluation import base_model_quality
m = AutoModelForCausalLM.from_pretrained(sys.argv[1])
q = base_model_quality(m, AutoTokenizer.from_pretrained(sys.argv[1]), cache_dir=None)['quality']
print(sys.argv[1], 'val ppl %.2f' % q['val_ppl_fp32'], 'needle', q['needle']['needle/mean'], 'copy', json.dumps(q['copy']))" "$dir"
  done
done
