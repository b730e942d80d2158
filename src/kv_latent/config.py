"""Typed configuration: one dataclass per config group (DESIGN.md §3.1).

These dataclasses are the schema of ``conf/``. The entry points register them with Hydra, so a
wrong type, an unknown key or an unknown choice is rejected while the config is composed, naming
the key; ``OmegaConf.to_object`` then builds the dataclasses, whose ``__post_init__`` checks each
group's own ranges; :mod:`kv_latent.rules` checks the rules that span groups. All of it runs
before any model loads, and every error names the key at fault and what would be right. Defaults live here only: the YAML files of ``conf/`` hold what differs.

The library never sees a ``DictConfig``: it takes these dataclasses or plain arguments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Optional

from omegaconf import MISSING

from kv_latent.rope import ROPE_SCHEDULES


class ConfigError(ValueError):
    """An invalid configuration value; the message names the key and the fix."""


def _choices(name: str, values) -> type[StrEnum]:
    return StrEnum(name, {v: v for v in values})


# Choices, checked by the schema. Enum members are ``str``s: ``RopeSchedule.standard == "standard"``.
RopeSchedule = _choices("RopeSchedule", ROPE_SCHEDULES)
QKInit = _choices("QKInit", ["strided", "freq_matched", "qk_energy"])
VOInit = _choices("VOInit", ["strided", "pca"])
GQAMode = _choices("GQAMode", ["keep", "mean_pool", "svd_w", "svd_a", "rope_pca"])
ModelSource = _choices("ModelSource", ["embedded", "smollm2_gguf", "hf"])
DType = _choices("DType", ["float32", "bfloat16", "float16"])
DataSource = _choices("DataSource", ["prose", "hf"])
Stage = _choices("Stage", ["pretrain", "intra", "ntp", "kd"])
PretrainInit = _choices("PretrainInit", ["scratch", "original"])
Accelerator = _choices("Accelerator", ["cpu", "gpu", "cuda", "mps", "auto"])
Precision = _choices("Precision", ["auto", "32-true", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64-true"])
LoggerName = _choices("LoggerName", ["wandb", "none"])
WandbMode = _choices("WandbMode", ["offline", "online", "disabled"])
Clock = _choices("Clock", ["auto", "wall", "cpu"])

TEACHER_STAGES = frozenset({"intra", "kd"})
CALIBRATED_INITS = frozenset({"qk_energy", "pca"})  # inits that need kv_latent.calibration statistics
CALIBRATED_GQA_MODES = frozenset({"svd_a", "rope_pca"})  # head compressions that need them
# [] is surgery only: the student is evaluated as surgery left it, with no retraining.
RETRAIN_RECIPES = [[], ["intra"], ["ntp"], ["kd"], ["intra", "ntp"], ["intra", "kd"]]
RECALL_MIN_SEQ_LEN = 16  # room for a few periods of the shortest repeat document
RECALL_FACT_MIN_SEQ_LEN = 128  # room for a fact, its query and a repeat besides the prose


def recipe_name(stages) -> str:
    """A retraining recipe as run names and tables show it: ``intra+ntp``; ``surgery`` for none."""
    return "+".join(str(s) for s in stages) or "surgery"


def _positive(prefix: str, obj: Any, *keys: str) -> None:
    for key in keys:
        value = getattr(obj, key)
        if value is not None and value <= 0:
            raise ConfigError(f"{prefix}.{key}={value} must be positive")


# ----------------------------------------------------------------------------------------------
# model, kv, rope, gqa


@dataclass
class ModelConfig:
    """The original (teacher) model. Its architecture facts have no defaults: each ``conf/model``
    file declares them, so they can be checked before anything is loaded; they are checked again
    against the loaded model's config."""

    name: str
    head_dim: int
    num_attention_heads: int
    num_key_value_heads: int
    num_hidden_layers: int
    max_position_embeddings: int  # the context length; no window may exceed it
    source: ModelSource = ModelSource.embedded
    path: Optional[str] = None  # HF directory or hub id (source=hf); asset name (source=embedded)
    pretrain_tokens: Optional[int] = None  # known pre-training tokens, for budgets as a fraction
    dtype: DType = DType.float32
    # The share of synthetic recall documents (kv_latent.data.recall) in retraining data that keeps
    # what the model learnt from them in its own pre-training: the default data group
    # (conf/data/prose.yaml) reads it. 0 for a model pre-trained without them.
    recall_fraction: float = 0.0
    # Further LlamaConfig arguments (hidden_size, vocab_size, ...), used only to build the model
    # from scratch (``python src/pretrain.py recipe=scratch``).
    arch: Optional[dict[str, Any]] = None

    def __post_init__(self) -> None:
        _positive("model", self, "head_dim", "num_attention_heads", "num_key_value_heads", "num_hidden_layers",
                  "max_position_embeddings", "pretrain_tokens")
        if not 0 <= self.recall_fraction < 1:
            raise ConfigError(f"model.recall_fraction={self.recall_fraction} must be in [0, 1)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"model.num_key_value_heads={self.num_key_value_heads} must divide "
                f"model.num_attention_heads={self.num_attention_heads}"
            )


@dataclass
class KVConfig:
    """Reduced per-head dims: ``k_dim`` is d_qk (queries and keys), ``v_dim`` is d_vo (DESIGN.md §2.1),
    and how the reduced weights are initialised: ``qk_init`` chooses the kept query/key channels,
    ``vo_init`` the value/output map (DESIGN.md §2.6).

    ``qk_energy`` and ``pca`` need statistics of the original model on the first ``calib_tokens``
    tokens of the train split, in blocks of ``calib_seq_len`` (:mod:`kv_latent.calibration`; 0
    tokens: no calibration). The default, 64 blocks of 256 tokens, calibrates the tiny models in
    seconds and SmolLM2-135M in minutes on a 2-core CPU.
    """

    k_dim: int = 64
    v_dim: int = 64
    qk_init: QKInit = QKInit.strided
    vo_init: VOInit = VOInit.strided
    calib_tokens: int = 16_384
    calib_seq_len: int = 256

    def __post_init__(self) -> None:
        if self.calib_tokens < 0:
            raise ConfigError(f"kv.calib_tokens={self.calib_tokens} must be >= 0 (0: no calibration)")
        _positive("kv", self, "calib_seq_len")

    @property
    def needs_calibration(self) -> bool:
        """Whether an init of this config needs calibration statistics."""
        return self.qk_init in CALIBRATED_INITS or self.vo_init in CALIBRATED_INITS


@dataclass
class RopeConfig:
    """The RoPE schedule of the reduced keys (DESIGN.md §2.2)."""

    schedule: RopeSchedule = RopeSchedule.standard
    at_full_dim: bool = False  # apply the schedule even when k_dim == head_dim (official code: true)


@dataclass
class GQAConfig:
    """Head compression (DESIGN.md §5): ``mode`` merges each group of consecutive KV heads into
    ``kv_heads`` KV heads per layer, before the ``kv`` dims are reduced. ``keep`` leaves the heads as
    they are (``kv_heads`` unset). ``svd_a`` and ``rope_pca`` read calibration statistics of the
    original over ``calib_tokens`` train-split tokens in blocks of ``calib_seq_len``;
    ``query_aware`` weights ``rope_pca``'s per-frequency PCA by the query energies."""

    mode: GQAMode = GQAMode.keep
    kv_heads: Optional[int] = None
    query_aware: bool = False
    calib_tokens: int = 16_384
    calib_seq_len: int = 256

    def __post_init__(self) -> None:
        if self.mode == GQAMode.keep and self.kv_heads is not None:
            raise ConfigError(
                f"gqa.kv_heads={self.kv_heads} is set but gqa.mode=keep keeps the original heads; choose a "
                "compression (gqa=mean_pool|svd_w|svd_a|rope_pca) or drop gqa.kv_heads"
            )
        if self.mode != GQAMode.keep and self.kv_heads is None:
            raise ConfigError(f"gqa.mode={self.mode} needs gqa.kv_heads (the KV heads per layer after it)")
        if self.kv_heads is not None and self.kv_heads <= 0:
            raise ConfigError(f"gqa.kv_heads={self.kv_heads} must be positive")
        if self.query_aware and self.mode != GQAMode.rope_pca:
            raise ConfigError(f"gqa.query_aware=true weights rope_pca's PCA; gqa.mode={self.mode} has none")
        if self.calib_tokens < 0:
            raise ConfigError(f"gqa.calib_tokens={self.calib_tokens} must be >= 0 (0: no calibration)")
        _positive("gqa", self, "calib_seq_len")

    @property
    def converts(self) -> bool:
        return self.mode != GQAMode.keep

    @property
    def needs_calibration(self) -> bool:
        return self.mode in CALIBRATED_GQA_MODES


# ----------------------------------------------------------------------------------------------
# train, trainer


@dataclass
class TrainConfig:
    """What is trained, on how many tokens, with which optimiser (DESIGN.md §2.3).

    Exactly one of ``tokens`` (a token budget) and ``pretrain_fraction`` (a fraction of the base
    model's pre-training tokens) is set. ``batch_size`` is the global batch in sequences per
    optimiser step, whatever the number of devices, so the data order does not depend on them.
    The defaults are the paper's recipe scaled to the embedded tiny models on a 2-core CPU:
    Stage I for a quarter of 192 steps of 8 x 256 tokens, then next-token prediction.
    """

    stages: list[Stage] = field(default_factory=lambda: [Stage.intra, Stage.ntp])
    intra_share: float = 0.25  # share of the steps given to Stage I when it precedes another stage
    tokens: Optional[int] = 393_216
    pretrain_fraction: Optional[float] = None
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 1e-3
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # max global grad norm; 0 turns clipping off
    kd_temperature: float = 2.0
    # The paper's LoRA on Llama-3-8B is rank 256 / alpha 512 at hidden 4096: the same ratios here.
    lora_rank: int = 16  # 0: no LoRA, the MLP stays frozen
    lora_alpha: float = 32.0
    train_norms: bool = False
    seed: int = 0
    checkpoint_every: int = 64  # optimiser steps between writes of last.ckpt
    log_every: int = 8

    def __post_init__(self) -> None:
        unknown = [str(s) for s in self.stages if s not in Stage.__members__]
        if unknown:
            raise ConfigError(f"train.stages names unknown stage(s) {unknown}; choose from {list(Stage.__members__)}")
        self.stages = [Stage(s) for s in self.stages]
        self.betas = tuple(self.betas)
        if len(self.betas) != 2:
            raise ConfigError(f"train.betas={list(self.betas)} must be two numbers in [0, 1)")
        if self.stages != [Stage.pretrain] and self.stages not in RETRAIN_RECIPES:
            raise ConfigError(
                f"train.stages={[str(s) for s in self.stages]} is not a supported recipe; use one of "
                f"{RETRAIN_RECIPES} (Stage I 'intra' may only precede 'ntp' or 'kd')"
            )
        if len(self.stages) > 1 and not 0 < self.intra_share < 1:
            raise ConfigError(
                f"train.intra_share={self.intra_share} must be in (0, 1) for stages {[str(x) for x in self.stages]}"
            )
        if (self.tokens is None) == (self.pretrain_fraction is None):
            raise ConfigError(
                "set exactly one of train.tokens and train.pretrain_fraction (the other null); "
                f"got tokens={self.tokens}, pretrain_fraction={self.pretrain_fraction}"
            )
        _positive("train", self, "tokens", "pretrain_fraction", "batch_size", "checkpoint_every", "log_every",
                  "lr", "kd_temperature")
        if self.seq_len < 2:
            raise ConfigError(f"train.seq_len={self.seq_len} must be >= 2 (next-token prediction needs a target)")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"train.warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"train.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        for key in ("weight_decay", "grad_clip", "lora_rank"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key}={getattr(self, key)} must be >= 0")
        if not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"train.betas={list(self.betas)} must be two numbers in [0, 1)")
        if self.lora_rank > 0 and not self.lora_alpha > 0:
            raise ConfigError(f"train.lora_alpha={self.lora_alpha} must be > 0 when train.lora_rank > 0")

    @property
    def pretraining(self) -> bool:
        return self.stages == [Stage.pretrain]

    @property
    def retrains(self) -> bool:
        """False for surgery only (``stages=[]``)."""
        return bool(self.stages)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def needs_teacher(self) -> bool:
        return bool(TEACHER_STAGES.intersection(self.stages))

    def budget_tokens(self, pretrain_tokens: int | None = None) -> int:
        """The token budget; ``pretrain_tokens`` (the base model's) is needed for ``pretrain_fraction``."""
        if self.tokens is not None:
            return int(self.tokens)
        if not pretrain_tokens:
            raise ConfigError(
                f"train.pretrain_fraction={self.pretrain_fraction} needs the base model's pre-training "
                "tokens (model.pretrain_tokens), which are unknown; set train.tokens instead"
            )
        return int(self.pretrain_fraction * pretrain_tokens)

    def total_steps(self, pretrain_tokens: int | None = None) -> int:
        """Optimiser steps for the budget (rounded up to whole batches)."""
        return max(1, math.ceil(self.budget_tokens(pretrain_tokens) / self.tokens_per_step))

    def stage_at(self, step: int, total_steps: int) -> str:
        """The stage of global step ``step`` (0-based): a pure function, so resume is exact."""
        if len(self.stages) == 1:
            return self.stages[0]
        intra_steps = min(max(round(total_steps * self.intra_share), 1), total_steps - 1)
        return self.stages[0] if step < intra_steps else self.stages[1]


@dataclass
class TrainerConfig:
    """Where and how Lightning runs (``conf/trainer``). ``precision=auto``: bf16-mixed where the
    hardware has bf16 (CUDA, CPUs with avx512_bf16/AMX), else 32-true."""

    accelerator: Accelerator = Accelerator.cpu
    devices: Any = 1  # a count, a list of ids or "auto", as Lightning takes it
    strategy: str = "auto"
    precision: Precision = Precision.auto
    num_nodes: int = 1
    enable_progress_bar: bool = True

    def __post_init__(self) -> None:
        _positive("trainer", self, "num_nodes")
        if isinstance(self.devices, bool) or not (
            self.devices == "auto" or (isinstance(self.devices, int) and self.devices > 0)
            or (isinstance(self.devices, list) and self.devices)
        ):
            raise ConfigError(f"trainer.devices={self.devices!r} must be a positive count, a list of ids or 'auto'")

    @property
    def wants_cuda(self) -> bool:
        return self.accelerator in (Accelerator.gpu, Accelerator.cuda)


# ----------------------------------------------------------------------------------------------
# data


@dataclass
class DataConfig:
    """Which text, and how it becomes training blocks (DESIGN.md §4).

    ``source=prose`` is the offline corpus (:mod:`kv_latent.data.corpus`). ``source=hf`` reads
    ``datasets.load_dataset(hf_path, hf_name, split=hf_split, streaming=streaming)`` (needs hub
    access) and assigns rows to train/val/test by a hash of ``row[id_field]``, as for the prose
    corpus. ``max_blocks`` caps the train blocks and ``eval_max_blocks`` those of val and test
    (both required for a streaming source; for the prose corpus they keep the first blocks,
    documents being stored in hash order).
    """

    name: str = "prose"
    source: DataSource = DataSource.prose
    cache_dir: Optional[str] = None  # None: $KV_LATENT_CACHE or ~/.cache/kv_latent
    seq_len: int = 1024  # block length; the config groups tie it to train.seq_len
    max_blocks: Optional[int] = None
    eval_max_blocks: Optional[int] = None
    hf_path: Optional[str] = None
    hf_name: Optional[str] = None
    hf_split: str = "train"
    text_field: str = "text"
    id_field: str = "id"
    streaming: bool = True
    # Share of train blocks that are synthetic recall documents (kv_latent.data.recall): they
    # teach base models to copy from their context, and in retraining keep that skill (README,
    # "What retraining does to their retrieval"). 0: prose only, the paper's recipe.
    recall_fraction: float = 0.0
    recall_fact_share: float = 0.5  # share of the recall blocks that are fact documents
    # Shortest fact document: they end at a random length from here to seq_len, the rest of the
    # block being prose; null: every fact document fills its block.
    recall_fact_min_len: Optional[int] = None

    def __post_init__(self) -> None:
        _positive("data", self, "seq_len", "max_blocks", "eval_max_blocks")
        if not 0 <= self.recall_fraction < 1:
            raise ConfigError(f"data.recall_fraction={self.recall_fraction} must be in [0, 1)")
        if not 0 <= self.recall_fact_share <= 1:
            raise ConfigError(f"data.recall_fact_share={self.recall_fact_share} must be in [0, 1]")
        low = self.recall_fact_min_len
        if low is not None and not RECALL_FACT_MIN_SEQ_LEN <= low <= self.seq_len:
            raise ConfigError(
                f"data.recall_fact_min_len={low} must be null or in [{RECALL_FACT_MIN_SEQ_LEN}, "
                f"data.seq_len={self.seq_len}]"
            )
        if self.recall_fraction > 0 and self.seq_len < RECALL_MIN_SEQ_LEN:
            raise ConfigError(
                f"data.recall_fraction={self.recall_fraction} needs data.seq_len >= {RECALL_MIN_SEQ_LEN} "
                f"(got {self.seq_len}): a repeat document needs room for several periods of its sequence"
            )
        if self.source == DataSource.hf:
            if not self.hf_path:
                raise ConfigError("data.hf_path must be set when data.source=hf")
            for key in ("max_blocks", "eval_max_blocks"):
                if self.streaming and getattr(self, key) is None:
                    raise ConfigError(
                        f"data.{key} must be set for a streaming source (data.streaming=true): "
                        "a streamed dataset is too large to tokenize whole"
                    )

    def blocks_cap(self, split: str) -> int | None:
        """The block cap of ``split``: ``max_blocks`` for train, ``eval_max_blocks`` otherwise."""
        return self.max_blocks if split == "train" else self.eval_max_blocks


# ----------------------------------------------------------------------------------------------
# eval


@dataclass
class NeedleConfig:
    """``eval.needle``: the grid (context lengths in tokens, including the ``new_tokens`` the
    model decodes; insertion depths as fractions of the haystack) and trials per cell."""

    enabled: bool = True
    context_lengths: list[int] = field(default_factory=lambda: [512])
    depths: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0])
    trials: int = 4
    new_tokens: int = 8  # greedy tokens after the query (paper: 32; a 5-digit code needs ~5)

    def __post_init__(self) -> None:
        if not self.enabled:
            return
        _positive("eval.needle", self, "trials", "new_tokens")
        if not self.context_lengths or min(self.context_lengths) <= self.new_tokens:
            raise ConfigError(
                f"eval.needle.context_lengths={list(self.context_lengths)} must be non-empty and each longer "
                f"than eval.needle.new_tokens={self.new_tokens}"
            )
        if not self.depths or not all(0.0 <= d <= 1.0 for d in self.depths):
            raise ConfigError(f"eval.needle.depths={list(self.depths)} must be non-empty fractions in [0, 1]")


@dataclass
class EfficiencyConfig:
    """``eval.efficiency``: batch 1, a ``prompt_len``-token prompt of held-out text, ``new_tokens``
    greedy tokens; the student and its original alternate over ``repeats`` rounds after ``warmup``
    runs each, and a latency ratio is the median of the rounds' ratios
    (:func:`kv_latent.evaluation.efficiency.compare_efficiency`). ``clock``: ``wall`` time, or the
    ``cpu`` time of the measuring thread (stable on a shared machine); ``auto`` takes wall time on
    CUDA and CPU time on a CPU."""

    enabled: bool = True
    prompt_len: int = 896  # ~90 % of a 1024-token context
    new_tokens: int = 16
    repeats: int = 5
    warmup: int = 1
    clock: Clock = Clock.auto

    def __post_init__(self) -> None:
        if not self.enabled:
            return
        _positive("eval.efficiency", self, "prompt_len", "new_tokens", "repeats")
        if self.warmup < 0:
            raise ConfigError(f"eval.efficiency.warmup={self.warmup} must be >= 0")


@dataclass
class EvalConfig:
    """lm-eval ``tasks`` (zero-shot; ``limit`` caps the samples per task, null for all), the needle
    grid, the efficiency protocol and the seed of everything random (DESIGN.md §2.4)."""

    name: str = "quick"
    tasks: list[str] = field(default_factory=lambda: ["kvl_ppl", "kvl_cloze", "kvl_continuation", "kvl_mmlu"])
    limit: Optional[int] = 32
    batch_size: int = 8
    seed: int = 1234
    needle: NeedleConfig = field(default_factory=NeedleConfig)
    efficiency: EfficiencyConfig = field(default_factory=EfficiencyConfig)

    def __post_init__(self) -> None:
        _positive("eval", self, "limit", "batch_size")
        if len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"eval.tasks={list(self.tasks)} lists a task twice")

    def check_context(self, max_length: int) -> None:
        """Raise :class:`ConfigError` if the needle or efficiency windows exceed a model context
        of ``max_length`` tokens."""
        if self.needle.enabled and max(self.needle.context_lengths) > max_length:
            raise ConfigError(
                f"eval.needle.context_lengths={list(self.needle.context_lengths)} exceed the model's context "
                f"(model.max_position_embeddings={max_length} tokens)"
            )
        e = self.efficiency
        if e.enabled and e.prompt_len + e.new_tokens > max_length:
            raise ConfigError(
                f"eval.efficiency.prompt_len={e.prompt_len} + eval.efficiency.new_tokens={e.new_tokens} "
                f"exceed the model's context (model.max_position_embeddings={max_length} tokens)"
            )


# ----------------------------------------------------------------------------------------------
# logger


@dataclass
class LoggerConfig:
    """W&B (offline unless ``mode=online``) or none; a ``metrics.csv`` is always kept. Online
    without a network gives up after ``init_timeout`` seconds and logs offline instead."""

    name: LoggerName = LoggerName.wandb
    mode: WandbMode = WandbMode.offline
    project: str = "kv-latent"
    entity: Optional[str] = None
    init_timeout: float = 30.0

    def __post_init__(self) -> None:
        _positive("logger", self, "init_timeout")


# ----------------------------------------------------------------------------------------------
# The two workflows


@dataclass
class AblationConfig:
    """One ablation job (``src/run.py``): original -> surgery -> retrain -> evaluate -> record."""

    model: ModelConfig = MISSING
    kv: KVConfig = field(default_factory=KVConfig)
    rope: RopeConfig = field(default_factory=RopeConfig)
    gqa: GQAConfig = field(default_factory=GQAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    output_root: str = "outputs"  # runs/, baselines/ and Hydra logs go here
    cache_dir: str = "~/.cache/kv_latent"  # corpus, tokenized blocks, imported models, task data


@dataclass
class PretrainStep:
    """One step of a base-model recipe: a training run whose data mixes in recall documents."""

    name: str = "scratch"
    train: TrainConfig = field(default_factory=lambda: TrainConfig(stages=[Stage.pretrain]))
    data: DataConfig = field(default_factory=DataConfig)


@dataclass
class PretrainConfig:
    """Building an embedded base model (``src/pretrain.py``): its steps run in order, the first
    from ``init`` (``scratch``: random weights from ``model.arch``; ``original``: the model's
    current weights), each later one from the previous step's model. With ``export`` the last
    model ships as the embedded ``model.name``, its provenance nesting every step."""

    name: str = "scratch"
    init: PretrainInit = PretrainInit.scratch
    steps: list[PretrainStep] = field(default_factory=lambda: [PretrainStep()])
    export: bool = False
    model: ModelConfig = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=lambda: LoggerConfig(name=LoggerName.none))
    output_root: str = "outputs"
    cache_dir: str = "~/.cache/kv_latent"
