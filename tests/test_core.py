"""Core library: RoPE schedules, the KV-Latent model, surgery, KV accounting, config rules."""

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import kv_latent
from kv_latent.config import ConfigError, ModelConfig
from kv_latent.rules import check_kv_dims
from kv_latent.evaluation.efficiency import kv_bytes_per_token, measured_kv_bytes_per_token
from kv_latent.modeling import KVLatentForCausalLM
from kv_latent.rope import autocorrelation, inv_freq
from kv_latent.surgery import build_student

THETA = 10_000.0


def tiny_llama(*, n_kv: int, head_dim: int = 16, layers: int = 2, seed: int = 0, bias: bool = False):
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=n_kv,
        head_dim=head_dim,
        attention_bias=bias,
        max_position_embeddings=256,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(params=[4, 2], ids=["mha", "gqa"])
def original(request):
    return tiny_llama(n_kv=request.param)


# --- RoPE schedules -------------------------------------------------------------------------


@pytest.mark.parametrize("d", [8, 16, 32, 64, 128])
def test_inv_freq_matches_formulas(d):
    standard = [THETA ** (-i / d) for i in range(0, d, 2)]
    arr = list(range(d // 4, 3 * d // 4, 2)) + list(range(3 * d // 4, d))
    freq_aware = [THETA ** (-a / d) for a in arr]
    torch.testing.assert_close(inv_freq("standard", dim=d, theta=THETA), torch.tensor(standard))
    torch.testing.assert_close(inv_freq("freq_aware", dim=d, theta=THETA), torch.tensor(freq_aware))
    assert len(freq_aware) == d // 2


def test_freq_aware_example_and_autocorrelation_reference_values():
    got = -torch.log(inv_freq("freq_aware", dim=16, theta=THETA).double()) / math.log(THETA) * 16
    torch.testing.assert_close(got, torch.tensor([4, 6, 8, 10, 12, 13, 14, 15], dtype=torch.float64))
    m = torch.arange(1, 4097)
    a = {s: autocorrelation(inv_freq(s, dim=16, theta=THETA), m) for s in ("standard", "freq_aware")}
    assert round(a["standard"].min().item(), 3) == -0.656
    assert round(a["freq_aware"].min().item(), 3) == -0.396
    assert round((a["standard"] < 0).double().mean().item(), 2) == 0.39
    assert round((a["freq_aware"] < 0).double().mean().item(), 2) == 0.21
    assert autocorrelation(inv_freq("standard", dim=8, theta=THETA), torch.tensor([0])).item() == 1.0


# --- surgery --------------------------------------------------------------------------------


def test_identity_at_full_dims(original):
    student = build_student(original, k_dim=16, v_dim=16, rope="standard")
    ids = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        diff = (student(ids).logits - original(ids).logits).abs().max().item()
    assert diff <= 1e-5


def test_original_is_untouched(original):
    before = {k: v.clone() for k, v in original.state_dict().items()}
    build_student(original, k_dim=8, v_dim=4, rope="freq_aware")
    assert type(original) is LlamaForCausalLM
    for k, v in original.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("k_dim,v_dim", [(8, 8), (4, 16), (16, 2)])
def test_strided_weights_are_the_slices(k_dim, v_dim):
    original = tiny_llama(n_kv=2, bias=True)
    student = build_student(original, k_dim=k_dim, v_dim=v_dim)
    D, n_h, n_kv = 16, 4, 2
    r_k, r_v = D // k_dim, D // v_dim
    for t_layer, s_layer in zip(original.model.layers, student.model.layers):
        t, s = t_layer.self_attn, s_layer.self_attn
        for name, heads, r in (("q_proj", n_h, r_k), ("k_proj", n_kv, r_k), ("v_proj", n_kv, r_v)):
            w = getattr(t, name).weight
            expect = torch.cat([w[h * D + c][None] for h in range(heads) for c in range(0, D, r)])
            assert torch.equal(getattr(s, name).weight, expect), name
            b = getattr(t, name).bias
            assert torch.equal(getattr(s, name).bias, torch.stack([b[h * D + c] for h in range(heads) for c in range(0, D, r)]))
        o = t.o_proj.weight
        expect_o = torch.stack([o[:, h * D + c] for h in range(n_h) for c in range(0, D, r_v)], dim=1)
        assert torch.equal(s.o_proj.weight, expect_o)
        assert torch.equal(s.o_proj.bias, t.o_proj.bias)
        assert torch.equal(s_layer.mlp.up_proj.weight, t_layer.mlp.up_proj.weight)


def test_strided_keys_keep_rope_pairs_at_standard_frequencies():
    """The student's rotated keys are exactly the strided channels of the original's rotated keys."""
    original = tiny_llama(n_kv=4)
    student = build_student(original, k_dim=8, v_dim=16)
    kept = inv_freq("standard", dim=16, theta=THETA)[::2]
    torch.testing.assert_close(student.model.layers[0].self_attn.rope.inv_freq, kept)

    t_attn, s_attn = original.model.layers[0].self_attn, student.model.layers[0].self_attn
    hidden, pos = torch.randn(2, 10, 64), torch.arange(10)[None]
    with torch.no_grad():
        k_t = t_attn.k_proj(hidden).view(2, 10, 4, 16).transpose(1, 2)  # (B, n_kv, T, 16)
        k_t, _ = apply_rotary_pos_emb(k_t, k_t, *original.model.rotary_emb(hidden, pos))
        k_s = s_attn.k_proj(hidden).view(2, 10, 4, 8).transpose(1, 2)  # (B, n_kv, T, 8)
        k_s, _ = apply_rotary_pos_emb(k_s, k_s, *s_attn.rope(hidden, pos))
    torch.testing.assert_close(k_s, k_t[..., ::2])


def test_rope_switch_at_full_dim():
    original = tiny_llama(n_kv=4)
    off = build_student(original, k_dim=16, v_dim=16, rope="freq_aware")
    on = build_student(original, k_dim=16, v_dim=16, rope="freq_aware", rope_at_full_dim=True)
    torch.testing.assert_close(off.model.layers[0].self_attn.rope.inv_freq, inv_freq("standard", dim=16, theta=THETA))
    torch.testing.assert_close(on.model.layers[0].self_attn.rope.inv_freq, inv_freq("freq_aware", dim=16, theta=THETA))


def test_per_layer_dims():
    original = tiny_llama(n_kv=2, layers=3)
    student = build_student(original, k_dim=[16, 8, 4], v_dim=[2, 16, 8])
    attn = [layer.self_attn for layer in student.model.layers]
    assert [(a.k_dim, a.v_dim) for a in attn] == [(16, 2), (8, 16), (4, 8)]
    assert kv_bytes_per_token(student.config, dtype=torch.float32) == 2 * (18 + 24 + 12) * 4


# --- the model: cache, generate, asymmetric attention ---------------------------------------


@pytest.mark.parametrize("k_dim,v_dim", [(8, 8), (4, 16), (16, 4)])
def test_cache_holds_reduced_dims_and_bytes_agree(original, k_dim, v_dim):
    student = build_student(original, k_dim=k_dim, v_dim=v_dim, rope="freq_aware" if k_dim % 4 == 0 else "standard")
    ids = torch.randint(0, 97, (3, 25))
    with torch.no_grad():
        cache = student(ids, use_cache=True).cache
    n_kv = original.config.num_key_value_heads
    for layer in cache.layers:
        assert layer.keys.shape == (3, n_kv, 25, k_dim)
        assert layer.values.shape == (3, n_kv, 25, v_dim)
    for dtype in (torch.float32, torch.bfloat16):
        model = student.to(dtype)
        analytic = kv_bytes_per_token(model.config, dtype=dtype)
        assert analytic == 2 * n_kv * (k_dim + v_dim) * torch.empty((), dtype=dtype).element_size()
        assert measured_kv_bytes_per_token(model, ids) == analytic


@pytest.mark.parametrize("k_dim,v_dim", [(8, 16), (16, 8), (8, 8)])
def test_generate_with_cache_equals_without(original, k_dim, v_dim):
    student = build_student(original, k_dim=k_dim, v_dim=v_dim, rope="freq_aware")
    ids = torch.randint(0, 97, (1, 12))
    kwargs = dict(max_new_tokens=16, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = student.generate(ids, use_cache=True, **kwargs)
        uncached = student.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("k_dim,v_dim", [(4, 16), (16, 4)])
def test_padded_fused_attention_equals_eager(original, k_dim, v_dim):
    student = build_student(original, k_dim=k_dim, v_dim=v_dim)
    ids = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        student.set_attn_implementation("sdpa")
        sdpa = student(ids).logits
        student.set_attn_implementation("eager")
        eager = student(ids).logits
    torch.testing.assert_close(sdpa, eager, atol=1e-5, rtol=1e-5)


# --- save / load ----------------------------------------------------------------------------


def _run_python(code: str, *, cwd: Path, env: dict) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


IDS = torch.arange(30)[None]  # the tokens whose logits a saved student is checked on


def save_with_logits(student, tmp_path: Path) -> Path:
    """Save ``student`` to ``tmp_path/student`` and its logits on :data:`IDS` beside it."""
    with torch.no_grad():
        logits = student(IDS).logits
    path = tmp_path / "student"
    student.save_pretrained(path)
    torch.save(logits, tmp_path / "logits.pt")
    return path


def fresh_process_diff(saved: Path, *, package: bool, tmp_path: Path) -> float:
    """Max |logits difference| of ``saved`` reloaded in a fresh process against the logits saved
    beside it: with the package (its own classes), or without it (the checkpoint's code through
    ``trust_remote_code``; a site dir whose only ``kv_latent`` refuses to import hides the package)."""
    logits = str(saved.parent / "logits.pt")
    if package:
        env, check = {**os.environ}, "import kv_latent; expected = 'kv_latent.modeling'"
        load = f"AutoModelForCausalLM.from_pretrained({str(saved)!r})"
    else:
        blocker = tmp_path / "blocker"
        (blocker / "kv_latent").mkdir(parents=True)
        (blocker / "kv_latent" / "__init__.py").write_text("raise ImportError('kv_latent is not installed')\n")
        env = {**os.environ, "PYTHONPATH": str(blocker), "HF_MODULES_CACHE": str(tmp_path / "hf_modules")}
        check = textwrap.dedent("""
            try:
                import kv_latent
                raise SystemExit("kv_latent should not be importable here")
            except ImportError:
                expected = "transformers_modules"
            """)
        load = f"AutoModelForCausalLM.from_pretrained({str(saved)!r}, trust_remote_code=True)"
    code = "\n".join([
        "import torch",
        "from transformers import AutoModelForCausalLM",
        check,
        f"m = {load}",
        "assert type(m).__module__.startswith(expected), type(m).__module__",
        f"print((m(torch.arange({IDS.shape[1]})[None]).logits - torch.load({logits!r})).abs().max().item())",
    ])
    out = _run_python(code, cwd=saved.parent if package else tmp_path, env=env)
    return float(out.strip().splitlines()[-1])


@pytest.fixture
def saved_student(tmp_path):
    return save_with_logits(build_student(tiny_llama(n_kv=2), k_dim=8, v_dim=4, rope="freq_aware"), tmp_path)


def test_save_and_load_in_fresh_process(saved_student, tmp_path):
    assert fresh_process_diff(saved_student, package=True, tmp_path=tmp_path) == 0.0


def test_trust_remote_code_load_without_the_package(saved_student, tmp_path):
    config = json.loads((saved_student / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling.KVLatentForCausalLM"
    assert fresh_process_diff(saved_student, package=False, tmp_path=tmp_path) == 0.0


def test_auto_classes_registered():
    assert kv_latent.KVLatentForCausalLM is KVLatentForCausalLM
    model = build_student(tiny_llama(n_kv=4), k_dim=8, v_dim=8)
    assert type(AutoModelForCausalLM.from_config(model.config)) is KVLatentForCausalLM


# --- configuration errors -------------------------------------------------------------------


@pytest.mark.parametrize(
    "kv,match",
    [
        (dict(k_dim=31, v_dim=64), r"kv.k_dim=31 must divide head_dim=64"),
        (dict(k_dim=2, v_dim=64, schedule="freq_aware"), r"kv.k_dim=2 must be a multiple of 4 for rope.schedule=freq_aware"),
        (dict(k_dim=128, v_dim=64), r"kv.k_dim=128 must be in 1..64"),
        (dict(k_dim=64, v_dim=0), r"kv.v_dim=0 must be in 1..64"),
        (dict(k_dim=-8, v_dim=64), r"kv.k_dim=-8 must be in 1..64"),
        (dict(k_dim=32, v_dim=24), r"kv.v_dim=24 must divide head_dim=64"),
        (dict(k_dim=1, v_dim=64, qk_init="qk_energy"), r"kv.k_dim=1 must be even"),
    ],
)
def test_kv_dim_errors_name_the_key(kv, match):
    with pytest.raises(ConfigError, match=match):
        check_kv_dims(head_dim=64, **kv)


def test_n_kv_must_divide_n_h():
    with pytest.raises(ConfigError, match="model.num_key_value_heads=3 must divide model.num_attention_heads=4"):
        ModelConfig(name="m", head_dim=64, num_attention_heads=4, num_key_value_heads=3, num_hidden_layers=2,
                    max_position_embeddings=128)


def test_surgery_validates_before_building():
    with pytest.raises(ConfigError, match="kv.v_dim=3"):
        build_student(tiny_llama(n_kv=4), k_dim=8, v_dim=3)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("k_dim,v_dim", [(8, 16), (16, 4)])
def test_batched_left_padded_decode_matches_full_forward(attn, k_dim, v_dim):
    """The unpadded decode path (asymmetric dims) agrees with a full forward, masks included."""
    student = build_student(tiny_llama(n_kv=2), k_dim=k_dim, v_dim=v_dim)
    student.set_attn_implementation(attn)
    ids = torch.randint(1, 97, (2, 20))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding in the second row
    with torch.no_grad():
        full = student(ids, attention_mask=mask).logits[:, -3:]
        out = student(ids[:, :-3], attention_mask=mask[:, :-3], use_cache=True)
        steps = []
        for i in range(17, 20):
            out = student(ids[:, i : i + 1], attention_mask=mask[:, : i + 1], cache=out.cache, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1)[1:], full[1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(steps, dim=1)[:1], full[:1], atol=1e-5, rtol=1e-5)
