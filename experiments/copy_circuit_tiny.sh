#!/usr/bin/env bash
# Give an embedded tiny model a copy circuit (induction heads) and in-context retrieval on the 2-core
# CPU, in four continued pre-training runs, and measure the quality bar after each
# (kv_latent.evaluation.base_model_quality: val perplexity, needle grid, copy probe):
#   1. experiments/copy_warmup.yaml: 64-token blocks, half repeat documents: the circuit forms;
#   2. experiments/copy_longctx.yaml, from step 1's model: 1024-token blocks, 30 % recall documents:
#      prose perplexity recovers, random sequences are copied, but the needle stays at 0 %;
#   3. experiments/copy_facts.yaml, from step 2's model: 128-token blocks, half recall documents:
#      the model retrieves facts by name, and the needle rises at 256 and 512 tokens;
#   4. experiments/copy_extend.yaml, from step 3's model: 1024-token blocks, half fact documents:
#      retrieval extends to the whole window and prose perplexity recovers.
# With EXPORT=1 the four models are then exported in order into src/kv_latent/assets/<model>
# (kv_latent.pipeline.export_embedded), each provenance.json nesting the one before under "init".
# The shipped weights are the result of EXPORT=1 run on the GPU-pretrained ones
# (experiments/pretrain_tiny_gpu.sh); README "The embedded models" has the figures.
# Usage: [EXPORT=1] bash experiments/copy_circuit_tiny.sh [MODEL ...]   (default: tiny_mha tiny_gqa)
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
  extend=$(step copy_extend "$model" "$facts")
  # The quality bar of each step's model; with EXPORT=1 measured by the export, in chain order.
  python -c "import json, os, sys
from pathlib import Path
from transformers import AutoModelForCausalLM, AutoTokenizer
from kv_latent.evaluation import base_model_quality
from kv_latent.pipeline import export_embedded
for model_dir in map(Path, sys.argv[2:]):
    if os.environ.get('EXPORT') == '1':
        record = json.loads((model_dir.parent / 'record.json').read_text())
        cache_dir = Path(record['config']['cache_dir'])
        target = export_embedded(model_dir, record, name=sys.argv[1], cache_dir=cache_dir)
        q = json.loads((target / 'provenance.json').read_text())['quality']
    else:
        m, tok = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
        q = base_model_quality(m, tok, cache_dir=None)['quality']
    needle = {k: v for k, v in q['needle'].items() if k.endswith('mean')}
    print(model_dir, 'val ppl %.2f' % q['val_ppl_fp32'], 'needle', json.dumps(needle), 'copy', json.dumps(q['copy']))" \
    "$model" "$warm" "$long" "$facts" "$extend"
done
