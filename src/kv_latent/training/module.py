"""The LightningModule of retraining (DESIGN.md §2.3): trainable set, stage losses, optimiser.

:func:`prepare_student` sets the paper's trainable set, :func:`lr_factor` is the LR schedule and
:class:`RetrainModule` trains the student against the frozen teacher, the stage of each step
given by :meth:`kv_latent.config.TrainConfig.stage_at`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict
from functools import partial
from typing import Any

import lightning as L
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from kv_latent.config import TrainConfig
from kv_latent.training.losses import kd_loss, masked_mse, ntp_loss, tap_layers

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "post_rope_proj")  # + svd_a key projection
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
NORMS = ("input_layernorm", "post_attention_layernorm", "norm")


def as_plain(value: Any) -> Any:
    """``value`` with enums as plain strings and tuples as lists: how a checkpoint stores a config."""
    if isinstance(value, (list, tuple)):
        return [as_plain(v) for v in value]
    return str(value) if isinstance(value, str) else value


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to ``min_lr_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def prepare_student(student: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
    """Set the paper's trainable set on ``student`` (modified in place) and return the model to train.

    ``pretrain``: every weight. Otherwise: Q/K/V/O projections in full; LoRA adapters on the MLP
    when ``lora_rank > 0`` (the return value is then a ``peft`` wrapper); norms only with
    ``train_norms``; embeddings and lm_head frozen.
    """
    student.train()
    if cfg.pretraining:
        return student.requires_grad_(True)
    student.requires_grad_(False)
    if cfg.lora_rank > 0:
        lora = LoraConfig(
            r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=list(MLP_PROJECTIONS), lora_dropout=0.0
        )
        with warnings.catch_warnings():
            # peft reads transformers' deprecated alias of is_activation_checkpointing.
            warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
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
            raise ValueError(f"train.stages={[str(s) for s in cfg.stages]} needs a teacher model; got teacher=None")
        self.cfg = cfg
        self.total_steps = total_steps
        self.student = prepare_student(student, cfg)
        self._frozen = [teacher.requires_grad_(False).eval()] if teacher is not None else []

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
        # peft unties embeddings when merging (and warns that it did), although LoRA never touches
        # them (both stay frozen and equal); they are re-tied here, so the saved student is as
        # small as the original.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Input and output embeddings are no longer tied after merging",
                                    category=UserWarning)
            student = self.student.merge_and_unload()
        if tied:
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
        checkpoint["train_config"] = {k: as_plain(v) for k, v in asdict(self.cfg).items()}
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
