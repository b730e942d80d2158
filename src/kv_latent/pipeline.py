"""One job, end to end: validate -> load original -> surgery -> retrain -> evaluate -> record.

:func:`run_job` takes the resolved config as a plain dict (the Hydra entry point's only output)
and turns it into typed configs at once, so every error surfaces before any model is loaded.
A ``train.stages=[pretrain]`` job instead pre-trains the original model itself: from scratch
(``train.init=scratch``, built from ``model.arch``) or from its current weights
(``train.init=original``); with ``export=true`` the result ships as an embedded base model.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from transformers import LlamaConfig, LlamaForCausalLM

from kv_latent import base_models, records
from kv_latent.config import ConfigError, ExperimentConfig, from_mapping, to_experiment
from kv_latent.data import DataConfig, load_blocks, load_tokenizer
from kv_latent.efficiency import kv_bytes_per_token
from kv_latent.evaluation import EvalConfig, base_model_quality, evaluate_job, model_fingerprint, perplexity
from kv_latent.surgery import build_student
from kv_latent.training import TrainConfig, TrainerConfig, check_checkpoint, fit

log = logging.getLogger(__name__)

LOGGER_NAMES = ("wandb", "none")
WANDB_MODES = ("offline", "online", "disabled")


@dataclass
class LoggerConfig:
    """The ``logger=`` group: W&B (offline unless ``mode=online``) or none; a CSV is always kept."""

    name: str = "wandb"
    mode: str = "offline"
    project: str = "kv-latent"
    entity: str | None = None

    def __post_init__(self) -> None:
        if self.name not in LOGGER_NAMES:
            raise ConfigError(f"logger.name={self.name!r} is unknown; choose one of {list(LOGGER_NAMES)}")
        if self.mode not in WANDB_MODES:
            raise ConfigError(f"logger.mode={self.mode!r} is unknown; choose one of {list(WANDB_MODES)}")


@dataclass
class Job:
    """Every typed config of one job, plus where it writes."""

    experiment: ExperimentConfig
    train: TrainConfig
    trainer: TrainerConfig
    data: DataConfig
    eval: EvalConfig
    logger: LoggerConfig
    config: dict[str, Any]  # the resolved config as recorded
    run_dir: Path
    output_root: Path
    cache_dir: Path
    export: bool

    @property
    def pretraining(self) -> bool:
        return self.train.stages == ["pretrain"]


def _section(container: dict[str, Any], key: str) -> dict[str, Any]:
    if key not in container or container[key] is None:
        raise ConfigError(f"the config has no '{key}' group; add it to the defaults list of conf/config.yaml")
    return dict(container[key])


def make_job(container: dict[str, Any]) -> Job:
    """Validate a resolved config (plain dict) into a :class:`Job`; raise :class:`ConfigError` early."""
    experiment = to_experiment(container)
    train = from_mapping(TrainConfig, _section(container, "train"), "train")
    trainer = from_mapping(TrainerConfig, _section(container, "trainer"), "trainer")
    data = from_mapping(DataConfig, _section(container, "data"), "data")
    eval_cfg = EvalConfig.from_dict(_section(container, "eval"))
    logger = from_mapping(LoggerConfig, _section(container, "logger"), "logger")
    if data.seq_len != train.seq_len:
        raise ConfigError(f"data.seq_len={data.seq_len} must equal train.seq_len={train.seq_len}")
    job = Job(
        experiment=experiment,
        train=train,
        trainer=trainer,
        data=data,
        eval=eval_cfg,
        logger=logger,
        config=container,
        run_dir=Path(container["output_root"]) / "runs" / records.run_name(container),
        output_root=Path(container["output_root"]),
        cache_dir=Path(data.cache_dir) if data.cache_dir else Path(container["cache_dir"]),
        export=bool(container.get("export", False)),
    )
    m, kv = experiment.model, experiment.kv
    if m.arch and "max_position_embeddings" in m.arch:
        eval_cfg.check_context(m.arch["max_position_embeddings"])
    if job.pretraining and (kv.k_dim, kv.v_dim) != (m.head_dim, m.head_dim):
        raise ConfigError(
            f"train.stages=[pretrain] trains the original model: kv.k_dim and kv.v_dim must equal "
            f"model.head_dim={m.head_dim} (got {kv.k_dim}, {kv.v_dim})"
        )
    if job.export and not job.pretraining:
        raise ConfigError("export=true only applies to train.stages=[pretrain] (it ships a base model)")
    if train.init == "scratch":
        if not m.arch:
            raise ConfigError(f"train.init=scratch builds model {m.name!r} from model.arch, which is not set")
    else:
        base_models.check_model_source(m, cache_dir=job.cache_dir)
    train.total_steps(m.pretrain_tokens)  # a budget given as a fraction needs model.pretrain_tokens
    last = job.run_dir / "checkpoints" / "last.ckpt"
    if last.exists():
        check_checkpoint(last, train, total_steps=train.total_steps(m.pretrain_tokens))
    return job


def _device(trainer: TrainerConfig) -> torch.device:
    return torch.device("cuda" if trainer.accelerator in ("gpu", "cuda") and torch.cuda.is_available() else "cpu")


def _loggers(job: Job, group: str | None):
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    loggers = [CSVLogger(save_dir=job.run_dir, name="", version="")]
    if job.logger.name == "wandb":
        e, t = job.experiment, job.train
        loggers.append(
            WandbLogger(
                project=job.logger.project,
                entity=job.logger.entity,
                mode=job.logger.mode,
                name=records.run_name(job.config),
                group=group,
                tags=[
                    f"model={e.model.name}",
                    f"k_dim={e.kv.k_dim}",
                    f"v_dim={e.kv.v_dim}",
                    f"rope={e.rope.schedule}",
                    f"gqa={e.gqa.mode}",
                    f"train={'+'.join(t.stages)}",
                ],
                config=job.config,
                save_dir=str(job.run_dir),
            )
        )
    return loggers


def original_perplexity(job: Job, original, val_blocks: torch.Tensor) -> dict[str, float]:
    """Val perplexity of the original model, computed once per (weights, val blocks) and reused by
    every job of a sweep."""
    blocks = hashlib.sha256(val_blocks.numpy().tobytes()).hexdigest()[:16]
    key = records.config_hash({"model": {"fingerprint": model_fingerprint(original)}, "data": {"val_blocks": blocks}})
    path = job.output_root / "baselines" / f"{job.experiment.model.name}-{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    result = perplexity(original, val_blocks, batch_size=job.train.batch_size)
    records.atomic_write_json(path, result)
    return result


def _pretrain_model(job: Job) -> LlamaForCausalLM:
    m = job.experiment.model
    config = LlamaConfig(
        **m.arch,
        num_hidden_layers=m.num_hidden_layers,
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_key_value_heads,
        head_dim=m.head_dim,
    )
    torch.manual_seed(job.train.seed)
    return LlamaForCausalLM(config)


def run_job(container: dict[str, Any], *, group: str | None = None, overrides: list[str] = ()) -> dict[str, Any]:
    """Run one job and return its record; a job whose complete record exists is skipped.

    ``group`` names the sweep (W&B group); ``overrides`` are the command-line overrides, recorded
    so that every record says how to rerun it.
    """
    job = make_job(container)
    config_hash = records.config_hash(job.config)
    if records.is_complete(job.run_dir, config_hash):
        log.info("skipping %s: complete record exists", job.run_dir)
        return records.read_record(job.run_dir)
    started, code = time.perf_counter(), records.git_commit()
    e = job.experiment
    device = _device(job.trainer)

    if job.train.init == "scratch":
        original, tokenizer = None, load_tokenizer()
        student = _pretrain_model(job)
    else:
        original, tokenizer = base_models.load_base_model(e.model, cache_dir=job.cache_dir, device=device)
        if job.pretraining:  # continued pre-training of the original's own weights
            student = copy.deepcopy(original).train()
        else:
            student = build_student(
                original,
                k_dim=e.kv.k_dim,
                v_dim=e.kv.v_dim,
                init=e.kv.init,
                rope=e.rope.schedule,
                rope_at_full_dim=e.rope.at_full_dim,
            )
    train_blocks = load_blocks(job.data, "train", tokenizer=tokenizer)
    val_blocks = load_blocks(job.data, "val", tokenizer=tokenizer)

    metrics: dict[str, Any] = {}
    if original is not None:
        base = original_perplexity(job, original, val_blocks)
        metrics.update({"original/val/loss": base["loss"], "original/val/ppl": base["ppl"]})
        if not job.pretraining:
            before = perplexity(student, val_blocks, batch_size=job.train.batch_size)
            metrics.update({"surgery/val/loss": before["loss"], "surgery/val/ppl": before["ppl"]})

    loggers = _loggers(job, group)
    try:
        student, train_metrics = fit(
            student,
            teacher=original if job.train.needs_teacher else None,
            train_blocks=train_blocks,
            cfg=job.train,
            trainer_cfg=job.trainer,
            run_dir=job.run_dir,
            val_blocks=val_blocks,
            loggers=loggers,
            pretrain_tokens=e.model.pretrain_tokens,
        )
        metrics.update(train_metrics)
        if rank_zero_only.rank != 0:  # under DDP every rank returns from fit; only one writes
            return {}
        student.to(device)
        metrics.update(
            evaluate_job(
                student,
                original,
                tokenizer,
                job.eval,
                cache_dir=job.cache_dir,
                baseline_cache_dir=job.output_root / "baselines",
            )
        )
        record = _write_outputs(
            job, student, original, tokenizer, metrics, started=started, code=code, overrides=overrides
        )
        for logger in loggers:  # the dashboard shows the record's final numbers too
            logger.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
            logger.save()
    finally:
        if job.logger.name == "wandb":
            import wandb

            wandb.finish()
    if job.export:
        export_embedded(Path(record["model_dir"]), record, name=e.model.name, cache_dir=job.cache_dir)
    shutil.rmtree(job.run_dir / "checkpoints", ignore_errors=True)  # the record and model are final
    return record


def _write_outputs(
    job: Job, student, original, tokenizer, metrics, *, started: float, code: dict[str, Any], overrides
) -> dict[str, Any]:
    """Save the trained model (HF format) and write the job's record; return the record."""
    e = job.experiment
    model_dir = job.run_dir / ("model" if job.pretraining else "student")
    student.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    dtype = next(student.parameters()).dtype
    kv = {"bytes_per_token": kv_bytes_per_token(student.config, dtype=dtype)}
    if original is not None:
        kv["original_bytes_per_token"] = kv_bytes_per_token(original.config, dtype=dtype)
        kv["ratio"] = kv["bytes_per_token"] / kv["original_bytes_per_token"]
    tokens = int(metrics["train/tokens"])
    return records.write_record(
        job.run_dir,
        config=job.config,
        metrics=metrics,
        code=code,
        kv=kv,
        tokens_trained=tokens,
        pretrain_fraction=tokens / e.model.pretrain_tokens if e.model.pretrain_tokens else None,
        wall_time_s=time.perf_counter() - started,
        command=" ".join(["python src/run.py", *overrides]),
        model_dir=str(model_dir),
        device=str(next(student.parameters()).device),
    )


def export_embedded(model_dir: Path, record: dict[str, Any], *, name: str, cache_dir: Path) -> Path:
    """Ship a pretrained model as the embedded asset ``name`` with a record of how it was made.

    ``provenance.json`` holds the job's record (config, command, tokens, wall time, metrics), the
    quality bar measured on this machine (:func:`~kv_latent.evaluation.base_model_quality`) and,
    for continued pre-training (``train.init=original``), the provenance of the weights it started
    from under ``init``, so the whole chain from scratch stays on record.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = base_models.ASSETS_DIR / name
    keys = ("name", "config_hash", "code", "versions", "created", "metrics", "device", "command")
    provenance = {k: record[k] for k in keys}
    provenance.update(
        tokens_seen=record["tokens_trained"],
        wall_time_s=record["wall_time_s"],
        config=record["config"],
    )
    previous = target / "provenance.json"
    if record["config"]["train"]["init"] == "original" and previous.exists():
        provenance["init"] = json.loads(previous.read_text())
        provenance["tokens_seen"] += provenance["init"]["tokens_seen"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    provenance |= base_model_quality(model, AutoTokenizer.from_pretrained(model_dir), cache_dir=cache_dir)
    tmp = target.with_name(f".{name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(model_dir, tmp)
    records.atomic_write_json(tmp / "provenance.json", provenance)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target
