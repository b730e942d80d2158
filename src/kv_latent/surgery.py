"""Surgery: an original Llama-family model -> a KV-Latent student with reduced head dims.

The student is a new model; the original (the teacher during retraining) is never modified.
Initialisations are two registries, one function per init (DESIGN.md §2.1, §2.6):

- ``QK_INITS`` (``kv.qk_init``) map one layer's query/key weights to ``k_dim`` channels per head
  and say which RoPE frequencies the kept channels get: the ``rope`` schedule, or their own per
  KV head (stored in the student's config);
- ``VO_INITS`` (``kv.vo_init``) map its value/output weights to ``v_dim`` channels per head.

Inits that read data get the original's calibration statistics (:mod:`kv_latent.calibration`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel
from transformers.initialization import no_init_weights

from kv_latent.calibration import CalibrationStats, LayerMoments
from kv_latent.config import CALIBRATED_INITS
from kv_latent.modeling import KVLatentConfig, KVLatentForCausalLM
from kv_latent.rope import freq_aware_exponents, pair_inv_freq
from kv_latent.rules import check_kv_dims

SUPPORTED_MODEL_TYPES = ("llama", "mistral", KVLatentConfig.model_type)


@dataclass
class QKReduced:
    """A Q/K init's result for one layer: the reduced ``q``/``k`` weights (and ``q_bias``/``k_bias``),
    and ``inv_freq`` (n_kv, k_dim/2), float64, the kept channels' own frequencies per KV head, or
    None where the ``rope`` schedule applies."""

    weights: dict[str, torch.Tensor]
    inv_freq: torch.Tensor | None = None


# qk_init(weights, *, n_h, n_kv, head_dim, k_dim, theta, stats) -> QKReduced
QKInit = Callable[..., QKReduced]
# vo_init(weights, *, n_h, n_kv, head_dim, v_dim, stats) -> reduced weights; keys v, o (+ v_bias, o_bias)
VOInit = Callable[..., dict[str, torch.Tensor]]
QK_INITS: dict[str, QKInit] = {}
VO_INITS: dict[str, VOInit] = {}


def register_qk_init(name: str):
    """Register a query/key initialisation under ``name`` (a ``kv.qk_init`` choice)."""

    def wrap(fn: QKInit) -> QKInit:
        QK_INITS[name] = fn
        return fn

    return wrap


def register_vo_init(name: str):
    """Register a value/output initialisation under ``name`` (a ``kv.vo_init`` choice)."""

    def wrap(fn: VOInit) -> VOInit:
        VO_INITS[name] = fn
        return fn

    return wrap


def _head_rows(w: torch.Tensor, channels: torch.Tensor, *, head_dim: int) -> torch.Tensor:
    """Rows ``channels[h]`` of every head ``h`` of a projection ``w`` (heads * head_dim, *in) or
    of its bias (heads * head_dim,); ``channels``: (heads, d). Returns (heads * d, *in)."""
    heads = channels.shape[0]
    w = w.view(heads, head_dim, *w.shape[1:])  # (heads, head_dim, *in)
    picked = w[torch.arange(heads, device=w.device)[:, None], channels.to(w.device)]  # (heads, d, *in)
    return picked.reshape(-1, *w.shape[2:]).clone()


def keep_pairs(weights: dict[str, torch.Tensor], pairs: torch.Tensor, *, n_h: int, n_kv: int,
               head_dim: int) -> dict[str, torch.Tensor]:
    """Keep ``rotate_half`` pairs ``pairs`` (n_kv, d/2) of every KV head and of each query head of
    its group: original channels ``j`` and ``j + head_dim/2`` go to positions ``m`` and
    ``m + d/2`` of the reduced head, where ``rotate_half`` at width ``d`` expects a pair."""
    channels = torch.cat([pairs, pairs + head_dim // 2], dim=-1)  # (n_kv, d)
    query_channels = channels.repeat_interleave(n_h // n_kv, dim=0)  # (n_h, d): a query head takes its KV head's
    out = {}
    for name, picked in (("q", query_channels), ("k", channels)):
        out[name] = _head_rows(weights[name], picked, head_dim=head_dim)
        if f"{name}_bias" in weights:
            out[f"{name}_bias"] = _head_rows(weights[f"{name}_bias"], picked, head_dim=head_dim)
    return out


def _needs(stats: LayerMoments | None, init: str) -> LayerMoments:
    if stats is None:
        raise ValueError(f"{init} needs calibration statistics (build_student(..., stats=...))")
    return stats


@register_qk_init("strided")
def strided_qk(weights, *, n_h: int, n_kv: int, head_dim: int, k_dim: int, theta: float,
               stats: LayerMoments | None = None) -> QKReduced:
    """The paper's init: keep channels 0, r, 2r, ... of every head (``r = head_dim / k_dim``).

    In the ``rotate_half`` layout channel ``i`` pairs with ``i + head_dim/2``; a stride keeps pairs
    intact, and kept pair ``j`` had frequency ``theta^(-2j/k_dim)``: standard RoPE at ``k_dim``.
    """
    pairs = torch.arange(0, head_dim // 2, head_dim // k_dim).expand(n_kv, -1)  # (n_kv, k_dim/2)
    return QKReduced(keep_pairs(weights, pairs, n_h=n_h, n_kv=n_kv, head_dim=head_dim))


@register_qk_init("freq_matched")
def freq_matched_qk(weights, *, n_h: int, n_kv: int, head_dim: int, k_dim: int, theta: float,
                    stats: LayerMoments | None = None) -> QKReduced:
    """Keep the original pairs ``arr_j * r / 2`` (``r = head_dim / k_dim`` even): frequency-aware
    RoPE at ``k_dim`` gives each exactly its original frequency ``theta^(-2i/head_dim)``."""
    pairs = freq_aware_exponents(k_dim) * (head_dim // k_dim) // 2  # (k_dim/2,)
    return QKReduced(keep_pairs(weights, pairs.expand(n_kv, -1), n_h=n_h, n_kv=n_kv, head_dim=head_dim))


@register_qk_init("qk_energy")
def qk_energy_qk(weights, *, n_h: int, n_kv: int, head_dim: int, k_dim: int, theta: float,
                 stats: LayerMoments | None = None) -> QKReduced:
    """Per KV head, keep the ``k_dim/2`` pairs with the largest ``E‖q_j‖² · E‖k_j‖²`` (queries
    summed over the group), in their original order and at their original frequencies."""
    stats = _needs(stats, "kv.qk_init=qk_energy")
    score = stats.q_pair_energy() * stats.k_pair_energy()  # (n_kv, head_dim/2)
    top = torch.argsort(score, dim=-1, descending=True, stable=True)[:, : k_dim // 2]
    pairs = top.sort(dim=-1).values  # (n_kv, k_dim/2), ascending: fastest frequency first, as in RoPE
    return QKReduced(keep_pairs(weights, pairs, n_h=n_h, n_kv=n_kv, head_dim=head_dim),
                     inv_freq=pair_inv_freq(pairs, head_dim=head_dim, theta=theta))


@register_vo_init("strided")
def strided_vo(weights, *, n_h: int, n_kv: int, head_dim: int, v_dim: int,
               stats: LayerMoments | None = None) -> dict[str, torch.Tensor]:
    """Keep value channels 0, r, 2r, ... of every KV head (``r = head_dim / v_dim``) and the
    matching input columns of ``o_proj`` for every query head."""
    channels = torch.arange(0, head_dim, head_dim // v_dim)
    out = {"v": _head_rows(weights["v"], channels.expand(n_kv, -1), head_dim=head_dim)}
    if "v_bias" in weights:
        out["v_bias"] = _head_rows(weights["v_bias"], channels.expand(n_kv, -1), head_dim=head_dim)
    o = weights["o"]
    out["o"] = o.view(-1, n_h, head_dim)[:, :, channels].reshape(o.shape[0], -1).clone()  # (out, n_h * v_dim)
    return _with_o_bias(out, weights)


@register_vo_init("pca")
def pca_vo(weights, *, n_h: int, n_kv: int, head_dim: int, v_dim: int,
           stats: LayerMoments | None = None) -> dict[str, torch.Tensor]:
    """Per KV head the top-``v_dim`` eigenvectors ``P`` of ``C_o = E[o oᵀ]`` (the ``o_proj`` input,
    summed over the group), folded in: ``v_proj[h] <- Pᵀ W_v,h``, ``o_proj[:, h'] <- W_o,h' P``
    for each query head ``h'`` of the group. Exact when the head's value rank is at most ``v_dim``."""
    stats = _needs(stats, "kv.vo_init=pca")
    _, vectors = torch.linalg.eigh(stats.o_group_moment())  # ascending eigenvalues; (n_kv, D, D)
    return fold_vo(weights, vectors.flip(-1)[..., :v_dim], n_h=n_h, n_kv=n_kv, head_dim=head_dim)


def fold_vo(weights: dict[str, torch.Tensor], basis: torch.Tensor, *, n_h: int, n_kv: int,
            head_dim: int) -> dict[str, torch.Tensor]:
    """Fold a per-KV-head basis (n_kv, head_dim, v_dim) into ``v_proj`` rows (``basisᵀ W_v,h``) and
    ``o_proj`` columns (``W_o,h' basis``, each query head ``h'`` with its KV head's), in float64."""
    w_v, w_o = weights["v"], weights["o"]
    basis = basis.to(w_v.device, torch.float64)
    v = basis.transpose(1, 2) @ w_v.double().view(n_kv, head_dim, -1)  # (n_kv, v_dim, in)
    basis_q = basis.repeat_interleave(n_h // n_kv, dim=0)  # (n_h, head_dim, v_dim)
    o = torch.einsum("ohd,hde->ohe", w_o.double().view(-1, n_h, head_dim), basis_q)  # (out, n_h, v_dim)
    out = {"v": v.reshape(-1, v.shape[-1]).to(w_v.dtype), "o": o.reshape(o.shape[0], -1).to(w_o.dtype)}
    if "v_bias" in weights:
        b = weights["v_bias"].double().view(n_kv, head_dim, 1)  # (n_kv, head_dim, 1)
        out["v_bias"] = (basis.transpose(1, 2) @ b).reshape(-1).to(weights["v_bias"].dtype)  # (n_kv * v_dim,)
    return _with_o_bias(out, weights)


def _with_o_bias(out: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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
    rope_inv_freq: list[list[list[float]] | None] | None = None,
) -> KVLatentConfig:
    """The :class:`KVLatentConfig` of a student of ``original`` (a model or its config)."""
    config = getattr(original, "config", original)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type={config.model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}")
    rope_type = (config.rope_parameters or {}).get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"the original model uses rope_type={rope_type!r}; only 'default' RoPE is supported")
    fields = config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version", "k_dim", "v_dim",
                "rope_schedule", "rope_at_full_dim", "rope_inv_freq"):
        fields.pop(key, None)
    return KVLatentConfig(
        **fields,
        k_dim=_per_layer(k_dim, config.num_hidden_layers),
        v_dim=_per_layer(v_dim, config.num_hidden_layers),
        rope_schedule=rope,
        rope_at_full_dim=rope_at_full_dim,
        rope_inv_freq=rope_inv_freq,
    )


def _check_request(original: PreTrainedModel, *, k_dims: list[int], v_dims: list[int], qk_init: str,
                   vo_init: str, rope: str, rope_at_full_dim: bool, stats: CalibrationStats | None) -> None:
    """Everything :func:`build_student` can refuse before it builds anything."""
    for key, init, known in (("kv.qk_init", qk_init, QK_INITS), ("kv.vo_init", vo_init, VO_INITS)):
        if init not in known:
            raise ValueError(f"{key}={init!r} is unknown; choose one of {sorted(known)}")
    config = original.config
    head_dim = config.head_dim
    if len(k_dims) != config.num_hidden_layers or len(v_dims) != config.num_hidden_layers:
        raise ValueError(f"k_dim and v_dim need one value per layer ({config.num_hidden_layers})")
    for layer_k, layer_v in zip(k_dims, v_dims):
        check_kv_dims(k_dim=layer_k, v_dim=layer_v, head_dim=head_dim, qk_init=qk_init, vo_init=vo_init,
                      schedule=rope, at_full_dim=rope_at_full_dim)
    original_dims = getattr(config, "k_dim", None), getattr(config, "v_dim", None)
    if any(dims is not None and dims != [head_dim] * config.num_hidden_layers for dims in original_dims):
        raise ValueError("the original model is already reduced; start surgery from a full-dim model")
    calibrated = [init for init in (qk_init, vo_init) if init in CALIBRATED_INITS]
    if calibrated and stats is None:
        raise ValueError(f"init(s) {calibrated} need calibration statistics of the original: pass stats=")
    if stats is not None:
        stats.check_matches(config)


@torch.no_grad()
def build_student(
    original: PreTrainedModel,
    *,
    k_dim: int | Sequence[int],
    v_dim: int | Sequence[int],
    qk_init: str = "strided",
    vo_init: str = "strided",
    rope: str = "standard",
    rope_at_full_dim: bool = False,
    stats: CalibrationStats | None = None,
) -> KVLatentForCausalLM:
    """Build a KV-Latent student of ``original`` on its device and dtype; ``original`` is untouched.

    ``stats`` (:func:`kv_latent.calibration.calibrate` of ``original``) is needed by the inits
    that read data (``qk_energy``, ``pca``). At full dims with ``rope="standard"`` the student
    computes the same function as the original, whichever the init.
    """
    n_layers = original.config.num_hidden_layers
    k_dims, v_dims = _per_layer(k_dim, n_layers), _per_layer(v_dim, n_layers)
    _check_request(original, k_dims=k_dims, v_dims=v_dims, qk_init=qk_init, vo_init=vo_init, rope=rope,
                   rope_at_full_dim=rope_at_full_dim, stats=stats)
    n_h, n_kv, head_dim = (original.config.num_attention_heads, original.config.num_key_value_heads,
                           original.config.head_dim)
    theta = original.config.rope_parameters["rope_theta"]

    state = {k: v.clone() for k, v in original.state_dict().items()}
    inv_freq: list[list[list[float]] | None] = []
    for i, layer_k, layer_v in zip(range(n_layers), k_dims, v_dims):
        prefix = f"model.layers.{i}.self_attn."
        weights = {}
        for name in "qkvo":
            weights[name] = state.pop(f"{prefix}{name}_proj.weight")
            if f"{prefix}{name}_proj.bias" in state:
                weights[f"{name}_bias"] = state.pop(f"{prefix}{name}_proj.bias")
        layer_stats = stats.layer(i) if stats is not None else None
        qk = QK_INITS[qk_init](weights, n_h=n_h, n_kv=n_kv, head_dim=head_dim, k_dim=layer_k, theta=theta,
                               stats=layer_stats)
        vo = VO_INITS[vo_init](weights, n_h=n_h, n_kv=n_kv, head_dim=head_dim, v_dim=layer_v, stats=layer_stats)
        inv_freq.append(None if qk.inv_freq is None else qk.inv_freq.tolist())
        for key, tensor in {**qk.weights, **vo}.items():
            name, _, kind = key.partition("_")
            state[f"{prefix}{name}_proj.{kind or 'weight'}"] = tensor

    config = student_config(original, k_dim=k_dims, v_dim=v_dims, rope=rope, rope_at_full_dim=rope_at_full_dim,
                            rope_inv_freq=inv_freq if any(f is not None for f in inv_freq) else None)
    param = next(original.parameters())
    with no_init_weights(), torch.device(param.device):
        student = KVLatentForCausalLM(config).to(param.dtype)
    student.config._attn_implementation = original.config._attn_implementation
    student.tie_weights()  # no_init_weights skips the tying of a tie_word_embeddings model
    student.load_state_dict(state, strict=True)
    student.generation_config = original.generation_config
    return student.eval() if not original.training else student
