"""The shipped tiny base models: they load offline and reproduce their recorded val perplexity."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from kv_latent.base_models import ASSETS_DIR, load_base_model
from kv_latent.config import ModelConfig
from kv_latent.evaluation.perplexity import perplexity

MODELS = ["tiny_mha", "tiny_gqa"]
# The first 8 val blocks of 1024 tokens (shipped tokenizer), so the test needs no corpus download.
VAL_SLICE = Path(__file__).parent / "fixtures" / "val_slice_8x1024.npy"


@pytest.mark.parametrize("name", MODELS)
def test_shipped_model_reproduces_recorded_val_slice_perplexity(name, tmp_path):
    cfg = ModelConfig(**yaml.safe_load(open(f"conf/model/{name}.yaml")))
    model, tokenizer = load_base_model(cfg, cache_dir=tmp_path)
    provenance = json.loads((ASSETS_DIR / name / "provenance.json").read_text())
    recorded = provenance["val_slice"]
    blocks = torch.from_numpy(np.load(VAL_SLICE).astype(np.int64))
    assert list(blocks.shape) == [recorded["blocks"], recorded["seq_len"]]
    got = perplexity(model, blocks, batch_size=4)
    assert got["ppl"] == pytest.approx(recorded["ppl"], rel=1e-4)
    # Far better than the unigram baseline measured on the same split.
    assert got["ppl"] < provenance["quality"]["unigram_val_ppl"] / 10
    assert provenance["tokens_seen"] == cfg.pretrain_tokens


@pytest.mark.parametrize("name", MODELS)
def test_shipped_model_size_and_architecture(name):
    assert (ASSETS_DIR / name / "model.safetensors").stat().st_size <= 30 * 2**20
    config = json.loads((ASSETS_DIR / name / "config.json").read_text())
    cfg = yaml.safe_load(open(f"conf/model/{name}.yaml"))
    assert config["head_dim"] == 64 and config["max_position_embeddings"] >= 1024
    assert config["num_key_value_heads"] == cfg["num_key_value_heads"]
