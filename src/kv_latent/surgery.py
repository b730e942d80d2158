"""Surgery: an original Llama-family model -> a KV-Latent student with reduced head dims.

The student is a new model; the original (the teacher during retraining) is never modified.
Initialisations are a registry: ``init`` names a function that maps one layer's original
attention weights to the reduced ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedModel
from transformers.initialization import no_init_weights

from kv_latent.rules import check_kv_dims
from kv_latent.modeling import KVLatentConfig, KVLatentForCausalLM

SUPPORTED_MODEL_TYPES = ("llama", "mistral", KVLatentConfig.model_type)

# init(weights, *, n_h, n_kv, head_dim, k_dim, v_dim) -> reduced weights; keys q/k/v/o (+ _bias).
AttentionInit = Callable[..., dict[str, torch.Tensor]]
INITS: dict[str, AttentionInit] = {}


def register_init(name: str):
    """Register an attention initialisation under ``name`` (a ``kv.init`` choice)."""

    def wrap(fn: AttentionInit) -> AttentionInit:
        INITS[name] = fn
        return fn

    return wrap


@register_init("strided")
def strided_init(
    weights: dict[str, torch.Tensor], *, n_h: int, n_kv: int, head_dim: int, k_dim: int, v_dim: int
) -> dict[str, torch.Tensor]:
    """The paper's init: keep channels 0, r, 2r, ... of every head (``r = head_dim / dim``).

    In the ``rotate_half`` layout channel ``i`` pairs with ``i + head_dim/2``; a stride keeps pairs
    intact, and kept pair ``j`` had frequency ``theta^(-2j/k_dim)``: standard RoPE at ``k_dim``.
    """
    r_qk, r_vo = head_dim // k_dim, head_dim // v_dim

    def rows(w: torch.Tensor, heads: int, r: int) -> torch.Tensor:
        w = w.view(heads, head_dim, *w.shape[1:])[:, ::r]  # (heads, dim, *in)
        return w.reshape(-1, *w.shape[2:]).clone()  # (heads * dim, *in)

    out = {
        "q": rows(weights["q"], n_h, r_qk),
        "k": rows(weights["k"], n_kv, r_qk),
        "v": rows(weights["v"], n_kv, r_vo),
        "o": weights["o"].view(-1, n_h, head_dim)[:, :, ::r_vo].reshape(weights["o"].shape[0], -1).clone(),
    }
    for name, heads, r in (("q", n_h, r_qk), ("k", n_kv, r_qk), ("v", n_kv, r_vo)):
        if f"{name}_bias" in weights:
            out[f"{name}_bias"] = rows(weights[f"{name}_bias"], heads, r)
    if "o_bias" in weights:
        out["o_bias"] = weights["o_bias"].clone()
    return out


def _per_layer(value: int | Sequence[int], n_layers: int) -> list[int]:
    return [value] * n_layers if isinstance(value, int) else list(value)


def student_config(
    original: PreTrainedModel | object,
    *,
    k_dim: int | Sequence[int],
    v_dim: int | Sequence[int],
    rope: str = "standard",
    rope_at_full_dim: bool = False,
) -> KVLatentConfig:
    """The :class:`KVLatentConfig` of a student of ``original`` (a model or its config)."""
    config = getattr(original, "config", original)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type={config.model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}")
    rope_type = (config.rope_parameters or {}).get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"the original model uses rope_type={rope_type!r}; only 'default' RoPE is supported")
    fields = config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version", "k_dim", "v_dim"):
        fields.pop(key, None)
    return KVLatentConfig(
        **fields,
        k_dim=_per_layer(k_dim, config.num_hidden_layers),
        v_dim=_per_layer(v_dim, config.num_hidden_layers),
        rope_schedule=rope,
        rope_at_full_dim=rope_at_full_dim,
    )


@torch.no_grad()
def build_student(
    original: PreTrainedModel,
    *,
    k_dim: int | Sequence[int],
    v_dim: int | Sequence[int],
    init: str = "strided",
    rope: str = "standard",
    rope_at_full_dim: bool = False,
) -> KVLatentForCausalLM:
    """Build a KV-Latent student of ``original`` on its device and dtype; ``original`` is untouched.

    At full dims with ``rope="standard"`` the student computes the same function as the original.
    """
    if init not in INITS:
        raise ValueError(f"kv.init={init!r} is unknown; choose one of {sorted(INITS)}")
    config = student_config(original, k_dim=k_dim, v_dim=v_dim, rope=rope, rope_at_full_dim=rope_at_full_dim)
    n_h, n_kv, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    for layer_k, layer_v in zip(config.k_dim, config.v_dim):
        check_kv_dims(k_dim=layer_k, v_dim=layer_v, head_dim=head_dim, init=init, schedule=rope,
                      at_full_dim=rope_at_full_dim)
    original_dims = getattr(original.config, "k_dim", None), getattr(original.config, "v_dim", None)
    if any(dims is not None and dims != [head_dim] * config.num_hidden_layers for dims in original_dims):
        raise ValueError("the original model is already reduced; start surgery from a full-dim model")

    param = next(original.parameters())
    with no_init_weights(), torch.device(param.device):
        student = KVLatentForCausalLM(config).to(param.dtype)
    student.config._attn_implementation = original.config._attn_implementation

    state = {k: v.clone() for k, v in original.state_dict().items()}
    for i, layer_k, layer_v in zip(range(config.num_hidden_layers), config.k_dim, config.v_dim):
        prefix = f"model.layers.{i}.self_attn."
        weights = {}
        for name in "qkvo":
            weights[name] = state.pop(f"{prefix}{name}_proj.weight")
            if f"{prefix}{name}_proj.bias" in state:
                weights[f"{name}_bias"] = state.pop(f"{prefix}{name}_proj.bias")
        reduced = INITS[init](weights, n_h=n_h, n_kv=n_kv, head_dim=head_dim, k_dim=layer_k, v_dim=layer_v)
        for key, tensor in reduced.items():
            name, _, kind = key.partition("_")
            state[f"{prefix}{name}_proj.{kind or 'weight'}"] = tensor
    student.load_state_dict(state, strict=True)
    student.generation_config = original.generation_config
    return student.eval() if not original.training else student
