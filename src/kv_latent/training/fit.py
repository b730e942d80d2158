"""``fit``: retrain a student for its budget under Lightning, resumable at any step (DESIGN.md §2.3).

The batch of global step ``s`` is a pure function of ``(seed, s)``
(:class:`kv_latent.data.batches.StepBatches`) and the stage of ``s`` a pure function of ``s``, so
a run stopped and resumed from ``last.ckpt`` (written every ``train.checkpoint_every`` steps, at
the end, and at the step boundary where SIGTERM or Ctrl-C stopped it) ends with exactly the
weights of an uninterrupted run.
"""

from __future__ import annotations

import logging
import signal
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader

from kv_latent.config import ConfigError, TrainConfig, TrainerConfig
from kv_latent.data.batches import StepBatches
from kv_latent.training.module import RetrainModule, as_plain
from kv_latent.training.preemption import CheckpointOnSignal, TrainingInterrupted

log = logging.getLogger(__name__)

# Settings that may change between a checkpoint and its resumption without changing the result.
RESUMABLE_CHANGES = ("checkpoint_every", "log_every")
# Where Lightning's rank-zero notes go (``rank_zero_info``): while :func:`fit` runs, only its warnings.
LIGHTNING_NOTES = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message names the file and what to do."""


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
        return str(precision)
    on_cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if on_cuda:
        return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"
    return "bf16-mixed" if _cpu_has_bf16() else "32-true"


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


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Lightning's console while :func:`fit` builds its Trainer and trains, without what means
    nothing to the user.

    Hidden: Lightning's rank-zero INFO notes (the precision and devices it uses and that it
    resumes from ``last.ckpt``, which :func:`fit` says in one line of its own; a tip about
    Lightning's cloud logger; that fit stopped at ``max_steps``), its note that our
    IterableDataset has a length (:class:`StepBatches` ends exactly), and torch's deprecation of
    ``LeafSpec``, which Lightning's own pytree helper triggers. Lightning's warnings, its progress
    bar and its other messages stay.
    """
    loggers = [logging.getLogger(name) for name in LIGHTNING_NOTES]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*IterableDataset.*has `__len__` defined")
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                                category=FutureWarning)
        for logger in loggers:
            logger.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)


@rank_zero_only
def _log_start(trainer: L.Trainer, run_dir: Path, cfg: TrainConfig, *, total_steps: int, start_step: int) -> None:
    """One line for what Lightning would say in five: the run, its devices, precision and budget."""
    devices = trainer.num_devices * trainer.num_nodes
    kind = trainer.strategy.root_device.type
    strategy = type(trainer.strategy).__name__.removesuffix("Strategy")
    where = kind if devices == 1 else f"{devices} {kind} devices ({strategy})"
    resume = f", resuming at step {start_step} from {run_dir / 'checkpoints' / 'last.ckpt'}" if start_step else ""
    log.info("training %s/%s on %s, %s, %d steps of %dx%d tokens%s", run_dir.parent.name, run_dir.name, where,
             trainer.precision, total_steps, cfg.batch_size, cfg.seq_len, resume)


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
    current = {k: as_plain(v) for k, v in asdict(cfg).items()}
    changed = sorted(k for k in current if k not in RESUMABLE_CHANGES and as_plain(saved_cfg.get(k)) != current[k])
    if changed or saved_steps != total_steps:
        raise CheckpointError(
            f"cannot resume from {path}: it was written with different train settings {changed or ['total_steps']}. "
            "Delete it (or use another run directory) to train with the new settings."
        )
    return step


def fit(
    student: torch.nn.Module,
    *,
    teacher: torch.nn.Module | None,
    train_blocks: torch.Tensor,
    cfg: TrainConfig,
    trainer_cfg: TrainerConfig,
    run_dir: str | Path,
    loggers: Sequence[Any] = (),
    pretrain_tokens: int | None = None,
) -> tuple[torch.nn.Module, dict[str, float]]:
    """Retrain ``student`` for the budget of ``cfg``, resuming from ``<run_dir>/checkpoints/last.ckpt``.

    ``train_blocks`` are unpadded token blocks ``[N, seq_len]``. ``last.ckpt`` is written every
    ``cfg.checkpoint_every`` steps and at the end; if it exists when ``fit`` starts, training
    resumes from it and ends with the weights of an uninterrupted run. ``student`` is modified in
    place (LoRA is injected, trained, then merged).

    SIGTERM or SIGINT while ``fit`` runs stops training at the next step boundary, writes
    ``last.ckpt`` there and raises :class:`TrainingInterrupted`, as does any other stop before the
    last step; the previous signal handlers are back in place when ``fit`` returns or raises.

    Returns the trained student as a plain HF model (LoRA merged) and the final metrics:
    ``train/tokens``, ``train/steps``, ``train/wall_time_s``, ``train/tokens_per_s`` (of this call),
    ``train/resumed_from_step`` and the last logged ``train/*`` values. Validation is the
    caller's: :func:`kv_latent.evaluation.perplexity.perplexity` on the returned student.

    On the console: one line of this module's log (run, devices, precision, steps) and
    Lightning's progress bar; Lightning's own notes are held back by :func:`quiet_lightning`.
    """
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
    on_signal = CheckpointOnSignal(last)
    with quiet_lightning():
        trainer = L.Trainer(
            accelerator=str(trainer_cfg.accelerator),
            devices=trainer_cfg.devices,
            strategy=trainer_cfg.strategy,
            num_nodes=trainer_cfg.num_nodes,
            precision=resolve_precision(trainer_cfg.precision, trainer_cfg.accelerator),
            max_steps=total_steps,
            max_epochs=1,  # StepBatches yields exactly the remaining steps; never start over
            gradient_clip_val=cfg.grad_clip or None,
            log_every_n_steps=cfg.log_every,
            logger=list(loggers) or False,
            callbacks=[checkpointing, on_signal],
            enable_progress_bar=trainer_cfg.enable_progress_bar,
            enable_model_summary=False,
            default_root_dir=run_dir,
        )
        _log_start(trainer, Path(run_dir), cfg, total_steps=total_steps, start_step=start_step)
        started = time.perf_counter()
        with on_signal.holding_signals():
            try:
                trainer.fit(module, datamodule=data, ckpt_path=last if last.exists() else None)
            except SIGTERMException:
                pass  # Lightning stopped at a step boundary, and on_signal wrote last.ckpt there
        wall = time.perf_counter() - started
    # A half-trained student must not pass for a finished one. (``train/tokens`` rather than
    # ``trainer.global_step``: only metrics come back from spawned ranks.)
    tokens_done = trainer.callback_metrics.get("train/tokens")
    stopped_early = tokens_done is not None and tokens_done != total_steps * cfg.tokens_per_step
    if on_signal.signum is not None or trainer.interrupted or stopped_early:
        cause = f"by {signal.Signals(on_signal.signum).name} " if on_signal.signum is not None else ""
        raise TrainingInterrupted(
            f"training stopped {cause}at step {trainer.global_step} of {total_steps}; rerun to resume from {last}",
            checkpoint=last,
            signum=on_signal.signum,
        )

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/") and v.isfinite()}
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
