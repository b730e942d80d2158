"""Head compression: MHA -> GQA (Yu et al., arXiv 2406.07056; DESIGN.md §5).

Each layer's KV heads are split into groups of ``t = n_kv / kv_heads`` consecutive heads (HF's
``repeat_kv`` gives query head ``i`` KV head ``i // (n_h / n_kv)``); each group becomes one KV
head of ``head_dim`` D. The modes (``gqa.mode``):

- ``mean_pool`` (Ainslie et al.): the group's mean key and value weights; queries, ``o_proj`` kept.
- ``svd_w`` (data-free): an orthonormal basis ``Ψ`` (tD × D) of the stacked key weights
  ``S = [W_k,1; …; W_k,t]``, ``W_k' = Ψᵀ S`` and ``W_q,i' = Ψ_bᵀ W_q,i`` (``Ψ_b``: rows
  ``b·D:(b+1)·D``, ``b`` the query head's KV head in its group); values alike, with
  ``W_o,i' = W_o,i Ψ^v_b``. Inexact under RoPE unless the blocks commute with it, so the basis is
  rotated within its span to be closest to ``[I; …; I] / √t`` (at ``t = 1``: the identity).
- ``svd_a`` (the paper's): ``Ψ`` = PCA of the group's concatenated post-RoPE keys, applied after
  RoPE by the model (:class:`~kv_latent.modeling.PostRopeKeyProj`); values = PCA of the
  concatenated values, folded as in ``svd_w``. The result is a full-dim KV-Latent model.
- ``rope_pca`` (ours): per rotate_half pair ``j`` the top eigenvector ``u`` of the t×t Hermitian
  ``C_j = E[z zᴴ]`` of the heads' pairs as complex numbers ``z_h = k_h[j] + i·k_h[j+D/2]``: the
  new key is ``uᴴ z`` and head ``h``'s queries are scaled by ``conj(u_h)``. Complex scalars commute
  with RoPE, so the result is a stock GQA Llama; values as ``svd_a``.

Every map runs in float64; a bias is folded as one more input column of its projection.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel
from transformers.initialization import no_init_weights

from kv_latent.calibration import CalibrationStats, LayerMoments
from kv_latent.config import CALIBRATED_GQA_MODES
from kv_latent.modeling import KVLatentConfig, KVLatentForCausalLM

SUPPORTED_MODEL_TYPES = ("llama", "mistral", KVLatentConfig.model_type)
QUERY_DAMPING = 0.01  # query-aware rope_pca: pair energies + 1% of the group's mean pair energy
_NOT_LLAMA_FIELDS = ("model_type", "architectures", "auto_map", "transformers_version", "sliding_window",
                     "num_key_value_heads", "k_dim", "v_dim", "rope_schedule", "rope_at_full_dim",
                     "rope_inv_freq", "post_rope_key_heads")


@dataclass(frozen=True)
class GroupedAttention:
    """One layer's attention weights in float64 by group of t KV heads, each with r query heads.

    ``q``: (G, t, r, D, I), ``k``, ``v``: (G, t, D, I), ``o``: (out, G, t, r, D), where I is the
    input width, plus one (the bias column) for a projection with a bias. A compressor returns
    ``k``, ``v`` as (G, D, I), or ``k`` unchanged and ``key_basis`` (G, tD, D) for ``svd_a``.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    key_basis: torch.Tensor | None = None


def _top_eigenvectors(moment: torch.Tensor, d: int) -> torch.Tensor:
    """The top-``d`` eigenvectors of symmetric (…, n, n) ``moment``, largest first: (…, n, d)."""
    return torch.linalg.eigh(moment).eigenvectors.flip(-1)[..., :d]


def _closest_to_pooling(basis: torch.Tensor) -> torch.Tensor:
    """``basis`` (G, tD, D) times the orthogonal ``Q`` that brings it closest to ``[I; …; I]/√t``
    (Procrustes): the span, hence the reconstruction, is unchanged."""
    g, td, d = basis.shape
    overlap = basis.view(g, td // d, d, d).sum(dim=1).transpose(1, 2)  # (G, D, D): Ψᵀ [I; …; I]
    u, _, vh = torch.linalg.svd(overlap)
    return basis @ (u @ vh)


def _fold_keys(w: GroupedAttention, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys ``Ψᵀ S`` (G, D, I) and queries ``Ψ_bᵀ W_q,i`` (G, t, r, D, I) for bases (G, tD, D)."""
    g, t, d, i = w.k.shape
    k = basis.transpose(1, 2) @ w.k.reshape(g, t * d, i)  # (G, D, I)
    q = torch.einsum("gbde,gbrdi->gbrei", basis.view(g, t, d, d), w.q)
    return q, k


def _fold_values(w: GroupedAttention, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Values ``Ψᵀ S_v`` (G, D, I) and ``o_proj`` columns ``W_o,i Ψ_b`` (out, G, t, r, D)."""
    g, t, d, i = w.v.shape
    v = basis.transpose(1, 2) @ w.v.reshape(g, t * d, i)  # (G, D, I)
    o = torch.einsum("ogbrd,gbde->ogbre", w.o, basis.view(g, t, d, d))
    return v, o


def _value_pca(w: GroupedAttention, stats: LayerMoments) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_fold_values` with the top-D eigenvectors of the groups' value moments."""
    return _fold_values(w, _top_eigenvectors(stats.v_group.to(w.v), w.v.shape[2]))


def mean_pool(w: GroupedAttention, stats: LayerMoments | None, *, query_aware: bool) -> GroupedAttention:
    """``W_k' = mean_h W_k,h``, ``W_v' = mean_h W_v,h``; queries and ``o_proj`` unchanged."""
    return replace(w, k=w.k.mean(dim=1), v=w.v.mean(dim=1))


def svd_w(w: GroupedAttention, stats: LayerMoments | None, *, query_aware: bool) -> GroupedAttention:
    """Top-D left singular vectors of the stacked key (value) weights, folded into both sides;
    the key basis aligned with pooling (:func:`_closest_to_pooling`)."""
    g, t, d, i = w.k.shape
    stacked_k, stacked_v = w.k.reshape(g, t * d, i), w.v.reshape(g, t * d, i)  # (G, tD, I)
    key_basis = _closest_to_pooling(_top_eigenvectors(stacked_k @ stacked_k.transpose(1, 2), d))
    q, k = _fold_keys(w, key_basis)
    v, o = _fold_values(w, _top_eigenvectors(stacked_v @ stacked_v.transpose(1, 2), d))
    return GroupedAttention(q=q, k=k, v=v, o=o)


def svd_a(w: GroupedAttention, stats: LayerMoments, *, query_aware: bool) -> GroupedAttention:
    """PCA of the concatenated post-RoPE keys (kept as ``key_basis``, applied after RoPE) and of
    the concatenated values (folded)."""
    v, o = _value_pca(w, stats)
    return replace(w, v=v, o=o, key_basis=_top_eigenvectors(stats.k_rope_group.to(w.k), w.k.shape[2]))


def pair_moments(k_group: torch.Tensor, *, head_dim: int) -> torch.Tensor:
    """``C_j = E[z_j z_jᴴ]`` (G, D/2, t, t), complex, from the groups' real key moments
    (G, tD, tD), where ``z_h,j = k_h[j] + i·k_h[j + D/2]``:
    ``C[b, c] = E[x_b x_c] + E[y_b y_c] + i (E[y_b x_c] - E[x_b y_c])``."""
    g, td, _ = k_group.shape
    t, h = td // head_dim, head_dim // 2
    m = k_group.view(g, t, head_dim, t, head_dim)

    def cross(rows: slice, cols: slice) -> torch.Tensor:
        return m[:, :, rows, :, cols].diagonal(dim1=2, dim2=4)  # (G, t, t, D/2): E[row_b,j col_c,j]

    x, y = slice(0, h), slice(h, head_dim)
    c = torch.complex(cross(x, x) + cross(y, y), cross(y, x) - cross(x, y))  # (G, t, t, D/2)
    return c.permute(0, 3, 1, 2)


def _scale_pairs(w: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """Rows of (…, D, I) as pairs ``z = w[j] + i·w[j+D/2]`` times ``conj(coef)`` (…, D/2, 1),
    complex: (…, D/2, I)."""
    h = w.shape[-2] // 2
    return torch.complex(w[..., :h, :], w[..., h:, :]) * coef.conj()


def _as_rows(z: torch.Tensor) -> torch.Tensor:
    """Complex pair rows (…, D/2, I) back to real rows (…, D, I): real parts, then imaginary."""
    return torch.cat([z.real, z.imag], dim=-2)


def rope_pca(w: GroupedAttention, stats: LayerMoments, *, query_aware: bool) -> GroupedAttention:
    """Per pair ``j`` and group: key ``k' = eᴴ z`` and, for original KV head ``h``, queries
    ``conj(d_h) z_q``, so ``Re(z_q conj(z_h)) ≈ Re(conj(d_h) z_q conj(k'))``.

    Plain: ``e = d = u``, the top eigenvector of ``C_j``. ``query_aware``: minimise the
    query-weighted error ``Σ_h E|q_h,j|² E|z_h - d_h k'|²`` instead; with ``W = diag(E|q_h,j|²)``
    (damped) it is the plain problem for ``W^½ z``, so with ``ũ`` the top eigenvector of
    ``W^½ C_j W^½`` the key encodes with ``e = W^½ ũ`` and the queries decode with ``d = W^-½ ũ``.
    """
    g, t, d, i = w.k.shape
    c = pair_moments(stats.k_group.to(w.k), head_dim=d)  # (G, D/2, t, t)
    if query_aware:
        energy = stats.q_pair_energy().to(w.k).view(g, t, d // 2).transpose(1, 2)  # (G, D/2, t)
        scale = (energy + QUERY_DAMPING * energy.mean(dim=(1, 2), keepdim=True)).sqrt()  # W^½
        top = torch.linalg.eigh(scale[..., :, None] * c * scale[..., None, :]).eigenvectors[..., -1]  # (G, D/2, t)
        encode, decode = top * scale, top / scale
    else:
        encode = decode = torch.linalg.eigh(c).eigenvectors[..., -1]  # (G, D/2, t): u per pair
    encode, decode = encode.permute(0, 2, 1)[..., None], decode.permute(0, 2, 1)[..., None]  # (G, t, D/2, 1)
    k = _as_rows(_scale_pairs(w.k, encode).sum(dim=1))  # (G, D, I)
    q = _as_rows(_scale_pairs(w.q, decode[:, :, None]))  # (G, t, r, D, I)
    v, o = _value_pca(w, stats)
    return GroupedAttention(q=q, k=k, v=v, o=o)


Compressor = Callable[..., GroupedAttention]  # (weights, layer stats, *, query_aware) -> compressed
COMPRESSORS: dict[str, Compressor] = {"mean_pool": mean_pool, "svd_w": svd_w, "svd_a": svd_a, "rope_pca": rope_pca}
GQA_MODES = tuple(COMPRESSORS)  # "keep" is handled by the caller


def _check_original(config) -> None:
    """Refuse an original whose heads are not standard Llama heads at full dims."""
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type={config.model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}")
    rope_type = (config.rope_parameters or {}).get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"the original model uses rope_type={rope_type!r}; only 'default' RoPE is supported")
    if getattr(config, "sliding_window", None) is not None:
        raise ValueError(f"the original model uses sliding_window={config.sliding_window}; a stock Llama has none")
    if config.model_type == KVLatentConfig.model_type:
        full = [config.head_dim] * config.num_hidden_layers
        if config.k_dim != full or config.v_dim != full or config.rope_inv_freq is not None:
            raise ValueError("the original model is already reduced; compress heads first, then reduce dims")
        schedules = {config.layer_rope_schedule(i) for i in range(config.num_hidden_layers)}
        if config.post_rope_key_heads is not None or schedules != {"standard"}:
            raise ValueError("the original model's keys are not standard RoPE heads (post_rope_key_heads, or a "
                             f"RoPE schedule in {sorted(schedules)}); start from a stock Llama")


def _check_request(original: PreTrainedModel, *, mode: str, kv_heads: int, stats: CalibrationStats | None,
                   query_aware: bool) -> None:
    """Everything :func:`compress_heads` can refuse before it builds anything."""
    if mode not in GQA_MODES:
        raise ValueError(f"gqa.mode={mode!r} is unknown; choose one of {GQA_MODES} (or 'keep')")
    if query_aware and mode != "rope_pca":
        raise ValueError(f"query_aware applies to gqa.mode='rope_pca' only, not {mode!r}")
    config = original.config
    _check_original(config)
    n_kv = config.num_key_value_heads
    if isinstance(kv_heads, bool) or not isinstance(kv_heads, int) or kv_heads < 1 or n_kv % kv_heads:
        divisors = [d for d in range(1, n_kv + 1) if n_kv % d == 0]
        raise ValueError(f"gqa.kv_heads={kv_heads!r} must divide the original's {n_kv} KV heads: one of {divisors}")
    if mode in CALIBRATED_GQA_MODES:
        group = n_kv // kv_heads
        if stats is None or stats.group_size != group:
            have = "none" if stats is None else f"group_size={stats.group_size}"
            raise ValueError(f"gqa.mode={mode!r} at gqa.kv_heads={kv_heads} needs calibration statistics with "
                             f"group moments of {group} KV heads (calibrate(..., group_size={group})); got {have}")
        stats.check_matches(config)


def _grouped(state: dict[str, torch.Tensor], prefix: str, *, kv_heads: int, n_kv: int, n_h: int,
             head_dim: int) -> GroupedAttention:
    """Pop one layer's q/k/v weights (and biases, as a last column) and o_proj's weight from ``state``."""
    def with_bias(name: str) -> torch.Tensor:
        weight = state.pop(f"{prefix}{name}_proj.weight").double()
        bias = state.pop(f"{prefix}{name}_proj.bias", None)
        return weight if bias is None else torch.cat([weight, bias.double()[:, None]], dim=1)  # (rows, I)

    g, t, r, d = kv_heads, n_kv // kv_heads, n_h // n_kv, head_dim
    q, k, v = (with_bias(name) for name in "qkv")
    o = state.pop(f"{prefix}o_proj.weight").double()
    return GroupedAttention(q=q.view(g, t, r, d, -1), k=k.view(g, t, d, -1), v=v.view(g, t, d, -1),
                            o=o.view(-1, g, t, r, d))


def _put(state: dict[str, torch.Tensor], prefix: str, w: GroupedAttention, *, bias: bool, dtype: torch.dtype) -> None:
    """Write a compressed layer back into ``state`` in HF layout (biases split off) and ``dtype``."""
    for name, x in (("q", w.q), ("k", w.k), ("v", w.v)):
        x = x.reshape(-1, x.shape[-1])  # (rows, I)
        state[f"{prefix}{name}_proj.weight"] = (x[:, :-1] if bias else x).to(dtype).contiguous()
        if bias:
            state[f"{prefix}{name}_proj.bias"] = x[:, -1].to(dtype).contiguous()
    state[f"{prefix}o_proj.weight"] = w.o.reshape(w.o.shape[0], -1).to(dtype).contiguous()  # (out, n_h·D)
    if w.key_basis is not None:
        state[f"{prefix}post_rope_proj.weight"] = w.key_basis.to(dtype).contiguous()


def _compressed_config(config, *, kv_heads: int, mode: str) -> LlamaConfig:
    fields = {key: value for key, value in config.to_dict().items() if key not in _NOT_LLAMA_FIELDS}
    if mode == "svd_a":
        return KVLatentConfig(**fields, num_key_value_heads=kv_heads, post_rope_key_heads=config.num_key_value_heads)
    return LlamaConfig(**fields, num_key_value_heads=kv_heads)


@torch.no_grad()
def compress_heads(original: PreTrainedModel, *, mode: str, kv_heads: int, stats: CalibrationStats | None = None,
                   query_aware: bool = False) -> PreTrainedModel:
    """A new model with ``kv_heads`` KV heads per layer, on ``original``'s device and dtype;
    ``original`` (a Llama, or a full-dim KV-Latent model) is untouched.

    ``stats``: for ``svd_a`` and ``rope_pca``, :func:`kv_latent.calibration.calibrate` of
    ``original`` with ``group_size = n_kv / kv_heads``. ``query_aware`` weights ``rope_pca``'s
    key reconstruction by the queries' pair energies. Returns a stock ``LlamaForCausalLM``, or
    for ``svd_a`` a full-dim :class:`KVLatentForCausalLM` that projects keys after RoPE. At
    ``kv_heads = n_kv`` every mode computes the original's function.
    """
    _check_request(original, mode=mode, kv_heads=kv_heads, stats=stats, query_aware=query_aware)
    config = original.config
    n_h, n_kv, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    param = next(original.parameters())
    state = {k: v.clone() for k, v in original.state_dict().items()}
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}.self_attn."
        bias = f"{prefix}q_proj.bias" in state
        weights = _grouped(state, prefix, kv_heads=kv_heads, n_kv=n_kv, n_h=n_h, head_dim=head_dim)
        layer_stats = stats.layer(i) if stats is not None else None
        _put(state, prefix, COMPRESSORS[mode](weights, layer_stats, query_aware=query_aware), bias=bias,
             dtype=param.dtype)

    new_config = _compressed_config(config, kv_heads=kv_heads, mode=mode)
    model_class = KVLatentForCausalLM if mode == "svd_a" else LlamaForCausalLM
    with no_init_weights(), torch.device(param.device):
        model = model_class(new_config).to(param.dtype)
    model.config._attn_implementation = config._attn_implementation
    model.tie_weights()  # no_init_weights skips the tying of a tie_word_embeddings model
    model.load_state_dict(state, strict=True)
    model.generation_config = original.generation_config
    return model.eval() if not original.training else model
