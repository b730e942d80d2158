"""The rules between config groups (DESIGN.md §3.1), checked before any model loads.

Each group's own ranges are checked by its dataclass in :mod:`kv_latent.config`; what can only be
judged across groups (the reduced dims and their inits against the model's head_dim and RoPE
schedule, windows against the model's context, the budget against one step, the batch against the
devices, task names against lm-eval) is checked here, with an error that names the key and the fix.
"""

from __future__ import annotations

from kv_latent.config import (
    CALIBRATED_GQA_MODES,
    CALIBRATED_INITS,
    AblationConfig,
    ConfigError,
    DataConfig,
    ModelConfig,
    PretrainConfig,
    PretrainInit,
    TrainConfig,
    TrainerConfig,
)


def check_kv_dims(
    *,
    k_dim: int,
    v_dim: int,
    head_dim: int,
    qk_init: str = "strided",
    vo_init: str = "strided",
    schedule: str = "standard",
    at_full_dim: bool = False,
) -> None:
    """The KV-Latent dimension and init rules; raise :class:`ConfigError` naming the offending key."""
    for key, dim, init_key, init in (("kv.k_dim", k_dim, "kv.qk_init", qk_init),
                                     ("kv.v_dim", v_dim, "kv.vo_init", vo_init)):
        if not 0 < dim <= head_dim:
            raise ConfigError(f"{key}={dim} must be in 1..{head_dim} (the model's head_dim)")
        if init == "strided" and head_dim % dim:
            divisors = [d for d in range(1, head_dim + 1) if head_dim % d == 0]
            raise ConfigError(
                f"{key}={dim} must divide head_dim={head_dim} for {init_key}=strided; allowed: {divisors}"
            )
    if k_dim % 2:
        raise ConfigError(f"kv.k_dim={k_dim} must be even: RoPE rotates channel pairs")
    rope_applies = k_dim != head_dim or at_full_dim
    if schedule == "freq_aware" and rope_applies and k_dim % 4:
        raise ConfigError(
            f"kv.k_dim={k_dim} must be a multiple of 4 for rope.schedule=freq_aware (or use rope=standard)"
        )
    _check_qk_init(qk_init, k_dim=k_dim, head_dim=head_dim, schedule=schedule)


def _check_qk_init(qk_init: str, *, k_dim: int, head_dim: int, schedule: str) -> None:
    """``freq_matched`` realises freq_aware RoPE with original frequencies (pair ``arr_j * r / 2``),
    so it needs that schedule and an even integer ``r = head_dim / k_dim``; ``qk_energy`` keeps each
    pair at its original frequency, so no other schedule can apply (DESIGN.md §2.6)."""
    if qk_init == "freq_matched":
        if schedule != "freq_aware":
            raise ConfigError(
                f"kv.qk_init=freq_matched keeps the original pairs whose frequencies frequency-aware RoPE "
                f"uses; it needs rope=freq_aware (got rope.schedule={schedule})"
            )
        allowed = [d for d in range(4, head_dim, 4) if head_dim % d == 0 and (head_dim // d) % 2 == 0]
        if k_dim not in allowed:
            raise ConfigError(
                f"kv.k_dim={k_dim} does not suit kv.qk_init=freq_matched, which needs a reduced width with "
                f"head_dim / kv.k_dim an even integer (head_dim={head_dim}); allowed: {allowed}"
            )
    if qk_init == "qk_energy" and schedule != "standard":
        raise ConfigError(
            f"kv.qk_init=qk_energy keeps every pair at its original frequency, so rope.schedule={schedule} "
            "would not apply; use rope=standard"
        )


def check_gqa(cfg: AblationConfig) -> None:
    """Head compression against the model's heads and the dims it composes with (DESIGN.md §5)."""
    gqa, m = cfg.gqa, cfg.model
    if not gqa.converts:
        return
    n_kv = m.num_key_value_heads
    if gqa.kv_heads > n_kv or n_kv % gqa.kv_heads:
        allowed = [d for d in range(1, n_kv + 1) if n_kv % d == 0]
        raise ConfigError(
            f"gqa.kv_heads={gqa.kv_heads} must divide the KV heads of model {m.name!r} "
            f"(model.num_key_value_heads={n_kv}); allowed: {allowed}"
        )
    if gqa.mode == "svd_a" and not dims_kept(cfg):
        kv = cfg.kv
        raise ConfigError(
            f"gqa.mode=svd_a projects keys after RoPE, which composes with the full dims only (kv.k_dim = "
            f"kv.v_dim = head_dim = {m.head_dim}, strided inits, no rope.at_full_dim schedule); got kv.k_dim="
            f"{kv.k_dim}, kv.v_dim={kv.v_dim}, kv.qk_init={kv.qk_init}, kv.vo_init={kv.vo_init}: use "
            "gqa=rope_pca to combine head compression with reduced dims"
        )


def dims_kept(cfg: AblationConfig) -> bool:
    """Whether the dims surgery leaves a model's function and layout as they are: full dims,
    strided inits, no RoPE schedule at full dim."""
    m, kv, rope = cfg.model, cfg.kv, cfg.rope
    return ((kv.k_dim, kv.v_dim) == (m.head_dim, m.head_dim) and (kv.qk_init, kv.vo_init) == ("strided", "strided")
            and (rope.schedule == "standard" or not rope.at_full_dim))


def check_calibration(cfg: AblationConfig) -> None:
    """Calibration settings against the inits and head compressions that need them and the model's context."""
    for group, needing in (
        ("kv", [f"kv.{key}={getattr(cfg.kv, key)}" for key in ("qk_init", "vo_init")
                if getattr(cfg.kv, key) in CALIBRATED_INITS]),
        ("gqa", [f"gqa.mode={cfg.gqa.mode}"] if cfg.gqa.mode in CALIBRATED_GQA_MODES else []),
    ):
        settings = getattr(cfg, group)
        if needing and settings.calib_tokens == 0:
            raise ConfigError(
                f"{' and '.join(needing)} need(s) calibration statistics of the original model: "
                f"set {group}.calib_tokens > 0 (got 0)"
            )
        if needing and settings.calib_seq_len > cfg.model.max_position_embeddings:
            raise ConfigError(
                f"{group}.calib_seq_len={settings.calib_seq_len} exceeds the context of model {cfg.model.name!r} "
                f"(model.max_position_embeddings={cfg.model.max_position_embeddings}); use at most that"
            )


def _check_windows(model: ModelConfig, train: TrainConfig, data: DataConfig, prefix: str = "") -> None:
    if train.seq_len > model.max_position_embeddings:
        raise ConfigError(
            f"{prefix}train.seq_len={train.seq_len} exceeds the context of model {model.name!r} "
            f"(model.max_position_embeddings={model.max_position_embeddings}); use at most that"
        )
    if data.seq_len != train.seq_len:
        raise ConfigError(f"{prefix}data.seq_len={data.seq_len} must equal {prefix}train.seq_len={train.seq_len}")
    budget = train.budget_tokens(model.pretrain_tokens)
    if budget < train.tokens_per_step * len(train.stages):  # surgery only (no stages) needs no budget
        raise ConfigError(
            f"the budget of {budget} tokens ({prefix}train.tokens / {prefix}train.pretrain_fraction) is less "
            f"than one step of {train.tokens_per_step} tokens ({prefix}train.batch_size x {prefix}train.seq_len) "
            f"per stage of {[str(s) for s in train.stages]}"
        )


def _check_devices(trainer: TrainerConfig, train: TrainConfig, prefix: str = "") -> None:
    if trainer.wants_cuda:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"trainer.accelerator={trainer.accelerator} but no CUDA device is visible; use trainer=cpu")
    if isinstance(trainer.devices, int) and train.batch_size % trainer.devices:
        raise ConfigError(
            f"{prefix}train.batch_size={train.batch_size} must be divisible by trainer.devices={trainer.devices} "
            "(it is the global batch)"
        )


def check_ablation(cfg: AblationConfig) -> AblationConfig:
    """The rules between groups of an ablation job; return ``cfg`` or raise :class:`ConfigError`."""
    m = cfg.model
    if cfg.train.pretraining:
        raise ConfigError(
            "train.stages=[pretrain] builds a base model, which is its own workflow: "
            "python src/pretrain.py recipe=<recipe> model=<name> (conf/pretrain.yaml, conf/recipe/)"
        )
    check_kv_dims(k_dim=cfg.kv.k_dim, v_dim=cfg.kv.v_dim, head_dim=m.head_dim, qk_init=cfg.kv.qk_init,
                  vo_init=cfg.kv.vo_init, schedule=cfg.rope.schedule, at_full_dim=cfg.rope.at_full_dim)
    check_gqa(cfg)
    check_calibration(cfg)
    _check_windows(m, cfg.train, cfg.data)
    _check_devices(cfg.trainer, cfg.train)
    cfg.eval.check_context(m.max_position_embeddings)
    _check_tasks(cfg.eval.tasks)
    return cfg


def check_pretrain(cfg: PretrainConfig) -> PretrainConfig:
    """The rules between groups of a base-model recipe; return ``cfg`` or raise :class:`ConfigError`."""
    if not cfg.steps:
        raise ConfigError("steps is empty: a base-model recipe needs at least one step")
    if cfg.init == PretrainInit.scratch and not cfg.model.arch:
        raise ConfigError(f"init=scratch builds model {cfg.model.name!r} from model.arch, which is not set")
    names = [s.name for s in cfg.steps]
    if len(set(names)) != len(names):
        raise ConfigError(f"steps have repeated names {names}; each step's name must be unique")
    for i, step in enumerate(cfg.steps):
        prefix = f"steps[{i}]."
        if not step.train.pretraining:
            raise ConfigError(f"{prefix}train.stages={[str(s) for s in step.train.stages]} must be [pretrain]")
        _check_windows(cfg.model, step.train, step.data, prefix)
        _check_devices(cfg.trainer, step.train, prefix)
    return cfg


def _check_tasks(tasks: list[str]) -> None:
    from kv_latent.evaluation.lm_eval_tasks import OFFLINE_TASKS, unknown_tasks

    unknown = unknown_tasks(tasks)
    if unknown:
        raise ConfigError(
            f"eval.tasks names unknown task(s) {unknown}; the offline suite is {list(OFFLINE_TASKS)}, "
            "other names must be lm-eval tasks"
        )
