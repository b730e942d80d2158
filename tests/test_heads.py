"""Head compression MHA -> GQA (DESIGN.md §5): exactness, stock checkpoints, the cache, refusals;
and the group moments of calibration it reads."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from test_core import fresh_process_diff, save_with_logits

from kv_latent import records
from kv_latent.calibration import GROUP_KINDS, STATS_VERSION, _tensor_hash, cached_second_moments, second_moments
from kv_latent.config import TrainConfig
from kv_latent.evaluation.baselines import model_fingerprint
from kv_latent.evaluation.efficiency import kv_bytes_per_token, measured_kv_bytes_per_token
from kv_latent.config import CALIBRATED_GQA_MODES
from kv_latent.heads import GQA_MODES, compress_heads
from kv_latent.modeling import KVLatentForCausalLM
from kv_latent.surgery import build_student
from kv_latent.training.module import ATTENTION_PROJECTIONS, prepare_student

D, VOCAB = 16, 97
VARIANTS = [(mode, False) for mode in GQA_MODES] + [("rope_pca", True)]  # (mode, query_aware)
VARIANT_IDS = [*GQA_MODES, "rope_pca-query_aware"]
IDS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
BLOCKS = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(1))  # calibration text
# Exact in float64, to float32 rounding: Llama's RMSNorm normalises in float32 even in a float64 model.
EXACT = 1e-6


def llama(*, n_kv: int, bias: bool = False, dtype: torch.dtype = torch.float32, seed: int = 0) -> LlamaForCausalLM:
    """A random Llama, 4 query heads of dim 16, weights large enough (std 0.1) for attention to matter;
    with ``bias``, random q/k/v/o biases."""
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=n_kv, head_dim=D, attention_bias=bias,
                         max_position_embeddings=256, initializer_range=0.1)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.bias"):
                p.normal_(0, 0.1)
    return model


def compress(original, mode: str, kv_heads: int, query_aware: bool = False):
    t = original.config.num_key_value_heads // kv_heads
    stats = second_moments(original, BLOCKS, group_size=t) if mode in CALIBRATED_GQA_MODES else None
    return compress_heads(original, mode=mode, kv_heads=kv_heads, stats=stats, query_aware=query_aware)


def reference(original, mode: str):
    """What a compression of ``original`` is compared with: ``original`` itself, or for ``svd_a``
    its full-dim KV-Latent twin, whose RoPE frequencies are rounded differently (~4e-7 apart in
    logits in float64)."""
    return build_student(original, k_dim=D, v_dim=D) if mode == "svd_a" else original


def logits_diff(a, b, ids=IDS) -> float:
    with torch.no_grad():
        return (a(ids).logits - b(ids).logits).abs().max().item()


def _columns(proj) -> torch.Tensor:
    """A projection's weight with its bias as a last column: (rows, in [+1]), float64."""
    w = proj.weight.detach().double()
    return w if proj.bias is None else torch.cat([w, proj.bias.detach().double()[:, None]], dim=1)


@torch.no_grad()
def shape_groups(model, t: int, *, keys: str, values: str, seed: int = 0):
    """Make each group of ``t`` consecutive KV heads of every layer (weights and biases):
    ``duplicate``: copies of its first head; ``complex``: its first head with every rotate_half pair
    times a random complex scalar (a 2x2 rotation-scaling of the pair's rows); ``low_rank``: heads
    that jointly span D dims (a random (tD, D) basis times random (D, in) coordinates)."""
    g = torch.Generator().manual_seed(seed)
    for layer in model.model.layers:
        for proj, kind in ((layer.self_attn.k_proj, keys), (layer.self_attn.v_proj, values)):
            x = _columns(proj)
            w = x.view(-1, t, D, x.shape[1])  # (G, t, D, I)
            if kind == "duplicate":
                w = w[:, :1].expand_as(w)
            elif kind == "complex":
                z = torch.complex(w[:, :1, : D // 2], w[:, :1, D // 2 :])  # (G, 1, D/2, I): first head's pairs
                size = (w.shape[0], t, D // 2, 1)
                scalars = torch.polar(0.5 + torch.rand(size, generator=g, dtype=torch.float64),
                                      6.3 * torch.rand(size, generator=g, dtype=torch.float64))
                scalars[:, 0] = 1
                w = torch.cat([(scalars * z).real, (scalars * z).imag], dim=2)
            else:
                basis = torch.randn(w.shape[0], t * D, D, generator=g, dtype=torch.float64) / D**0.5
                w = basis @ torch.randn(w.shape[0], D, w.shape[-1], generator=g, dtype=torch.float64) * x.std()
            x = w.reshape(-1, x.shape[1]).to(proj.weight.dtype)
            proj.weight.copy_(x[:, : proj.weight.shape[1]])
            if proj.bias is not None:
                proj.bias.copy_(x[:, -1])
    return model


# --- exactness -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode,query_aware", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("n_kv,bias", [(4, False), (2, True)], ids=["mha", "gqa-bias"])
def test_every_mode_at_full_heads_is_the_identity(mode, query_aware, n_kv, bias):
    original = llama(n_kv=n_kv, bias=bias)
    compressed = compress(original, mode, n_kv, query_aware)
    assert compressed.config.num_key_value_heads == n_kv
    assert logits_diff(compressed, original) <= 1e-5


GROUPINGS = [(4, 2, False), (4, 1, False), (2, 1, True)]  # (n_kv, kv_heads, bias)
GROUPING_IDS = ["mha-4to2", "mha-4to1", "gqa-2to1-bias"]


@pytest.mark.parametrize("mode,query_aware", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("n_kv,kv_heads,bias", GROUPINGS, ids=GROUPING_IDS)
def test_duplicated_heads_are_reconstructed_by_every_mode(mode, query_aware, n_kv, kv_heads, bias):
    original = shape_groups(llama(n_kv=n_kv, bias=bias, dtype=torch.float64), n_kv // kv_heads,
                            keys="duplicate", values="duplicate")
    assert logits_diff(compress(original, mode, kv_heads, query_aware), reference(original, mode)) <= EXACT


@pytest.mark.parametrize("n_kv,kv_heads,bias", GROUPINGS, ids=GROUPING_IDS)
def test_heads_differing_by_complex_scalars_need_rope_pca(n_kv, kv_heads, bias):
    """Keys of a group equal up to a complex scalar per rotate_half pair: ``rope_pca`` is exact,
    mean pooling is not. ``svd_a`` (post-RoPE keys of rank D) and ``svd_w`` (whose key basis,
    aligned with pooling, is then a complex scalar per pair too) are exact as well."""
    original = shape_groups(llama(n_kv=n_kv, bias=bias, dtype=torch.float64), n_kv // kv_heads,
                            keys="complex", values="duplicate")
    for mode, query_aware in VARIANTS[1:]:
        assert logits_diff(compress(original, mode, kv_heads, query_aware), reference(original, mode)) <= EXACT, mode
    assert logits_diff(compress(original, "mean_pool", kv_heads), original) > 0.5


@pytest.mark.parametrize("n_kv,kv_heads,bias", GROUPINGS, ids=GROUPING_IDS)
def test_group_values_of_rank_head_dim_fold_exactly(n_kv, kv_heads, bias):
    """A group's values (biases included) span D dims: the value PCA of ``svd_a`` and ``rope_pca``
    and the weight SVD of ``svd_w`` lose nothing (keys duplicated: exact anyway); mean pooling does."""
    original = shape_groups(llama(n_kv=n_kv, bias=bias, dtype=torch.float64), n_kv // kv_heads,
                            keys="duplicate", values="low_rank")
    for mode in ("svd_a", "rope_pca", "svd_w"):
        assert logits_diff(compress(original, mode, kv_heads), reference(original, mode)) <= EXACT, mode
    assert logits_diff(compress(original, "mean_pool", kv_heads), original) > 0.5


# --- the compressed models: checkpoints, cache, training ---------------------------------------------


def _run_python(code: str, env: dict) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_stock_modes_save_as_plain_llama_checkpoints(tmp_path):
    """``mean_pool``, ``svd_w``, ``rope_pca``: loaded by ``LlamaForCausalLM`` in a process where
    ``kv_latent`` cannot be imported, with the same logits."""
    original = llama(n_kv=4, bias=True)
    for mode in ("mean_pool", "svd_w", "rope_pca"):
        model = compress(original, mode, 2)
        assert type(model) is LlamaForCausalLM
        model.save_pretrained(tmp_path / mode)
        with torch.no_grad():
            torch.save(model(IDS).logits, tmp_path / mode / "logits.pt")
    assert json.loads((tmp_path / "svd_w" / "config.json").read_text())["model_type"] == "llama"
    blocker = tmp_path / "blocker" / "kv_latent"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('kv_latent is not installed')\n")
    code = f"""
        import sys, torch
        from transformers import LlamaForCausalLM
        for mode in ("mean_pool", "svd_w", "rope_pca"):
            m = LlamaForCausalLM.from_pretrained({str(tmp_path)!r} + "/" + mode)
            assert m.config.num_key_value_heads == 2 and m.config.model_type == "llama"
            diff = (m(torch.tensor({IDS.tolist()})).logits - torch.load({str(tmp_path)!r} + f"/{{mode}}/logits.pt"))
            print(mode, diff.abs().max().item())
        assert not any(name.startswith("kv_latent") for name in sys.modules)
        """
    env = {**os.environ, "PYTHONPATH": str(blocker.parent)}
    diffs = dict(line.split() for line in _run_python(code, env).strip().splitlines())
    assert diffs == {"mean_pool": "0.0", "svd_w": "0.0", "rope_pca": "0.0"}


def test_svd_a_saves_and_reloads_exactly(tmp_path):
    model = compress(llama(n_kv=4), "svd_a", 2)
    assert isinstance(model, KVLatentForCausalLM) and model.config.post_rope_key_heads == 4
    assert model.config.k_dim == model.config.v_dim == [D, D]
    saved = save_with_logits(model, tmp_path)
    assert fresh_process_diff(saved, package=True, tmp_path=tmp_path) == 0.0
    assert fresh_process_diff(saved, package=False, tmp_path=tmp_path) == 0.0


@pytest.mark.parametrize("mode", GQA_MODES)
def test_the_cache_holds_the_compressed_heads(mode):
    """After a prefill each layer caches 2 heads of D dims, the bytes match the config's count, and
    decoding from the cache equals one full forward."""
    model = compress(llama(n_kv=4), mode, 2)
    with torch.no_grad():
        out = model(IDS[:, :-3], use_cache=True)
        for layer in out.cache.layers:
            assert layer.keys.shape == layer.values.shape == (2, 2, 21, D)
        steps = []
        for i in range(21, 24):
            out = model(IDS[:, i : i + 1], cache=out.cache, use_cache=True)
            steps.append(out.logits)
        torch.testing.assert_close(torch.cat(steps, dim=1), model(IDS).logits[:, -3:], atol=1e-5, rtol=1e-5)
    assert kv_bytes_per_token(model.config, dtype=torch.float32) == measured_kv_bytes_per_token(model, IDS)
    assert kv_bytes_per_token(model.config, dtype=torch.float32) == 2 * 2 * (D + D) * 4


def test_retraining_trains_the_post_rope_projection():
    model = prepare_student(compress(llama(n_kv=4), "svd_a", 2), TrainConfig(lora_rank=0))
    assert "post_rope_proj" in ATTENTION_PROJECTIONS
    assert all(p.requires_grad for name, p in model.named_parameters() if ".post_rope_proj." in name)


def test_a_full_dim_kv_latent_original_compresses_like_its_llama():
    original = llama(n_kv=4, bias=True)
    student = build_student(original, k_dim=D, v_dim=D)
    for mode in GQA_MODES:
        expected, got = compress(original, mode, 2), compress(student, mode, 2)
        assert type(got) is type(expected) and logits_diff(got, expected) <= 1e-5, mode


def test_a_mistral_without_sliding_window_compresses_to_a_llama():
    config = MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=D, sliding_window=None,
                           initializer_range=0.1)
    original = MistralForCausalLM(config).eval()
    for mode in GQA_MODES:
        compressed = compress(original, mode, 2)
        assert type(compressed) is (KVLatentForCausalLM if mode == "svd_a" else LlamaForCausalLM)
        assert logits_diff(compressed, original) <= 1e-5, mode


# --- refusals ------------------------------------------------------------------------------------


def test_bad_requests_name_the_key():
    original = llama(n_kv=4)
    stats = second_moments(original, BLOCKS[:2], group_size=2)
    for kv_heads in (0, -2, 8, 3, 2.0):
        with pytest.raises(ValueError, match=r"gqa\.kv_heads=.* must divide the original's 4 KV heads"):
            compress_heads(original, mode="mean_pool", kv_heads=kv_heads)
    with pytest.raises(ValueError, match=r"gqa\.mode='svd' is unknown"):
        compress_heads(original, mode="svd", kv_heads=2)
    for mode in CALIBRATED_GQA_MODES:
        with pytest.raises(ValueError, match=rf"gqa\.mode='{mode}' at gqa\.kv_heads=2 needs calibration statistics"):
            compress_heads(original, mode=mode, kv_heads=2)
        with pytest.raises(ValueError, match="group moments of 4 KV heads .* got group_size=2"):
            compress_heads(original, mode=mode, kv_heads=1, stats=stats)
        with pytest.raises(ValueError, match="got group_size=None"):
            compress_heads(original, mode=mode, kv_heads=2, stats=second_moments(original, BLOCKS[:2]))
    with pytest.raises(ValueError, match="do not fit the model"):
        compress_heads(original, mode="svd_a", kv_heads=2,
                       stats=dataclasses.replace(stats, layers=stats.layers[:1]))
    with pytest.raises(ValueError, match="query_aware applies to gqa.mode='rope_pca' only"):
        compress_heads(original, mode="svd_w", kv_heads=2, query_aware=True)


def test_unsupported_originals_are_refused():
    original = llama(n_kv=4)
    with pytest.raises(ValueError, match="already reduced"):
        compress_heads(build_student(original, k_dim=8, v_dim=D), mode="mean_pool", kv_heads=2)
    with pytest.raises(ValueError, match="post_rope_key_heads"):
        compress_heads(compress(original, "svd_a", 2), mode="mean_pool", kv_heads=1)
    scaled = LlamaConfig(**{**original.config.to_dict(),
                            "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10_000.0}})
    with pytest.raises(ValueError, match="rope_type='linear'"):
        compress_heads(LlamaForCausalLM(scaled), mode="mean_pool", kv_heads=2)
    mistral = MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=D)
    with pytest.raises(ValueError, match="sliding_window=4096"):
        compress_heads(MistralForCausalLM(mistral), mode="mean_pool", kv_heads=1)


# --- calibration: group moments ------------------------------------------------------------------


def test_group_moments_are_those_of_the_concatenated_heads_and_skip_padding():
    model = llama(n_kv=4, bias=True)
    moments = second_moments(model, IDS, batch_size=1, group_size=2)
    layer, attn = moments.layer(0), model.model.layers[0].self_attn
    with torch.no_grad():
        hidden = model.model.layers[0].input_layernorm(model.model.embed_tokens(IDS))  # (B, T, hidden)
        k = attn.k_proj(hidden).view(2, 24, 4, D).transpose(1, 2)  # (B, n_kv, T, D)
        v = attn.v_proj(hidden)  # (B, T, n_kv * D)
        cos, sin = model.model.rotary_emb(hidden, torch.arange(24)[None])
        _, k_rope = apply_rotary_pos_emb(k, k, cos, sin)

    def group_moment(x):  # (B, T, n_kv * D) -> (2, 2D, 2D)
        x = x.reshape(-1, 2, 2 * D).double().transpose(0, 1)  # (groups, tokens, 2D)
        return x.transpose(1, 2) @ x / x.shape[1]

    torch.testing.assert_close(layer.k_group, group_moment(k.transpose(1, 2)))
    torch.testing.assert_close(layer.k_rope_group, group_moment(k_rope.transpose(1, 2)))
    torch.testing.assert_close(layer.v_group, group_moment(v))
    torch.testing.assert_close(layer.k_group[:, :D, :D], layer.k[::2])  # diagonal blocks: the per-head moments
    assert moments.group_size == layer.group_size == 2 and second_moments(model, IDS).group_size is None

    mask = torch.ones_like(IDS)
    mask[:, 20:] = 0  # right padding: causal attention lets the first 20 tokens ignore it
    padded = second_moments(model, IDS, attention_mask=mask, group_size=2)
    cut = second_moments(model, IDS[:, :20], group_size=2)
    for kind in GROUP_KINDS:
        torch.testing.assert_close(getattr(padded.layer(1), kind), getattr(cut.layer(1), kind))


def test_group_moments_are_cached_apart_and_checked(tmp_path):
    model = llama(n_kv=4)
    plain = cached_second_moments(model, BLOCKS, cache_dir=tmp_path, name="toy")
    key = records.config_hash({  # the key files without group moments had before group_size existed
        "model": {"fingerprint": model_fingerprint(model)},
        "kv": {"stats_version": STATS_VERSION},
        "data": {"blocks": _tensor_hash(BLOCKS), "mask": None},
    })
    assert (tmp_path / f"toy-{key}.safetensors").exists() and plain.group_size is None
    grouped = cached_second_moments(model, BLOCKS, cache_dir=tmp_path, name="toy", group_size=2)
    again = cached_second_moments(model, BLOCKS, cache_dir=tmp_path, name="toy", group_size=2)
    assert len(list(tmp_path.glob("toy-*.safetensors"))) == 2
    assert again.group_size == 2 and all(torch.equal(getattr(again.layer(1), kind), getattr(grouped.layer(1), kind))
                                         for kind in GROUP_KINDS)
    grouped.check_matches(model.config)
    torn = dataclasses.replace(grouped, layers=[grouped.layer(0), dataclasses.replace(grouped.layer(1), v_group=None)])
    with pytest.raises(ValueError, match="do not fit the model"):
        torn.check_matches(model.config)
    with pytest.raises(ValueError, match="group_size=3 must divide the model's 4 KV heads"):
        second_moments(model, BLOCKS, group_size=3)


def test_every_configurable_mode_has_a_compressor():
    from kv_latent.config import GQAMode

    assert {str(m) for m in GQAMode} - {"keep"} == set(GQA_MODES)
    assert CALIBRATED_GQA_MODES <= set(GQA_MODES)
