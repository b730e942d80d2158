"""Building an embedded base model (DESIGN.md §3.4): a recipe's steps, then the export.

A recipe (``conf/recipe/``, typed :class:`~kv_latent.config.PretrainConfig`) is a list of training
steps with every weight trainable and no teacher. The first starts from random weights built from
``model.arch`` (``init=scratch``) or from the model's current weights (``init=original``); each
later step starts from the model the step before it saved. Every step is a job of its own, with
a run directory ``<output_root>/pretrain/<model>/<i>_<step>-<hash>/`` that holds its record and
model; the hash covers the step's settings and where it started, so a rerun skips complete steps
and a changed step reruns it and every step after it. With ``export=true`` the steps' models are
exported in order into ``assets/<model.name>``, each ``provenance.json`` nesting the one before.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from kv_latent import base_models, records
from kv_latent.config import PretrainConfig, PretrainInit
from kv_latent.rules import check_pretrain
from kv_latent.data.blocks import load_blocks
from kv_latent.data.tokenizer import load_tokenizer
from kv_latent.evaluation.baselines import model_fingerprint
from kv_latent.evaluation.perplexity import perplexity
from kv_latent.evaluation.quality import base_model_quality
from kv_latent.files import atomic_write_json, staged_dir
from kv_latent.tracking import job_loggers
from kv_latent.training.fit import fit

log = logging.getLogger(__name__)
STEP_SECTIONS = ("model", "train", "data", "start")


@dataclass
class Step:
    """One step of a recipe, ready to run: its resolved config (as recorded), its hash over
    ``STEP_SECTIONS`` and its run directory."""

    config: dict[str, Any]  # {"model", "train", "data", "start", "recipe"}: what the record stores
    config_hash: str
    run_dir: Path

    @property
    def name(self) -> str:
        return self.run_dir.name


def plan_steps(cfg: PretrainConfig, config: dict[str, Any], *, start: dict[str, Any]) -> list[Step]:
    """The run directory of every step; ``start`` says where the first one begins (scratch and its
    seed, or the original's weights fingerprint), each later one begins at its predecessor."""
    steps = []
    for i, step in enumerate(config["steps"]):
        step_config = {"model": config["model"], "train": step["train"], "data": step["data"], "start": start,
                       "recipe": {"name": config["name"], "step": step["name"], "index": i}}
        digest = records.config_hash(step_config, STEP_SECTIONS)
        run_dir = Path(cfg.output_root) / "pretrain" / cfg.model.name / f"{i}_{step['name']}-{digest}"
        steps.append(Step(step_config, digest, run_dir))
        start = {"step": run_dir.name}
    return steps


def _start(cfg: PretrainConfig, cache_dir: Path):
    """The weights of the first step, its tokenizer, and how to name where it starts."""
    m = cfg.model
    if cfg.init == PretrainInit.scratch:
        seed = cfg.steps[0].train.seed
        config = LlamaConfig(**m.arch, num_hidden_layers=m.num_hidden_layers, num_attention_heads=m.num_attention_heads,
                             num_key_value_heads=m.num_key_value_heads, head_dim=m.head_dim,
                             max_position_embeddings=m.max_position_embeddings)
        torch.manual_seed(seed)
        return LlamaForCausalLM(config), load_tokenizer(), {"init": "scratch", "seed": seed}
    model, tokenizer = base_models.load_base_model(m, cache_dir=cache_dir)
    return model, tokenizer, {"init": "original", "fingerprint": model_fingerprint(model)}


def run_pretrain(cfg: PretrainConfig, config: dict[str, Any], *, overrides: list[str] = ()) -> list[dict[str, Any]]:
    """Run the steps of a recipe (skipping complete ones) and, with ``export``, ship the result.

    ``config`` is ``cfg`` as a resolved plain dict. Returns the steps' records in order.
    """
    check_pretrain(cfg)
    cache_dir = Path(cfg.cache_dir)
    if cfg.init == PretrainInit.original:
        base_models.check_model_source(cfg.model, cache_dir=cache_dir)
    model, tokenizer, start = _start(cfg, cache_dir)
    done = []
    for step_cfg, step in zip(cfg.steps, plan_steps(cfg, config, start=start)):
        with records.run_lock(step.run_dir):
            record = records.complete_record(step.run_dir, step.config_hash)
            if record:
                log.info("step %s: complete record exists in %s", step.name, step.run_dir)
            else:
                record = _run_step(cfg, step_cfg, step, model, tokenizer, overrides=overrides)
        done.append(record)
        model = AutoModelForCausalLM.from_pretrained(record["model_dir"], dtype=torch.float32)
        log.info("step %s: val/ppl %.3f -> %s", step.name, record["metrics"]["val/ppl"], record["model_dir"])
    if cfg.export:
        for record in done:
            export_embedded(Path(record["model_dir"]), record, name=cfg.model.name, cache_dir=cache_dir)
    return done


def _run_step(cfg: PretrainConfig, step_cfg, step: Step, model, tokenizer, *, overrides) -> dict[str, Any]:
    started, code = time.perf_counter(), records.git_commit()
    device = torch.device("cuda" if cfg.trainer.wants_cuda else "cpu")
    train_blocks = load_blocks(step_cfg.data, "train", tokenizer=tokenizer)
    val_blocks = load_blocks(step_cfg.data, "val", tokenizer=tokenizer)
    loggers = job_loggers(cfg.logger, step.run_dir, name=f"{cfg.model.name}/{step.name}", group=cfg.name,
                          config=step.config, tags=[f"model={cfg.model.name}", f"recipe={cfg.name}"])
    try:
        trained, metrics = fit(copy.deepcopy(model).train(), teacher=None, train_blocks=train_blocks,
                               cfg=step_cfg.train, trainer_cfg=cfg.trainer, run_dir=step.run_dir,
                               loggers=loggers.lightning, pretrain_tokens=cfg.model.pretrain_tokens)
        trained.to(device)
        val = perplexity(trained, val_blocks, batch_size=step_cfg.train.batch_size)
        metrics |= {"val/loss": val["loss"], "val/ppl": val["ppl"]}
        model_dir = step.run_dir / "model"
        trained.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        record = records.write_record(
            step.run_dir, config=step.config, metrics=metrics, code=code, name=f"{cfg.model.name}/{step.name}",
            hashed=step.config_hash, tokens_trained=int(metrics["train/tokens"]),
            wall_time_s=time.perf_counter() - started, model_dir=str(model_dir),
            command=" ".join(["python src/pretrain.py", *overrides]), device=str(device),
        )
        loggers.finish(metrics)
    finally:
        loggers.close()
    shutil.rmtree(step.run_dir / "checkpoints", ignore_errors=True)
    return record


def export_embedded(model_dir: Path, record: dict[str, Any], *, name: str, cache_dir: Path) -> Path:
    """Ship a pretrained model as the embedded asset ``name`` with a record of how it was made.

    ``provenance.json`` holds the step's record (config, command, tokens, wall time, metrics), the
    quality bar measured on this machine (:func:`~kv_latent.evaluation.quality.base_model_quality`)
    and, for a step that started from existing weights, the provenance of those weights under
    ``init``, so the whole chain from scratch stays on record.
    """
    target = base_models.ASSETS_DIR / name
    keys = ("name", "config_hash", "code", "versions", "created", "metrics", "device", "command")
    provenance = {k: record[k] for k in keys}
    provenance |= {"tokens_seen": record["tokens_trained"], "wall_time_s": record["wall_time_s"],
                   "config": record["config"]}
    previous = target / "provenance.json"
    if record["config"]["start"].get("init") != "scratch" and previous.exists():
        provenance["init"] = json.loads(previous.read_text())
        provenance["tokens_seen"] += provenance["init"]["tokens_seen"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    provenance |= base_model_quality(model, AutoTokenizer.from_pretrained(model_dir), cache_dir=cache_dir)
    with staged_dir(target, complete=lambda _: False) as staging:
        shutil.copytree(model_dir, staging, dirs_exist_ok=True)
        atomic_write_json(staging / "provenance.json", provenance)
    return target
