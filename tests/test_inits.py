"""Data-aware and frequency-preserving inits (DESIGN.md §2.6), calibration, and the init-ablation study."""

import itertools

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import ROOT, compose_config
from test_core import fresh_process_diff, save_with_logits

from kv_latent import calibration, records
from kv_latent.calibration import calibrate, calibration_blocks, cached_second_moments, second_moments
from kv_latent.config import CALIBRATED_INITS, ConfigError, DataConfig, QKInit, VOInit
from kv_latent.data.blocks import load_blocks
from kv_latent.modeling import apply_rope
from kv_latent.rope import inv_freq, pair_inv_freq
from kv_latent.rules import check_ablation
from kv_latent.surgery import QK_INITS, VO_INITS, build_student

D, THETA, VOCAB = 64, 10_000.0, 4096  # the tiny models' head_dim; the shipped tokenizer's vocabulary


def llama(*, n_kv: int, layers: int = 2, bias: bool = False, seed: int = 0) -> LlamaForCausalLM:
    """A random Llama with the tiny models' head_dim (64) and vocabulary, 4 query heads."""
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=n_kv, head_dim=D, attention_bias=bias,
                         max_position_embeddings=256)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module", params=[4, 2], ids=["mha", "gqa"])
def original(request):
    return llama(n_kv=request.param)


@pytest.fixture(scope="module")
def stats(original):
    torch.manual_seed(1)
    return second_moments(original, torch.randint(0, VOCAB, (8, 48)), batch_size=4)


def logits_diff(a, b, ids) -> float:
    with torch.no_grad():
        return (a(ids).logits - b(ids).logits).abs().max().item()


def test_choices_are_the_registries():
    assert set(QKInit.__members__) == set(QK_INITS) and set(VOInit.__members__) == set(VO_INITS)
    assert CALIBRATED_INITS <= set(QK_INITS) | set(VO_INITS)


# --- identities and exactness -----------------------------------------------------------------


@pytest.mark.parametrize("qk_init,vo_init", [("qk_energy", "strided"), ("strided", "pca"), ("qk_energy", "pca")])
def test_data_aware_inits_at_full_dims_are_the_identity(original, stats, qk_init, vo_init):
    student = build_student(original, k_dim=D, v_dim=D, qk_init=qk_init, vo_init=vo_init, stats=stats)
    assert logits_diff(student, original, torch.randint(0, VOCAB, (2, 40))) <= 1e-5


@pytest.mark.parametrize("bias", [False, True])
def test_pca_is_exact_when_the_value_rank_is_at_most_v_dim(bias):
    """Every KV head's values span 8 dims (bias included): pca at v_dim=8 loses nothing."""
    original, rank = llama(n_kv=2, bias=bias), 8
    for layer in original.model.layers:
        v_proj = layer.self_attn.v_proj
        basis = torch.randn(2, D, rank)  # (n_kv, D, rank): each head's value subspace
        with torch.no_grad():
            v_proj.weight.copy_((basis @ torch.randn(2, rank, 64)).reshape(2 * D, 64))
            if bias:
                v_proj.bias.copy_((basis @ torch.randn(2, rank, 1)).reshape(-1))
    torch.manual_seed(2)
    moments = second_moments(original, torch.randint(0, VOCAB, (4, 32)))
    student = build_student(original, k_dim=D, v_dim=rank, vo_init="pca", stats=moments)
    assert student.model.layers[0].self_attn.v_proj.weight.shape == (2 * rank, 64)
    assert logits_diff(student, original, torch.randint(0, VOCAB, (2, 40))) <= 1e-5
    strided = build_student(original, k_dim=D, v_dim=rank)
    assert logits_diff(strided, original, torch.randint(0, VOCAB, (2, 40))) > 1e-2  # the stride is not exact


# --- which channels are kept, at which frequencies --------------------------------------------


@pytest.mark.parametrize("k_dim,pairs", [(32, [*range(8, 24, 2), *range(24, 32)]),  # DESIGN.md §2.2
                                         (16, [8, 12, 16, 20, 24, 26, 28, 30])])
def test_freq_matched_keeps_the_original_frequencies_of_freq_aware(original, k_dim, pairs):
    student = build_student(original, k_dim=k_dim, v_dim=D, qk_init="freq_matched", rope="freq_aware")
    original_freqs = inv_freq("standard", dim=D, theta=THETA)
    for layer in student.model.layers:
        got = layer.self_attn.rope.inv_freq
        assert torch.equal(got, inv_freq("freq_aware", dim=k_dim, theta=THETA))
        assert torch.equal(got, original_freqs[pairs])
    assert student.config.rope_inv_freq is None  # the schedule itself: nothing per head to store


def _energy_pairs(layer_stats, k_dim: int) -> torch.Tensor:
    score = layer_stats.q_pair_energy() * layer_stats.k_pair_energy()  # (n_kv, D/2)
    return score.topk(k_dim // 2, dim=-1).indices.sort(dim=-1).values  # (n_kv, k_dim/2)


def test_qk_energy_keeps_the_most_energetic_pairs_at_their_frequencies(original, stats):
    student = build_student(original, k_dim=16, v_dim=D, qk_init="qk_energy", stats=stats)
    chosen = [_energy_pairs(stats.layer(i), 16) for i in range(len(student.model.layers))]
    assert any(not (pairs == pairs[:1]).all() for pairs in chosen)  # each KV head chooses its own pairs
    for i, (layer, pairs) in enumerate(zip(student.model.layers, chosen)):
        expected = pair_inv_freq(pairs, head_dim=D, theta=THETA).float()  # (n_kv, 8)
        assert torch.equal(layer.self_attn.rope.inv_freq, expected)
        assert torch.equal(expected, inv_freq("standard", dim=D, theta=THETA)[pairs])
        assert torch.tensor(student.config.rope_inv_freq[i]).float().equal(expected)


def _rotated_qk(attn, hidden, pos, cos_sin, width):
    """Post-RoPE queries (B, n_h, T, width) and keys (B, n_kv, T, width) of one attention module."""
    b, t = hidden.shape[:2]
    q = attn.q_proj(hidden).view(b, t, -1, width).transpose(1, 2)
    k = attn.k_proj(hidden).view(b, t, -1, width).transpose(1, 2)
    return apply_rope(q, k, *cos_sin)


@pytest.mark.parametrize("qk_init,rope",
                         [("strided", "standard"), ("freq_matched", "freq_aware"), ("qk_energy", "standard")])
def test_kept_channels_score_as_in_the_original(original, stats, qk_init, rope):
    """Pre-softmax scores at init: the student's, rescaled, equal the original's on the kept channels."""
    k_dim, n_kv = 16, original.config.num_key_value_heads
    student = build_student(original, k_dim=k_dim, v_dim=D, qk_init=qk_init, rope=rope, stats=stats)
    pairs = {
        "strided": torch.arange(0, D // 2, D // k_dim).expand(n_kv, -1),
        "freq_matched": torch.tensor([8, 12, 16, 20, 24, 26, 28, 30]).expand(n_kv, -1),
        "qk_energy": _energy_pairs(stats.layer(1), k_dim),
    }[qk_init]
    channels = torch.cat([pairs, pairs + D // 2], dim=-1)  # (n_kv, k_dim), original channel of each position
    hidden, pos = torch.randn(2, 12, 64), torch.arange(12)[None]
    t_attn, s_attn = original.model.layers[1].self_attn, student.model.layers[1].self_attn
    with torch.no_grad():
        q_t, k_t = _rotated_qk(t_attn, hidden, pos, original.model.rotary_emb(hidden, pos), D)
        q_s, k_s = _rotated_qk(s_attn, hidden, pos, s_attn.rope(hidden, pos), k_dim)
    group = q_t.shape[1] // n_kv
    index_k = channels[None, :, None, :].expand(2, -1, 12, -1)  # (B, n_kv, T, k_dim)
    k_kept = k_t.gather(-1, index_k)
    q_kept = q_t.gather(-1, channels.repeat_interleave(group, dim=0)[None, :, None, :].expand(2, -1, 12, -1))
    original_scores = q_kept @ k_kept.repeat_interleave(group, dim=1).transpose(-1, -2) * D**-0.5
    student_scores = q_s @ k_s.repeat_interleave(group, dim=1).transpose(-1, -2) * s_attn.scaling
    torch.testing.assert_close(student_scores * (k_dim / D) ** 0.5, original_scores, atol=1e-5, rtol=1e-5)


# --- the model: per-head frequencies save, reload and decode ----------------------------------


def test_per_head_frequencies_survive_save_and_load_without_the_package(tmp_path):
    original = llama(n_kv=2)
    torch.manual_seed(3)
    moments = second_moments(original, torch.randint(0, VOCAB, (4, 32)))
    student = build_student(original, k_dim=16, v_dim=8, qk_init="qk_energy", vo_init="pca", stats=moments)
    saved = save_with_logits(student, tmp_path)
    assert fresh_process_diff(saved, package=True, tmp_path=tmp_path) == 0.0
    assert fresh_process_diff(saved, package=False, tmp_path=tmp_path) == 0.0


@pytest.mark.parametrize("k_dim,v_dim", [(16, 32), (32, 16)])
def test_per_head_frequencies_decode_as_a_full_forward(original, stats, k_dim, v_dim):
    """Prefill (padded fused kernel) then decode (unpadded grouped path) equals one full forward."""
    student = build_student(original, k_dim=k_dim, v_dim=v_dim, qk_init="qk_energy", stats=stats)
    ids = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        full = student(ids).logits[:, -3:]
        out = student(ids[:, :-3], use_cache=True)
        steps = []
        for i in range(17, 20):
            out = student(ids[:, i : i + 1], cache=out.cache, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_surgery_asks_for_statistics_and_checks_them(original, stats):
    with pytest.raises(ValueError, match="need calibration statistics"):
        build_student(original, k_dim=16, v_dim=D, qk_init="qk_energy")
    with pytest.raises(ValueError, match="do not fit the model"):
        build_student(llama(n_kv=1), k_dim=16, v_dim=D, qk_init="qk_energy", stats=stats)
    with pytest.raises(ConfigError, match="needs rope=freq_aware"):
        build_student(original, k_dim=16, v_dim=D, qk_init="freq_matched")
    with pytest.raises(ValueError, match="kv.vo_init='svd' is unknown"):
        build_student(original, k_dim=16, v_dim=D, vo_init="svd")


# --- calibration --------------------------------------------------------------------------------


def test_second_moments_are_the_projections_moments_and_skip_padding(original):
    ids = torch.randint(0, VOCAB, (3, 30))
    moments = second_moments(original, ids, batch_size=2)
    layer = original.model.layers[0]
    with torch.no_grad():
        q = layer.self_attn.q_proj(layer.input_layernorm(original.model.embed_tokens(ids)))  # (3, 30, n_h * D)
    q = q.reshape(-1, 4, D).double()  # (tokens, n_h, D)
    torch.testing.assert_close(moments.layer(0).q, torch.einsum("thd,the->hde", q, q) / q.shape[0])
    assert moments.tokens == 90 and moments.layer(1).o.shape == (4, D, D)
    assert moments.layer(1).q_pair_energy().shape == (original.config.num_key_value_heads, D // 2)

    mask = torch.ones_like(ids)
    mask[:, 20:] = 0  # right padding: causal attention lets the first 20 tokens ignore it
    padded = second_moments(original, ids, attention_mask=mask)
    cut = second_moments(original, ids[:, :20])
    for kind in ("q", "k", "v", "o"):
        torch.testing.assert_close(getattr(padded.layer(1), kind), getattr(cut.layer(1), kind))


def test_calibration_is_cached_and_keyed_by_settings(tmp_path, cache_dir, monkeypatch):
    model, computed = llama(n_kv=2), []
    real = calibration.second_moments

    def counting(*args, **kwargs):
        computed.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(calibration, "second_moments", counting)
    root = tmp_path / "calibration"
    settings = dict(data=DataConfig(cache_dir=str(cache_dir), seq_len=32), cache_dir=root, name="toy")
    first = calibrate(model, tokens=128, seq_len=32, **settings)
    (path,) = root.glob("toy-*.safetensors")
    again = calibrate(model, tokens=128, seq_len=32, **settings)
    assert len(computed) == 1 and again.tokens == first.tokens == 128
    assert torch.equal(again.layer(1).o, first.layer(1).o)
    path.write_bytes(b"torn")  # an unreadable file is computed again, not read
    assert torch.equal(calibrate(model, tokens=128, seq_len=32, **settings).layer(1).o, first.layer(1).o)
    assert len(computed) == 2
    calibrate(model, tokens=192, seq_len=32, **settings)  # more tokens
    calibrate(model, tokens=128, seq_len=64, **settings)  # other blocks
    blocks = torch.randint(0, VOCAB, (2, 16))
    cached_second_moments(model, blocks, cache_dir=root, name="toy")
    cached_second_moments(llama(n_kv=2, seed=1), blocks, cache_dir=root, name="toy")  # other weights
    assert len(computed) == 6 and len(list(root.glob("toy-*.safetensors"))) == 5


def test_calibration_blocks_are_the_first_train_tokens(cache_dir):
    data = DataConfig(cache_dir=str(cache_dir), seq_len=64, recall_fraction=0.3)
    blocks = calibration_blocks(data, tokens=100, seq_len=32)  # ceil(100 / 32) = 4 blocks
    prose = load_blocks(DataConfig(cache_dir=str(cache_dir), seq_len=32), "train")
    assert torch.equal(blocks, prose[:4])
    with pytest.raises(ConfigError, match="kv.calib_tokens=10000000 needs"):
        calibration_blocks(data, tokens=10_000_000, seq_len=32)


# --- the job: wiring, names, the study ----------------------------------------------------------


def test_a_job_calibrates_only_when_an_init_needs_it(tmp_path, cache_dir):
    from kv_latent import base_models
    from kv_latent.pipeline import calibration_stats, make_job

    base = [f"output_root={tmp_path}", f"cache_dir={cache_dir}", "logger=none", "data.seq_len=32", "train.seq_len=32",
            "kv.calib_tokens=256", "kv.calib_seq_len=32"]
    plain = make_job(*compose_config("config", base))
    assert calibration_stats(plain, None, None, settings=plain.cfg.kv, name="tiny_mha") is None
    job = make_job(*compose_config("config", [*base, "kv.k_dim=32", "kv.qk_init=qk_energy"]))
    original, tokenizer = base_models.load_base_model(job.cfg.model, cache_dir=job.cache_dir)
    stats = calibration_stats(job, original, tokenizer, settings=job.cfg.kv, name="tiny_mha")
    assert stats.tokens == 256 and len(list((tmp_path / "calibration").glob("tiny_mha-*.safetensors"))) == 1
    assert job.run_dir.parent.name == "tiny_mha" and job.run_dir.name.startswith("k32-qk_energy_v64_original_keep_")


def test_run_names_show_the_inits_but_keep_the_strided_ones():
    config = {"model": {"name": "m", "head_dim": 64}, "rope": {"schedule": "standard"}, "gqa": {"mode": "keep"},
              "train": {"stages": ["intra", "ntp"]}}
    old = {**config, "kv": {"k_dim": 32, "v_dim": 16, "init": "strided"}}
    new = {**config, "kv": {"k_dim": 32, "v_dim": 16, "qk_init": "strided", "vo_init": "strided"}}
    assert records.run_name(old).rsplit("-", 1)[0] == records.run_name(new).rsplit("-", 1)[0] == (
        "m/k32_v16_standard_keep_intra+ntp")
    both = {**config, "kv": {"k_dim": 32, "v_dim": 16, "qk_init": "qk_energy", "vo_init": "pca"}}
    # qk_energy keeps each pair at its original frequency: the name says so
    assert records.run_name(both).startswith("m/k32-qk_energy_v16-pca_original_keep_intra+ntp-")


@pytest.mark.parametrize("study, jobs", [("init_ablation", 2 * 14 * 2), ("gqa_conversion", 2 * 5 * 2),
                                         ("equal_cache", 2 * 6), ("k_versus_v", 3 * 2 * 13)])
def test_every_point_of_a_study_is_valid_and_distinct(study, jobs):
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    overrides = [f"+experiment={study}"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    swept = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    axes = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] for o in swept]
    seen = set()
    for point in itertools.product(*axes):
        typed, container = compose_config("config", overrides + list(point))
        check_ablation(typed)
        seen.add(records.config_hash(container))
    assert len(seen) == jobs
