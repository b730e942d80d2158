"""One ablation job, end to end (DESIGN.md §3.2): validate -> load the original -> head compression
(``gqa``) -> surgery of the dims (``kv``) -> retrain -> evaluate -> record. Calibration runs where a
head compression or an init needs it.

:func:`make_job` checks everything that can be checked before a model loads (the config rules,
the model's source, a checkpoint to resume); :func:`run_job` then holds the run directory
(:func:`kv_latent.records.run_lock`) for as long as the job runs, skips a job whose complete
record exists, and writes the record last.
"""

from __future__ import annotations

import copy
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from kv_latent import base_models, records
from kv_latent.calibration import CalibrationStats, calibrate
from kv_latent.config import AblationConfig, recipe_name
from kv_latent.heads import compress_heads
from kv_latent.rope import rope_as_run
from kv_latent.rules import check_ablation, dims_kept
from kv_latent.data.blocks import load_blocks
from kv_latent.evaluation.baselines import cached_baseline
from kv_latent.evaluation.efficiency import kv_bytes_per_token
from kv_latent.evaluation.perplexity import perplexity
from kv_latent.evaluation.suite import evaluate_job
from kv_latent.tracking import job_loggers
from kv_latent.surgery import build_student
from kv_latent.training.fit import check_checkpoint, fit

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One validated ablation job: its typed config, the resolved config it records, where it writes."""

    cfg: AblationConfig
    config: dict[str, Any]  # the resolved config as recorded (plain, JSON-able)
    run_dir: Path
    output_root: Path
    cache_dir: Path

    @property
    def name(self) -> str:
        return records.run_name(self.config)


def make_job(cfg: AblationConfig, config: dict[str, Any]) -> Job:
    """Check ``cfg`` (typed) and build its :class:`Job`; raise :class:`~kv_latent.config.ConfigError`
    before any model loads. ``config`` is the same configuration as a resolved plain dict."""
    check_ablation(cfg)
    output_root = Path(cfg.output_root)
    cache_dir = Path(cfg.data.cache_dir or cfg.cache_dir)
    base_models.check_model_source(cfg.model, cache_dir=cache_dir)
    job = Job(cfg=cfg, config=config, run_dir=output_root / "runs" / records.run_name(config),
              output_root=output_root, cache_dir=cache_dir)
    last = job.run_dir / "checkpoints" / "last.ckpt"
    if last.exists():
        check_checkpoint(last, cfg.train, total_steps=cfg.train.total_steps(cfg.model.pretrain_tokens))
    return job


def _device(cfg: AblationConfig) -> torch.device:
    return torch.device("cuda" if cfg.trainer.wants_cuda else "cpu")


def original_perplexity(job: Job, original, val_blocks: torch.Tensor) -> dict[str, float]:
    """Val perplexity of the original model, computed once per (weights, val blocks) and reused by
    every job of a sweep."""
    return cached_baseline(
        job.output_root / "baselines",
        job.cfg.model.name,
        model=original,
        settings={"data": {"val_blocks": val_blocks}},
        compute=lambda: perplexity(original, val_blocks, batch_size=job.cfg.train.batch_size),
    )


def calibration_stats(job: Job, model, tokenizer, *, settings, name: str,
                      group_size: int | None = None) -> CalibrationStats | None:
    """``model``'s calibration statistics when ``settings`` (the job's ``kv`` or ``gqa`` group) needs
    them, else None; cached in ``<output_root>/calibration/`` and shared by every job of a sweep."""
    if not settings.needs_calibration:
        return None
    return calibrate(model, data=job.cfg.data, tokens=settings.calib_tokens, seq_len=settings.calib_seq_len,
                     cache_dir=job.output_root / "calibration", name=name, tokenizer=tokenizer,
                     batch_size=job.cfg.train.batch_size, group_size=group_size)


def make_student(job: Job, original, tokenizer):
    """Heads first, at full head dim (``gqa``), then the dims (``kv``; DESIGN.md §5); ``original`` is
    untouched. Where the dims stay (:func:`~kv_latent.rules.dims_kept`) the student is the
    head-compressed model, or a copy of the original: a stock Llama but for ``svd_a``."""
    cfg = job.cfg
    model, name = original, cfg.model.name
    if cfg.gqa.converts:
        stats = calibration_stats(job, original, tokenizer, settings=cfg.gqa, name=name,
                                  group_size=cfg.model.num_key_value_heads // cfg.gqa.kv_heads)
        model = compress_heads(original, mode=cfg.gqa.mode, kv_heads=cfg.gqa.kv_heads, stats=stats,
                               query_aware=cfg.gqa.query_aware)
        name = f"{name}-{records.gqa_name(job.config['gqa'])}"
    if dims_kept(cfg):
        return copy.deepcopy(original) if model is original else model
    return build_student(model, k_dim=cfg.kv.k_dim, v_dim=cfg.kv.v_dim, qk_init=cfg.kv.qk_init,
                         vo_init=cfg.kv.vo_init, rope=cfg.rope.schedule, rope_at_full_dim=cfg.rope.at_full_dim,
                         stats=calibration_stats(job, model, tokenizer, settings=cfg.kv, name=name))


def student_rope(student) -> str:
    """The RoPE the student's layers run (:func:`kv_latent.rope.rope_as_run`), read from its config;
    ``ValueError`` if its layers run different ones (surgery reduces every layer alike)."""
    config = student.config
    if not hasattr(config, "layer_rope_schedule"):  # a stock Llama
        return "standard"
    ran = {rope_as_run(config.rope_schedule, k_dim=config.k_dim[i], head_dim=config.head_dim,
                       at_full_dim=config.rope_at_full_dim, own_frequencies=config.layer_inv_freq(i) is not None)
           for i in range(config.num_hidden_layers)}
    if len(ran) != 1:
        raise ValueError(f"the student's layers run different RoPE: {sorted(ran)}")
    return ran.pop()


def check_rope_label(student, label: str) -> None:
    """Raise ``RuntimeError`` if the run name's RoPE (``label``) is not what the student runs."""
    ran = student_rope(student)
    if ran != label:
        raise RuntimeError(f"the run is labelled RoPE {label!r} but its student runs {ran!r}")


def run_job(
    cfg: AblationConfig, config: dict[str, Any], *, group: str | None = None, overrides: list[str] = ()
) -> dict[str, Any]:
    """Run one ablation job and return its record; a job whose complete record exists is skipped.

    ``config`` is ``cfg`` as a resolved plain dict (what the record stores and the hash covers);
    ``group`` names the sweep (W&B group); ``overrides`` are the command-line overrides, recorded
    so that every record says how to rerun it.
    """
    job = make_job(cfg, config)
    config_hash = records.config_hash(job.config)
    with records.run_lock(job.run_dir):
        done = records.complete_record(job.run_dir, config_hash)
        if done:
            log.info("skipping %s: complete record exists", job.run_dir)
            return done
        return _run(job, group=group, overrides=overrides)


def _run(job: Job, *, group: str | None, overrides: list[str]) -> dict[str, Any]:
    started, code = time.perf_counter(), records.git_commit()
    cfg = job.cfg
    original, tokenizer = base_models.load_base_model(cfg.model, cache_dir=job.cache_dir, device=_device(cfg))
    student = make_student(job, original, tokenizer)
    check_rope_label(student, records.rope_label(job.config))
    val_blocks = load_blocks(cfg.data, "val", tokenizer=tokenizer)

    base = original_perplexity(job, original, val_blocks)
    before = perplexity(student, val_blocks, batch_size=cfg.train.batch_size)
    metrics: dict[str, Any] = {
        "original/val/loss": base["loss"], "original/val/ppl": base["ppl"],
        "surgery/val/loss": before["loss"], "surgery/val/ppl": before["ppl"],
    }
    loggers = job_loggers(cfg.logger, job.run_dir, name=job.name, group=group, config=job.config,
                          tags=_tags(cfg))
    try:
        after = before  # surgery only: the student is evaluated as surgery left it
        if cfg.train.retrains:
            student, train_metrics = fit(
                student,
                teacher=original if cfg.train.needs_teacher else None,
                train_blocks=load_blocks(cfg.data, "train", tokenizer=tokenizer),
                cfg=cfg.train,
                trainer_cfg=cfg.trainer,
                run_dir=job.run_dir,
                loggers=loggers.lightning,
                pretrain_tokens=cfg.model.pretrain_tokens,
            )
            metrics.update(train_metrics)
            if rank_zero_only.rank != 0:  # under DDP every rank returns from fit; only one writes
                return {}
            student.to(_device(cfg))
            after = perplexity(student, val_blocks, batch_size=cfg.train.batch_size)
        metrics.update({"val/loss": after["loss"], "val/ppl": after["ppl"]})
        evaluated, items = evaluate_job(student, original, tokenizer, cfg.eval, cache_dir=job.cache_dir,
                                        baseline_cache_dir=job.output_root / "baselines")
        metrics.update(evaluated)
        record = _write_outputs(job, student, original, tokenizer, metrics, items, started=started, code=code,
                                overrides=overrides)
        loggers.finish(metrics)  # the dashboard shows the record's final numbers too
    finally:
        loggers.close()
    shutil.rmtree(job.run_dir / "checkpoints", ignore_errors=True)  # the record and model are final
    return record


def _tags(cfg: AblationConfig) -> list[str]:
    return [f"model={cfg.model.name}", f"k_dim={cfg.kv.k_dim}", f"v_dim={cfg.kv.v_dim}",
            f"qk_init={cfg.kv.qk_init}", f"vo_init={cfg.kv.vo_init}", f"rope={cfg.rope.schedule}",
            f"gqa={cfg.gqa.mode}", f"kv_heads={cfg.gqa.kv_heads or cfg.model.num_key_value_heads}",
            f"train={recipe_name(cfg.train.stages)}"]


def _write_outputs(
    job: Job, student, original, tokenizer, metrics, items, *, started: float, code: dict[str, Any], overrides
) -> dict[str, Any]:
    """Save the trained student (HF format) and write the job's record, with the per-item results
    behind its accuracies and needle (``items``) and the RoPE its layers ran; return the record."""
    model_dir = job.run_dir / "student"
    student.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    dtype = next(student.parameters()).dtype
    kv = {"bytes_per_token": kv_bytes_per_token(student.config, dtype=dtype),
          "original_bytes_per_token": kv_bytes_per_token(original.config, dtype=dtype)}
    kv["ratio"] = kv["bytes_per_token"] / kv["original_bytes_per_token"]
    tokens = int(metrics.get("train/tokens", 0))
    pretrain_tokens = job.cfg.model.pretrain_tokens
    return records.write_record(
        job.run_dir,
        config=job.config,
        metrics=metrics,
        code=code,
        rope_as_run=records.rope_label(job.config),
        items=items,
        kv=kv,
        tokens_trained=tokens,
        pretrain_fraction=tokens / pretrain_tokens if pretrain_tokens else None,
        wall_time_s=time.perf_counter() - started,
        command=" ".join(["python src/run.py", *overrides]),
        model_dir=str(model_dir),
        device=str(next(student.parameters()).device),
    )
