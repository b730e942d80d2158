"""A job's full evaluation under the ``eval=`` group (DESIGN.md §2.4).

:func:`evaluate_job` runs, for the student and its original, the lm-eval tasks
(:mod:`~kv_latent.evaluation.lm_eval_tasks`), the needle grid (:mod:`~kv_latent.evaluation.needle`)
and efficiency (:mod:`~kv_latent.evaluation.efficiency`), as flat metric keys for the record and
W&B. The original's lm-eval and needle results depend only on (original weights, eval config), so
they are computed once and cached (:mod:`~kv_latent.evaluation.baselines`); efficiency is timed, so
every job measures it again, the student side by side with its original.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from kv_latent.config import EvalConfig
from kv_latent.data.corpus import load_documents
from kv_latent.evaluation.baselines import cached_baseline
from kv_latent.evaluation.efficiency import compare_efficiency
from kv_latent.evaluation.lm_eval_tasks import OFFLINE_TASKS, SUITE_VERSION, prepare_tasks, run_lm_eval
from kv_latent.evaluation.needle import haystack_tokens, needle_grid


Items = dict[str, list[float]]  # per-item results (1.0 / 0.0) behind a metric, under its key


def model_metrics(
    model, tokenizer, cfg: EvalConfig, *, include_path: Path | None, texts: list[str], prefix: str = ""
) -> tuple[dict[str, float | None], Items]:
    """lm-eval and needle metrics of one model, ``<prefix>eval/...`` and ``<prefix>needle/...``, and
    the per-item results behind the accuracies and needle means (the same keys); a progress bar
    each, ``<prefix>lm-eval`` and ``<prefix>needle``."""
    metrics: dict[str, float | None] = {}
    items: Items = {}
    if cfg.tasks:
        task_metrics, task_items = run_lm_eval(
            model, tokenizer, cfg.tasks, include_path=include_path, limit=cfg.limit, batch_size=cfg.batch_size,
            seed=cfg.seed, prefix=f"{prefix}eval", desc=f"{prefix}lm-eval")
        metrics |= task_metrics
        items |= task_items
    if cfg.needle.enabled:
        n = cfg.needle
        rates, trials = needle_grid(model, tokenizer, texts, context_lengths=n.context_lengths, depths=n.depths,
                                    trials=n.trials, new_tokens=n.new_tokens, batch_size=cfg.batch_size,
                                    seed=cfg.seed, prefix=f"{prefix}needle")
        metrics |= rates
        items |= trials
    return metrics, items


def original_metrics(
    original, tokenizer, cfg: EvalConfig, *, include_path: Path | None, texts: list[str], baseline_cache_dir: Path
) -> tuple[dict[str, float | None], Items]:
    """:func:`model_metrics` of the original under ``original/``, cached per (weights, eval config)
    in ``<baseline_cache_dir>/eval-<hash>.json``."""
    relevant = dataclasses.asdict(cfg)
    del relevant["name"], relevant["efficiency"]  # neither changes these results
    relevant |= {"suite_version": SUITE_VERSION, "with_items": True}

    def compute() -> dict[str, dict]:
        metrics, items = model_metrics(original, tokenizer, cfg, include_path=include_path, texts=texts,
                                       prefix="original/")
        return {"metrics": metrics, "items": items}

    cached = cached_baseline(baseline_cache_dir, "eval", model=original, settings={"eval": relevant}, compute=compute)
    return cached["metrics"], cached["items"]


def evaluate_job(
    student,
    original,
    tokenizer,
    eval_cfg: EvalConfig,
    *,
    cache_dir: str | os.PathLike | None,
    baseline_cache_dir: str | os.PathLike,
) -> tuple[dict[str, float | None], Items]:
    """Evaluate a job's student (and its original, if not None) under ``eval_cfg``.

    Returns flat metrics (``None`` where lm-eval reports no stderr):

    - ``eval/<task>/<metric>``, ``eval/<task>/<metric>_stderr``, ``eval/<task>/samples``,
      ``eval/<task>/chance`` (multiple choice: the accuracy of a uniform guess)
    - ``needle/ctx<L>/depth<P>`` (success rate of a cell), ``needle/ctx<L>/mean``, ``needle/mean``
    - the same under ``original/`` for the original (cached in ``baseline_cache_dir``)
    - with an original: ``efficiency/{kv_bytes_per_token,ttft_s,ms_per_token,peak_memory_bytes}``,
      the same under ``original/efficiency/`` and ``efficiency/{kv_bytes,ttft,ms_per_token,
      peak_memory}_ratio`` (student / original) with the spread of the latency ratios, see
      :func:`kv_latent.evaluation.efficiency.compare_efficiency`

    and the per-item results (:data:`Items`) behind ``eval/<task>/acc``, ``acc_norm``, the needle
    means and their ``original/`` counterparts, for intervals over eval items.

    ``cache_dir`` holds the prose corpus and the prepared task suite. Works offline once both exist.
    """
    eval_cfg.check_context(student.config.max_position_embeddings)
    include_path = prepare_tasks(cache_dir) if set(eval_cfg.tasks) & set(OFFLINE_TASKS) else None
    texts = [d.text for d in load_documents("test", cache_dir)]
    metrics, items = model_metrics(student, tokenizer, eval_cfg, include_path=include_path, texts=texts)
    if original is None:
        return metrics, items
    original_values, original_items = original_metrics(original, tokenizer, eval_cfg, include_path=include_path,
                                                       texts=texts, baseline_cache_dir=Path(baseline_cache_dir))
    metrics |= original_values
    items |= original_items
    if eval_cfg.efficiency.enabled:
        e = eval_cfg.efficiency
        device = next(student.parameters()).device
        prompt = torch.tensor([haystack_tokens(texts, tokenizer)[: e.prompt_len]], device=device)  # (1, T)
        metrics |= compare_efficiency(student, original, prompt, new_tokens=e.new_tokens, repeats=e.repeats,
                                      warmup=e.warmup, clock=e.clock)
    return metrics, items
