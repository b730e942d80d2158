"""KV-Latent Llama: a Llama decoder whose attention heads use reduced query/key (``k_dim``) and
value/output (``v_dim``) dims, with a per-layer RoPE schedule at the reduced key dim, or a
per-(layer, KV head) set of frequencies (``rope_inv_freq``, set by data-aware inits), and
optionally KV heads that are learned projections of several rotated keys (``post_rope_key_heads``,
the ``svd_a`` head compression of DESIGN.md §5).

Everything else is stock transformers Llama: the decoder layer, MLP, norms, cache and attention
registry are reused by subclassing; only the attention is new. The KV cache holds the reduced
dims. This file and ``rope.py`` are self-contained (relative imports only), so ``save_pretrained``
ships them with the checkpoint and stock transformers can load it with ``trust_remote_code=True``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.configuration_llama import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
    rotate_half,
)

from .rope import inv_freq as schedule_inv_freq, rope_as_run


@strict
class KVLatentConfig(LlamaConfig):
    """A Llama config with reduced per-head dims.

    ``k_dim`` / ``v_dim`` are the query-key and value-output dims per head (an int, or one per
    layer). ``head_dim`` stays the original model's head dim. ``rope_schedule`` names a schedule in
    ``rope.ROPE_SCHEDULES``; it applies to layers whose ``k_dim`` differs from ``head_dim``, and to
    full-dim layers too when ``rope_at_full_dim`` is set (the official code's behaviour).
    ``rope_inv_freq``, when set, holds per layer either None (the schedule applies) or the layer's
    own frequencies: one list of ``k_dim / 2`` values per KV head, shared by the query heads of its
    group (DESIGN.md §2.6); they are stored in the config, so a saved student reloads exactly.
    ``post_rope_key_heads``, when set, is the original KV-head count whose keys ``k_proj``
    computes and RoPE rotates before :class:`PostRopeKeyProj` maps each group of
    ``post_rope_key_heads / num_key_value_heads`` of them to one cached KV head (full dims only).
    """

    model_type = "kv_latent_llama"

    k_dim: int | list[int] | None = None
    v_dim: int | list[int] | None = None
    rope_schedule: str = "standard"
    rope_at_full_dim: bool = False
    rope_inv_freq: list[list[list[float]] | None] | None = None
    post_rope_key_heads: int | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        n = self.num_hidden_layers
        for key in ("k_dim", "v_dim"):
            value = getattr(self, key)
            value = self.head_dim if value is None else value
            value = [value] * n if isinstance(value, int) else list(value)
            if len(value) != n:
                raise ValueError(f"{key} has {len(value)} entries for {n} layers")
            setattr(self, key, value)
        if self.rope_inv_freq is not None:
            if len(self.rope_inv_freq) != n:
                raise ValueError(f"rope_inv_freq has {len(self.rope_inv_freq)} entries for {n} layers")
            for i, sets in enumerate(self.rope_inv_freq):
                shape = (self.num_key_value_heads, self.k_dim[i] // 2)
                if sets is not None and (len(sets) != shape[0] or any(len(f) != shape[1] for f in sets)):
                    raise ValueError(f"rope_inv_freq[{i}] must hold {shape[0]} lists of {shape[1]} frequencies")
        if self.post_rope_key_heads is not None:
            self._check_post_rope_key_heads()

    def _check_post_rope_key_heads(self) -> None:
        heads, n_kv = self.post_rope_key_heads, self.num_key_value_heads
        if heads < n_kv or heads % n_kv or self.num_attention_heads % heads:
            raise ValueError(f"post_rope_key_heads={heads} must be a multiple of num_key_value_heads={n_kv} "
                             f"dividing num_attention_heads={self.num_attention_heads}")
        if self.k_dim != [self.head_dim] * self.num_hidden_layers or self.rope_inv_freq is not None:
            raise ValueError("post_rope_key_heads needs full key dims (k_dim = head_dim) and no rope_inv_freq: "
                             "a model whose heads were compressed with svd_a keeps its key dims")

    def layer_rope_schedule(self, layer_idx: int) -> str:
        """The RoPE schedule in force for one layer (unless it has its own ``rope_inv_freq``)."""
        return rope_as_run(self.rope_schedule, k_dim=self.k_dim[layer_idx], head_dim=self.head_dim,
                           at_full_dim=self.rope_at_full_dim)

    def layer_inv_freq(self, layer_idx: int) -> list[list[float]] | None:
        """One layer's own frequencies per KV head, or None where its schedule applies."""
        return None if self.rope_inv_freq is None else self.rope_inv_freq[layer_idx]


class LatentRope(nn.Module):
    """RoPE cos/sin for one layer's reduced key dim (HF ``rotate_half`` layout): one schedule for
    all heads (``inv_freq``: (dim/2,)), or one set of frequencies per KV head (``head_inv_freq``;
    ``inv_freq``: (n_kv, dim/2))."""

    def __init__(self, *, dim: int, theta: float, schedule: str, head_inv_freq: list[list[float]] | None = None):
        super().__init__()
        self.dim, self.theta, self.schedule, self.head_inv_freq = dim, theta, schedule, head_inv_freq
        self.inv_freq = nn.Buffer(self._inv_freq(), persistent=False)

    def _inv_freq(self) -> torch.Tensor:
        if self.head_inv_freq is None:
            return schedule_inv_freq(self.schedule, dim=self.dim, theta=self.theta)
        return torch.tensor(self.head_inv_freq, dtype=torch.float64).float()  # (n_kv, dim/2)

    def reset_inv_freq(self) -> None:
        """Recompute the (non-persistent) ``inv_freq`` buffer, e.g. after ``from_pretrained``."""
        init.copy_(self.inv_freq, self._inv_freq())

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin: (B, T, dim) for a schedule, (B, n_kv, T, dim) for per-head frequencies."""
        inv_freq = self.inv_freq.to(device=x.device, dtype=torch.float)
        if inv_freq.dim() == 2:
            position_ids = position_ids[:, None]  # (B, 1, T): broadcast over the KV heads
            inv_freq = inv_freq[:, None]  # (n_kv, 1, dim/2)
        freqs = position_ids[..., None].float() * inv_freq  # (B, T, dim/2) or (B, n_kv, T, dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (..., T, dim)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (B, n_h, T, d) and k (B, n_kv, T, d) with :class:`LatentRope`'s cos/sin.

    Shared cos/sin (B, T, d) go through Llama's ``apply_rotary_pos_emb``; per-KV-head ones
    (B, n_kv, T, d) rotate each KV head and every query head of its group alike.
    """
    if cos.dim() == 3:
        return apply_rotary_pos_emb(q, k, cos, sin)
    b, n_h, t, d = q.shape
    n_kv = k.shape[1]
    grouped = q.view(b, n_kv, n_h // n_kv, t, d)  # (B, n_kv, g, T, d): query heads by KV head
    cos_q, sin_q = cos[:, :, None], sin[:, :, None]  # (B, n_kv, 1, T, d)
    q = (grouped * cos_q + rotate_half(grouped) * sin_q).reshape(b, n_h, t, d)  # (B, n_h, T, d)
    return q, k * cos + rotate_half(k) * sin


def _pad_last(x: torch.Tensor, width: int) -> torch.Tensor:
    return x if x.shape[-1] == width else F.pad(x, (0, width - x.shape[-1]))


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, *, scaling: float
) -> torch.Tensor:
    """Attention for a few new queries against the cache, at unequal q/k and v dims, no copies.

    q: (B, n_h, S, k_dim), k: (B, n_kv, T, k_dim), v: (B, n_kv, T, v_dim); ``mask`` is None, a
    boolean (True = attend) or an additive mask broadcastable to (B, n_h, S, T).
    Returns (B, S, n_h, v_dim). Query heads are grouped onto their KV head (no ``repeat_kv``).
    """
    b, n_h, s, _ = q.shape
    n_kv, t = k.shape[1], k.shape[2]
    g = n_h // n_kv
    scores = (q.reshape(b, n_kv, g * s, -1) @ k.transpose(-1, -2)) * scaling  # (B, n_kv, g*S, T)
    if mask is not None:
        mask = mask.expand(b, n_h, s, t).reshape(b, n_kv, g * s, t)
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = scores.softmax(dim=-1, dtype=torch.float32).to(v.dtype)
    out = probs @ v  # (B, n_kv, g*S, v_dim)
    return out.view(b, n_h, s, -1).transpose(1, 2)  # (B, S, n_h, v_dim)


class PostRopeKeyProj(nn.Module):
    """Projects groups of ``t`` rotated keys onto one KV head each (the ``svd_a`` compression).

    ``weight``: (n_kv, t·D, D), per new KV head an orthonormal basis ``Ψ`` of its group's
    concatenated post-RoPE keys: the cache holds ``k' = [RoPE(k_1) … RoPE(k_t)] Ψ`` and a query
    head of original KV head ``b`` of the group scores with ``RoPE(q) Ψ_b`` (``Ψ_b``: rows
    ``b·D:(b+1)·D``), so ``q·k_b ≈ (q Ψ_b)·k'``. Fresh weights are ``[I; …; I] / √t``.
    """

    def __init__(self, *, kv_heads: int, group_size: int, head_dim: int):
        super().__init__()
        self.kv_heads, self.group_size, self.head_dim = kv_heads, group_size, head_dim
        self.weight = nn.Parameter(torch.empty(kv_heads, group_size * head_dim, head_dim))

    def reset_parameters(self) -> None:
        eye = torch.eye(self.head_dim).repeat(self.group_size, 1) / self.group_size**0.5  # (t·D, D)
        init.copy_(self.weight, eye.expand_as(self.weight))

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated q (B, n_h, T, D) and k (B, n_kv·t, T, D) -> q' (B, n_h, T, D), k' (B, n_kv, T, D)."""
        b, n_h, seq, d = q.shape
        grouped = k.view(b, self.kv_heads, self.group_size, seq, d).transpose(2, 3)  # (B, n_kv, T, t, D)
        k = grouped.reshape(b, self.kv_heads, seq, -1) @ self.weight  # (B, n_kv, T, t·D) @ (n_kv, t·D, D)
        blocks = self.weight.view(-1, d, d)  # (n_kv·t, D, D): Ψ_b of each original KV head
        blocks = blocks.repeat_interleave(n_h // blocks.shape[0], dim=0)  # (n_h, D, D)
        return q @ blocks, k  # q @ blocks: (B, n_h, T, D)


DECODE_MAX_QUERIES = 8  # queries per step up to which asymmetric attention skips padding


class KVLatentAttention(LlamaAttention):
    """Llama attention with ``k_dim`` for queries/keys and ``v_dim`` for values/outputs.

    Fused attention kernels (SDPA's CPU flash kernel, FlashAttention) need equal q/k/v head dims.
    When ``k_dim != v_dim``: a prefill zero-pads the smaller side to the larger *after* the cache
    update, so the cache keeps the reduced dims while the kernel stays fused (zero channels change
    neither the scores q·k nor the kept output channels; the scale stays ``k_dim ** -0.5``); a
    decode step, which is memory-bound, reads the unpadded cache directly (:func:`decode_attention`)
    instead of copying it into a padded buffer every step.
    """

    def __init__(self, config: KVLatentConfig, layer_idx: int):
        nn.Module.__init__(self)
        self.config = config
        self.layer_idx = layer_idx
        self.k_dim = config.k_dim[layer_idx]
        self.v_dim = config.v_dim[layer_idx]
        self.head_dim = self.k_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.k_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        n_h, n_kv, hidden, bias = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.hidden_size,
            config.attention_bias,
        )
        key_heads = config.post_rope_key_heads or n_kv
        self.q_proj = nn.Linear(hidden, n_h * self.k_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, key_heads * self.k_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, n_kv * self.v_dim, bias=bias)
        self.o_proj = nn.Linear(n_h * self.v_dim, hidden, bias=bias)
        self.rope = LatentRope(
            dim=self.k_dim,
            theta=config.rope_parameters["rope_theta"],
            schedule=config.layer_rope_schedule(layer_idx),
            head_inv_freq=config.layer_inv_freq(layer_idx),
        )
        self.post_rope_proj = None
        if config.post_rope_key_heads is not None:
            self.post_rope_proj = PostRopeKeyProj(kv_heads=n_kv, group_size=key_heads // n_kv, head_dim=self.k_dim)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        position_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # ``position_embeddings`` (the model-level RoPE at the original head_dim) is ignored:
        # each layer rotates at its own reduced key dim.
        input_shape = hidden_states.shape[:-1]  # (B, T)
        q = self.q_proj(hidden_states).view(*input_shape, -1, self.k_dim).transpose(1, 2)  # (B, n_h, T, k_dim)
        k = self.k_proj(hidden_states).view(*input_shape, -1, self.k_dim).transpose(1, 2)  # (B, key heads, T, k_dim)
        v = self.v_proj(hidden_states).view(*input_shape, -1, self.v_dim).transpose(1, 2)  # (B, n_kv, T, v_dim)

        if position_ids is None:
            past = cache.get_seq_length(self.layer_idx) if cache is not None else 0
            position_ids = torch.arange(past, past + input_shape[1], device=q.device)[None]  # (1, T)
        cos, sin = self.rope(q, position_ids)
        q, k = apply_rope(q, k, cos, sin)
        if self.post_rope_proj is not None:
            q, k = self.post_rope_proj(q, k)  # k: (B, n_kv, T, k_dim)

        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)

        decoding = q.shape[2] <= DECODE_MAX_QUERIES < k.shape[2]
        if self.k_dim != self.v_dim and decoding and not kwargs.get("output_attentions"):
            out = decode_attention(q, k, v, attention_mask, scaling=self.scaling)  # (B, S, n_h, v_dim)
            return self.o_proj(out.reshape(*input_shape, -1)), None

        width = max(self.k_dim, self.v_dim)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        out, weights = attention_interface(
            self,
            _pad_last(q, width),
            _pad_last(k, width),
            _pad_last(v, width),
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )  # out: (B, T, n_h, width)
        out = out[..., : self.v_dim].reshape(*input_shape, -1)  # (B, T, n_h * v_dim)
        return self.o_proj(out), weights


class KVLatentDecoderLayer(LlamaDecoderLayer):
    """A Llama decoder layer whose attention is :class:`KVLatentAttention`."""

    def __init__(self, config: KVLatentConfig, layer_idx: int):
        # Built directly (not via LlamaDecoderLayer.__init__) so no full-size attention is allocated.
        GradientCheckpointingLayer.__init__(self)
        self.hidden_size = config.hidden_size
        self.self_attn = KVLatentAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class KVLatentPreTrainedModel(LlamaPreTrainedModel):
    config_class = KVLatentConfig
    config: KVLatentConfig
    _no_split_modules = ["KVLatentDecoderLayer"]
    _can_record_outputs = {
        "hidden_states": KVLatentDecoderLayer,
        "attentions": KVLatentAttention,
    }

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, LatentRope):
            module.reset_inv_freq()
        elif isinstance(module, PostRopeKeyProj):
            module.reset_parameters()


class KVLatentModel(KVLatentPreTrainedModel, LlamaModel):
    """``LlamaModel`` with :class:`KVLatentDecoderLayer` layers; ``forward`` is Llama's."""

    def __init__(self, config: KVLatentConfig):
        KVLatentPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [KVLatentDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()


class KVLatentForCausalLM(KVLatentPreTrainedModel, LlamaForCausalLM):
    """Causal LM head on :class:`KVLatentModel`; use like ``LlamaForCausalLM``."""

    def __init__(self, config: KVLatentConfig):
        KVLatentPreTrainedModel.__init__(self, config)
        self.model = KVLatentModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


KVLatentConfig.register_for_auto_class()
KVLatentForCausalLM.register_for_auto_class("AutoModelForCausalLM")

if __package__ == "kv_latent":  # the installed package; a checkpoint's remote copy leaves the registry alone
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoConfig.register(KVLatentConfig.model_type, KVLatentConfig, exist_ok=True)
    AutoModelForCausalLM.register(KVLatentConfig, KVLatentForCausalLM, exist_ok=True)
