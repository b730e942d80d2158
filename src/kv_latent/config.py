"""Typed configuration: one dataclass per Hydra config group, validated before any heavy work.

The Hydra entry point (``src/run.py``) turns its ``DictConfig`` into an :class:`ExperimentConfig`
through :func:`to_experiment`; everything below the entry point takes these dataclasses (or plain
arguments), never a ``DictConfig``. Every domain rule lives in :func:`validate`, and every error
names the config key at fault and what would be right.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from kv_latent.rope import ROPE_SCHEDULES


class ConfigError(ValueError):
    """An invalid configuration value; the message names the key and the fix."""


@dataclass
class ModelConfig:
    """The original (teacher) model. Architecture facts are declared so they can be checked
    before anything is loaded; they are checked again against the loaded model."""

    name: str = "tiny_mha"
    source: str = "embedded"  # embedded | smollm2_gguf | hf
    path: str | None = None  # HF directory or hub id (source=hf); asset name (source=embedded)
    head_dim: int = 64
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    num_hidden_layers: int = 4
    pretrain_tokens: int | None = None  # known pre-training tokens, for budgets as a fraction
    dtype: str = "float32"
    # LlamaConfig arguments beyond the fields above (hidden_size, vocab_size, ...), used only to
    # build the model from scratch for pretraining (train.stages=[pretrain]).
    arch: dict[str, Any] | None = None


@dataclass
class KVConfig:
    """Reduced per-head dims: ``k_dim`` is d_qk (queries and keys), ``v_dim`` is d_vo."""

    k_dim: int = 64
    v_dim: int = 64
    init: str = "strided"


@dataclass
class RopeConfig:
    schedule: str = "standard"
    at_full_dim: bool = False  # apply the schedule even when k_dim == head_dim (official code: True)


@dataclass
class GQAConfig:
    mode: str = "keep"


KV_INITS = ("strided",)
GQA_MODES = ("keep",)
MODEL_SOURCES = ("embedded", "smollm2_gguf", "hf")


def check_kv_dims(
    *,
    k_dim: int,
    v_dim: int,
    head_dim: int,
    num_attention_heads: int,
    num_key_value_heads: int,
    init: str = "strided",
    schedule: str = "standard",
    at_full_dim: bool = False,
) -> None:
    """Check the KV-Latent domain rules; raise :class:`ConfigError` naming the offending key."""
    if schedule not in ROPE_SCHEDULES:
        raise ConfigError(f"rope.schedule={schedule!r} is unknown; choose one of {sorted(ROPE_SCHEDULES)}")
    if init not in KV_INITS:
        raise ConfigError(f"kv.init={init!r} is unknown; choose one of {list(KV_INITS)}")
    if num_key_value_heads <= 0 or num_attention_heads % num_key_value_heads:
        raise ConfigError(
            f"model.num_key_value_heads={num_key_value_heads} must divide "
            f"model.num_attention_heads={num_attention_heads}"
        )
    for key, dim in (("kv.k_dim", k_dim), ("kv.v_dim", v_dim)):
        if not 0 < dim <= head_dim:
            raise ConfigError(f"{key}={dim} must be in 1..{head_dim} (the model's head_dim)")
        if init == "strided" and head_dim % dim:
            divisors = [d for d in range(1, head_dim + 1) if head_dim % d == 0]
            raise ConfigError(
                f"{key}={dim} must divide head_dim={head_dim} for kv.init=strided; allowed: {divisors}"
            )
    if k_dim % 2:
        raise ConfigError(f"kv.k_dim={k_dim} must be even: RoPE rotates channel pairs")
    rope_applies = k_dim != head_dim or at_full_dim
    if schedule == "freq_aware" and rope_applies and k_dim % 4:
        raise ConfigError(
            f"kv.k_dim={k_dim} must be a multiple of 4 for rope.schedule=freq_aware "
            f"(or use rope.schedule=standard)"
        )


@dataclass
class ExperimentConfig:
    """The typed view of one job's configuration (groups the entry point composes)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    kv: KVConfig = field(default_factory=KVConfig)
    rope: RopeConfig = field(default_factory=RopeConfig)
    gqa: GQAConfig = field(default_factory=GQAConfig)


def from_mapping(cls: type, values: dict[str, Any] | None, prefix: str):
    """Build dataclass ``cls`` from a plain mapping (a resolved config group named ``prefix``);
    unknown keys raise :class:`ConfigError` naming them and the known ones."""
    values = dict(values or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {[f'{prefix}.{k}' for k in unknown]}; known: {sorted(known)}")
    return cls(**values)


def validate(cfg: ExperimentConfig) -> ExperimentConfig:
    """Check every domain rule of ``cfg``; return it unchanged or raise :class:`ConfigError`."""
    m = cfg.model
    if m.source not in MODEL_SOURCES:
        raise ConfigError(f"model.source={m.source!r} is unknown; choose one of {list(MODEL_SOURCES)}")
    if cfg.gqa.mode not in GQA_MODES:
        raise ConfigError(f"gqa.mode={cfg.gqa.mode!r} is unknown; choose one of {list(GQA_MODES)}")
    check_kv_dims(
        k_dim=cfg.kv.k_dim,
        v_dim=cfg.kv.v_dim,
        head_dim=m.head_dim,
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_key_value_heads,
        init=cfg.kv.init,
        schedule=cfg.rope.schedule,
        at_full_dim=cfg.rope.at_full_dim,
    )
    return cfg


def to_experiment(container: dict[str, Any]) -> ExperimentConfig:
    """Build and validate an :class:`ExperimentConfig` from a resolved plain dict."""
    cfg = ExperimentConfig(
        model=from_mapping(ModelConfig, container.get("model"), "model"),
        kv=from_mapping(KVConfig, container.get("kv"), "kv"),
        rope=from_mapping(RopeConfig, container.get("rope"), "rope"),
        gqa=from_mapping(GQAConfig, container.get("gqa"), "gqa"),
    )
    return validate(cfg)
