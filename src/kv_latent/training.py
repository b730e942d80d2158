"""Retraining a reduced student (DESIGN.md §2.3): the Lightning module, its configs, and ``fit``.

Stages, run in the order of ``train.stages`` inside one fit:

- ``intra``: Stage I, intra-layer distillation. Every student layer gets the frozen teacher's input
  hidden state of that layer and learns to reproduce the teacher's output of that layer (MSE).
- ``ntp``: next-token prediction (cross-entropy).
- ``kd``: logit distillation, KL(teacher_T || student_T) · T².
- ``pretrain``: plain next-token prediction with every weight trainable and no teacher.

The stage of global step ``s`` is a pure function of ``s``, and the batch of step ``s`` a pure
function of ``(seed, s)`` (:class:`kv_latent.data.StepBatches`), so a run killed and resumed from
``last.ckpt`` ends with exactly the weights of an uninterrupted run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from peft import LoraConfig, PeftModel, get_peft_model
from torch.utils.data import DataLoader, Dataset

from kv_latent.config import ConfigError
from kv_latent.data import StepBatches
from kv_latent.evaluation import token_nll

STAGES = ("pretrain", "intra", "ntp", "kd")
TEACHER_STAGES = frozenset({"intra", "kd"})
INITS = ("original", "scratch")
RECIPES = [["pretrain"], ["intra"], ["ntp"], ["kd"], ["intra", "ntp"], ["intra", "kd"]]
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
NORMS = ("input_layernorm", "post_attention_layernorm", "norm")
PRECISIONS = ("auto", "32-true", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64-true")
# Settings that may change between a checkpoint and its resumption without changing the result.
RESUMABLE_CHANGES = ("checkpoint_every", "log_every")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message names the file and what to do."""


@dataclass
class TrainConfig:
    """The ``train=`` config group: what is trained, on how many tokens, with which optimiser.

    Exactly one of ``tokens`` (a token budget) and ``pretrain_fraction`` (a fraction of the base
    model's pre-training tokens) is set. ``batch_size`` is the global batch in sequences per
    optimiser step, whatever the number of devices, so the data order does not depend on them.
    """

    # Defaults are conf/train/default.yaml (a test keeps the two equal).
    stages: list[str] = field(default_factory=lambda: ["intra", "ntp"])
    # Where the trained weights start: "original" (the loaded base model; for retraining, through
    # surgery) or "scratch" (random init from model.arch; pre-training only).
    init: str = "original"
    intra_share: float = 0.25  # share of the steps given to Stage I when it precedes another stage
    tokens: int | None = 393_216
    pretrain_fraction: float | None = None
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 1e-3
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # max global grad norm; 0 turns clipping off
    kd_temperature: float = 2.0
    lora_rank: int = 16  # 0: no LoRA, the MLP stays frozen
    lora_alpha: float = 32.0
    train_norms: bool = False
    seed: int = 0
    checkpoint_every: int = 64  # optimiser steps between writes of last.ckpt
    log_every: int = 8

    def __post_init__(self) -> None:
        self.stages = list(self.stages)
        self.betas = tuple(self.betas)
        self.validate()

    def validate(self) -> None:
        """Raise :class:`~kv_latent.config.ConfigError` (a ``ValueError``) naming the key at fault."""
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ConfigError(f"train.stages contains unknown stage(s) {unknown}; choose from {list(STAGES)}")
        if self.stages not in RECIPES:
            raise ConfigError(
                f"train.stages={self.stages} is not a supported recipe; use one of {RECIPES} "
                "(pretrain runs alone; Stage I 'intra' may only precede 'ntp' or 'kd')"
            )
        if self.init not in INITS:
            raise ConfigError(f"train.init={self.init!r} is unknown; choose one of {list(INITS)}")
        if self.init == "scratch" and self.stages != ["pretrain"]:
            raise ConfigError(
                f"train.init=scratch only applies to train.stages=[pretrain] (got {self.stages}); "
                "retraining starts from the original model: use train.init=original"
            )
        if len(self.stages) > 1 and not 0 < self.intra_share < 1:
            raise ConfigError(f"train.intra_share={self.intra_share} must be in (0, 1) for stages {self.stages}")
        if (self.tokens is None) == (self.pretrain_fraction is None):
            raise ConfigError(
                "set exactly one of train.tokens and train.pretrain_fraction "
                f"(got tokens={self.tokens}, pretrain_fraction={self.pretrain_fraction}); "
                "the other must be null"
            )
        if self.tokens is not None and not self.tokens > 0:
            raise ConfigError(f"train.tokens={self.tokens} must be > 0")
        if self.pretrain_fraction is not None and not self.pretrain_fraction > 0:
            raise ConfigError(f"train.pretrain_fraction={self.pretrain_fraction} must be > 0")
        positive_ints = ("batch_size", "checkpoint_every", "log_every")
        for key in positive_ints:
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key}={getattr(self, key)} must be >= 1")
        if self.seq_len < 2:
            raise ConfigError(f"train.seq_len={self.seq_len} must be >= 2 (next-token prediction needs a target)")
        if not self.lr > 0:
            raise ConfigError(f"train.lr={self.lr} must be > 0")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"train.warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"train.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError(
                f"train.weight_decay={self.weight_decay} and train.grad_clip={self.grad_clip} must be >= 0"
            )
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"train.betas={list(self.betas)} must be two numbers in [0, 1)")
        if not self.kd_temperature > 0:
            raise ConfigError(f"train.kd_temperature={self.kd_temperature} must be > 0")
        if self.lora_rank < 0:
            raise ConfigError(f"train.lora_rank={self.lora_rank} must be >= 0 (0 = no LoRA, MLP frozen)")
        if self.lora_rank > 0 and not self.lora_alpha > 0:
            raise ConfigError(f"train.lora_alpha={self.lora_alpha} must be > 0 when train.lora_rank > 0")

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
    """The ``trainer=`` config group: where and how Lightning runs (see ``conf/trainer``)."""

    accelerator: str = "cpu"
    devices: int | str = 1
    strategy: str = "auto"
    precision: str = "auto"  # auto: bf16-mixed where the hardware has bf16, else 32-true
    num_nodes: int = 1
    enable_progress_bar: bool = True

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"trainer.precision={self.precision!r} is unknown; choose one of {list(PRECISIONS)}")
        if self.num_nodes < 1:
            raise ConfigError(f"trainer.num_nodes={self.num_nodes} must be >= 1")


@lru_cache(maxsize=1)
def _cpu_has_bf16() -> bool:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set(cpuinfo.split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_precision(precision: str, accelerator: str) -> str:
    """Resolve ``precision="auto"``: bf16-mixed on CUDA with bf16 or a CPU with avx512_bf16/AMX."""
    if precision != "auto":
        return precision
    on_cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if on_cuda:
        return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"
    return "bf16-mixed" if _cpu_has_bf16() else "32-true"


# ---------------------------------------------------------------------------------------------
# Losses


def ntp_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Next-token cross-entropy averaged over the real (unpadded) predicted tokens."""
    nll_sum, n = token_nll(logits, input_ids, attention_mask)
    return nll_sum / n.clamp(min=1)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    temperature: float,
) -> torch.Tensor:
    """KL(teacher_T || student_T) per token, averaged over unpadded tokens, scaled by T².

    The T² keeps gradient magnitudes comparable across temperatures (Hinton et al.). Padded
    positions are dropped before the softmax, so their logits cannot leak in (not even as NaN).
    """
    if attention_mask is not None:
        keep = attention_mask.bool()
        student_logits, teacher_logits = student_logits[keep], teacher_logits[keep]  # (N, V)
    s_logp = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t_logp = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(s_logp, t_logp, log_target=True, reduction="none").sum(-1)  # (N,) or (B, T)
    return kl.sum() / max(kl.numel(), 1) * temperature**2


def masked_mse(student: torch.Tensor, teacher: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """MSE between hidden states ``(B, T, H)``, averaged over hidden size and unpadded tokens."""
    err = (student.float() - teacher.float()).pow(2).mean(-1)  # (B, T)
    if attention_mask is None:
        return err.mean()
    keep = attention_mask.bool()
    return torch.where(keep, err, torch.zeros_like(err)).sum() / keep.sum().clamp(min=1)


@contextmanager
def tap_layers(layers: Sequence[torch.nn.Module], feed: Sequence[torch.Tensor] | None = None):
    """Record each layer's input and output hidden states during the forward passes in the block.

    With ``feed``, layer ``i`` receives ``feed[i]`` as its input hidden state instead of the
    previous layer's output: this is how Stage I feeds the teacher's layer inputs to the student
    inside the student's own forward, which builds masks and RoPE exactly as in normal use.
    Yields ``(inputs, outputs)``, two lists filled by the forward pass.
    """
    inputs: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []

    def before(i, module, args, kwargs):
        if feed is not None:
            if args:
                args = (feed[i], *args[1:])
            else:
                kwargs = {**kwargs, "hidden_states": feed[i]}
        inputs.append(args[0] if args else kwargs["hidden_states"])
        return args, kwargs

    def after(module, args, output):
        outputs.append(output[0] if isinstance(output, tuple) else output)

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(partial(before, i), with_kwargs=True))
        handles.append(layer.register_forward_hook(after))
    try:
        yield inputs, outputs
    finally:
        for handle in handles:
            handle.remove()


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to ``min_lr_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------
# The module


def prepare_student(student: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
    """Set the paper's trainable set on ``student`` (modified in place) and return the model to train.

    ``pretrain``: every weight. Otherwise: Q/K/V/O projections in full; LoRA adapters on the MLP
    when ``lora_rank > 0`` (the return value is then a ``peft`` wrapper); norms only with
    ``train_norms``; embeddings and lm_head frozen.
    """
    student.train()
    if cfg.stages == ["pretrain"]:
        return student.requires_grad_(True)
    student.requires_grad_(False)
    if cfg.lora_rank > 0:
        lora = LoraConfig(
            r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=list(MLP_PROJECTIONS), lora_dropout=0.0
        )
        student = get_peft_model(student, lora)  # only the adapters are trainable after this
    for name, module in student.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ATTENTION_PROJECTIONS or (cfg.train_norms and leaf in NORMS):
            module.requires_grad_(True)
    return student


class RetrainModule(L.LightningModule):
    """Retrains ``student`` against a frozen ``teacher`` with the stages of ``cfg``.

    The teacher is deliberately not a submodule: it never enters ``state_dict()``, checkpoints or
    the optimiser, and Lightning does not move it, so :meth:`on_fit_start` does. ``teacher`` may be
    ``None`` when no stage needs it (``ntp``, ``pretrain``).
    """

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module | None, cfg: TrainConfig, *, total_steps: int):
        super().__init__()
        if cfg.needs_teacher and teacher is None:
            raise ValueError(f"train.stages={cfg.stages} needs a teacher model; got teacher=None")
        self.cfg = cfg
        self.total_steps = total_steps
        self.student = prepare_student(student, cfg)
        self._frozen = [teacher.requires_grad_(False).eval()] if teacher is not None else []
        self._val_nll = self._val_tokens = None

    @property
    def teacher(self) -> torch.nn.Module | None:
        return self._frozen[0] if self._frozen else None

    def plain_student(self) -> torch.nn.Module:
        """The underlying HF model (with LoRA layers still injected, if any)."""
        return self.student.get_base_model() if isinstance(self.student, PeftModel) else self.student

    def merged_student(self) -> torch.nn.Module:
        """The trained student as a plain HF model: LoRA merged into the MLP weights and removed."""
        if not isinstance(self.student, PeftModel):
            return self.student.requires_grad_(False).eval()
        tied = self.student.get_base_model().config.tie_word_embeddings
        student = self.student.merge_and_unload()
        if tied:
            # peft unties embeddings when merging, although LoRA never touches them (both stay
            # frozen and equal); re-tie so the saved student is as small as the original.
            student.config.tie_word_embeddings = True
            student.tie_weights()
        return student.requires_grad_(False).eval()

    def on_fit_start(self) -> None:
        if self.teacher is not None:
            self._teacher_device = next(self.teacher.parameters()).device
            self.teacher.to(self.device).eval()

    def on_fit_end(self) -> None:
        # Lightning moves the student back to the CPU after fit; the teacher goes back where it was.
        if self.teacher is not None:
            self.teacher.to(self._teacher_device)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lets a resume refuse a checkpoint written under a different recipe or budget.
        checkpoint["train_config"] = asdict(self.cfg)
        checkpoint["total_steps"] = self.total_steps

    # -- losses of one batch

    def intra_loss(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Stage I: every student layer, fed the teacher's layer input, matches the teacher's layer output."""
        # The decoder stacks (``.model``) skip lm_head, which Stage I never needs.
        with torch.no_grad(), tap_layers(self.teacher.model.layers) as (t_in, t_out):
            self.teacher.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        student = self.plain_student().model
        with tap_layers(student.layers, feed=t_in) as (_, s_out):
            student(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        losses = [masked_mse(s, t, attention_mask) for s, t in zip(s_out, t_out, strict=True)]
        return torch.stack(losses).mean()

    def stage_loss(self, stage: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The loss of ``stage`` on ``batch`` (``input_ids`` and optional ``attention_mask``)."""
        input_ids, attention_mask = batch["input_ids"], batch.get("attention_mask")
        if stage == "intra":
            return self.intra_loss(input_ids, attention_mask)
        logits = self.student(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        if stage in ("ntp", "pretrain"):
            return ntp_loss(logits, input_ids, attention_mask)
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return kd_loss(logits, teacher_logits, attention_mask, temperature=self.cfg.kd_temperature)

    # -- Lightning hooks

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        step = self.global_step
        stage = self.cfg.stage_at(step, self.total_steps)
        loss = self.stage_loss(stage, batch)
        batch_size = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        # Every stage's key at every step, NaN while another stage runs: Lightning would otherwise
        # keep re-logging a finished stage's last value, drawing a flat line in the curves.
        for name in self.cfg.stages:
            self.log(f"train/{name}_loss", loss if name == stage else torch.nan, batch_size=batch_size)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=batch_size)
        self.log("train/tokens", float((step + 1) * self.cfg.tokens_per_step), batch_size=batch_size)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_nll = torch.zeros((), dtype=torch.float64, device=self.device)
        self._val_tokens = torch.zeros((), dtype=torch.float64, device=self.device)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        input_ids, attention_mask = batch["input_ids"], batch.get("attention_mask")
        logits = self.student(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        nll_sum, n = token_nll(logits, input_ids, attention_mask)
        self._val_nll += nll_sum.double()
        self._val_tokens += n.double()

    def on_validation_epoch_end(self) -> None:
        # A token-weighted mean over all devices, not a mean of per-batch means.
        totals = self.trainer.strategy.reduce(torch.stack([self._val_nll, self._val_tokens]), reduce_op="sum")
        loss = totals[0] / totals[1].clamp(min=1)
        self.log("val/loss", loss.float())
        self.log("val/ppl", loss.exp().float())

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        if not gradient_clip_val:
            return
        model = self.trainer.model
        if hasattr(model, "clip_grad_norm_"):
            # FSDP shards the gradients: only its wrapper can compute the global norm (Lightning's
            # own norm clipping refuses FSDP).
            model.clip_grad_norm_(gradient_clip_val)
        else:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        trainable = [p for p in self.student.parameters() if p.requires_grad]
        # No weight decay on gains (norms) and biases, as usual for AdamW.
        groups = [
            {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": self.cfg.weight_decay},
            {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=self.cfg.lr, betas=self.cfg.betas)
        schedule = partial(
            lr_factor,
            warmup_steps=round(self.cfg.warmup_ratio * self.total_steps),
            total_steps=self.total_steps,
            min_lr_ratio=self.cfg.min_lr_ratio,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


# ---------------------------------------------------------------------------------------------
# Data and fit


class _Blocks(Dataset):
    """Unpadded token blocks ``[N, T]`` as validation samples."""

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        block = self.blocks[i]
        return {"input_ids": block, "attention_mask": torch.ones_like(block)}


class RetrainData(L.LightningDataModule):
    """Training batches of steps ``[resumed step, total_steps)`` from :class:`StepBatches`.

    The loader is built once Lightning has restored the global step and knows this process's rank,
    so every rank reads its share of exactly the batches an uninterrupted run would read.
    """

    def __init__(self, train_blocks: torch.Tensor, cfg: TrainConfig, *, total_steps: int):
        super().__init__()
        self.train_blocks = train_blocks
        self.cfg = cfg
        self.total_steps = total_steps

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        if self.cfg.batch_size % trainer.world_size:
            raise ConfigError(
                f"train.batch_size={self.cfg.batch_size} must be divisible by the number of devices "
                f"({trainer.world_size})"
            )
        # StepBatches' batch_size is per rank; ranks together read the global batch of each step.
        batches = StepBatches(
            self.train_blocks,
            batch_size=self.cfg.batch_size // trainer.world_size,
            seed=self.cfg.seed,
            start_step=trainer.global_step,
            num_steps=self.total_steps,
            rank=trainer.global_rank,
            world_size=trainer.world_size,
        )
        return _StepLoader(batches, total_steps=self.total_steps)


class _StepLoader(DataLoader):
    """A loader of :class:`StepBatches` the way Lightning counts it: one epoch of ``total_steps``.

    A resumed run yields only the steps from the restored global step on, and Lightning counts the
    restored steps as already done in the epoch, so the epoch ends exactly at ``total_steps``. The
    position lives in the global step, which Lightning restores; the loader's own state is empty,
    and being stateful tells Lightning that resuming mid-epoch is exact.
    """

    def __init__(self, batches: StepBatches, *, total_steps: int):
        super().__init__(batches, batch_size=None)
        self.total_steps = total_steps

    def __len__(self) -> int:
        return self.total_steps

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def check_checkpoint(path: Path, cfg: TrainConfig, *, total_steps: int) -> int:
    """Check that ``path`` is a readable checkpoint of this very recipe; return its global step.

    Raises :class:`CheckpointError` naming the file and the fix before any training starts.
    """
    try:
        # mmap: reading the header costs no copy of the weights, even for a 7B student.
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        step = int(checkpoint["global_step"])
        saved_cfg, saved_steps = checkpoint["train_config"], checkpoint["total_steps"]
    except Exception as err:  # any failure here means the same thing to the user
        raise CheckpointError(
            f"cannot resume from {path}: the file is corrupt or not a kv-latent checkpoint "
            f"({type(err).__name__}: {err}). Delete it to restart this run from step 0."
        ) from err
    current = asdict(cfg)
    changed = sorted(
        k for k in current if k not in RESUMABLE_CHANGES and _as_plain(saved_cfg.get(k)) != _as_plain(current[k])
    )
    if changed or saved_steps != total_steps:
        raise CheckpointError(
            f"cannot resume from {path}: it was written with different train settings {changed or ['total_steps']}. "
            "Delete it (or use another run directory) to train with the new settings."
        )
    return step


def _as_plain(value: Any) -> Any:
    return list(value) if isinstance(value, (tuple, list)) else value


def fit(
    student: torch.nn.Module,
    *,
    teacher: torch.nn.Module | None,
    train_blocks: torch.Tensor,
    cfg: TrainConfig,
    trainer_cfg: TrainerConfig,
    run_dir: str | Path,
    val_blocks: torch.Tensor | None = None,
    loggers: Sequence[Any] = (),
    pretrain_tokens: int | None = None,
) -> tuple[torch.nn.Module, dict[str, float]]:
    """Retrain ``student`` for the budget of ``cfg``, resuming from ``<run_dir>/checkpoints/last.ckpt``.

    ``train_blocks`` and ``val_blocks`` are unpadded token blocks ``[N, seq_len]``. ``last.ckpt`` is
    written every ``cfg.checkpoint_every`` steps and at the end; if it exists when ``fit`` starts,
    training resumes from it and ends with the weights of an uninterrupted run. ``student`` is
    modified in place (LoRA is injected, trained, then merged).

    Returns the trained student as a plain HF model (LoRA merged) and the final metrics:
    ``train/tokens``, ``train/steps``, ``train/wall_time_s``, ``train/tokens_per_s`` (of this call),
    ``train/resumed_from_step``, the last logged ``train/*`` values and, with ``val_blocks``,
    ``val/loss`` and ``val/ppl`` of the trained student.
    """
    cfg.validate()
    total_steps = cfg.total_steps(pretrain_tokens)
    if train_blocks.ndim != 2 or train_blocks.shape[1] != cfg.seq_len:
        raise ValueError(f"train_blocks must have shape [N, train.seq_len={cfg.seq_len}]; got {list(train_blocks.shape)}")
    checkpoint_dir = Path(run_dir) / "checkpoints"
    last = checkpoint_dir / "last.ckpt"
    start_step = check_checkpoint(last, cfg, total_steps=total_steps) if last.exists() else 0

    # The LoRA initialisation draws random numbers: seed first so fresh runs are reproducible.
    L.seed_everything(cfg.seed, verbose=False)
    module = RetrainModule(student, teacher, cfg, total_steps=total_steps)
    data = RetrainData(train_blocks, cfg, total_steps=total_steps)
    checkpointing = ModelCheckpoint(
        dirpath=checkpoint_dir,
        every_n_train_steps=cfg.checkpoint_every,
        save_top_k=0,
        save_last=True,
        enable_version_counter=False,  # always overwrite last.ckpt, never write last-v1.ckpt
    )
    trainer = L.Trainer(
        accelerator=trainer_cfg.accelerator,
        devices=trainer_cfg.devices,
        strategy=trainer_cfg.strategy,
        num_nodes=trainer_cfg.num_nodes,
        precision=resolve_precision(trainer_cfg.precision, trainer_cfg.accelerator),
        max_steps=total_steps,
        max_epochs=1,  # StepBatches yields exactly the remaining steps; never start over
        gradient_clip_val=cfg.grad_clip or None,
        log_every_n_steps=cfg.log_every,
        logger=list(loggers) or False,
        callbacks=[checkpointing],
        enable_progress_bar=trainer_cfg.enable_progress_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=run_dir,
    )
    started = time.perf_counter()
    trainer.fit(module, datamodule=data, ckpt_path=last if last.exists() else None)
    wall = time.perf_counter() - started
    # Lightning returns normally on Ctrl-C; a half-trained student must not pass for a finished one.
    # (``train/tokens`` rather than ``trainer.global_step``: only metrics come back from spawned ranks.)
    tokens_done = trainer.callback_metrics.get("train/tokens")
    if trainer.interrupted or (tokens_done is not None and tokens_done != total_steps * cfg.tokens_per_step):
        raise RuntimeError(
            f"training stopped before step {total_steps} (interrupted); rerun to resume from {last}"
        )

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/") and v.isfinite()}
    if val_blocks is not None:
        val_loader = DataLoader(_Blocks(val_blocks), batch_size=cfg.batch_size)
        (val_metrics,) = trainer.validate(module, dataloaders=val_loader, verbose=False)
        metrics.update({k: float(v) for k, v in val_metrics.items()})
    trained = (total_steps - start_step) * cfg.tokens_per_step
    metrics.update(
        {
            "train/tokens": float(total_steps * cfg.tokens_per_step),
            "train/steps": float(total_steps),
            "train/resumed_from_step": float(start_step),
            "train/wall_time_s": wall,
            "train/tokens_per_s": trained / wall,
        }
    )
    return module.merged_student(), metrics
