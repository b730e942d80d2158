"""Evaluation of a (student or original) causal LM (DESIGN.md §2.4).

- :func:`perplexity`: token-weighted NLL on held-out token blocks (the quick check of training).
- :func:`base_model_quality`: the quality bar of a shipped base model (val perplexity against a
  unigram baseline, in-context retrieval), recorded in its ``provenance.json``.
- :func:`evaluate_job`: a job's full evaluation under the ``eval=`` group (:class:`EvalConfig`,
  ``conf/eval/{quick,full,paper}.yaml``): lm-eval tasks (:mod:`kv_latent.lm_eval_tasks`), the
  needle grid (:mod:`kv_latent.needle`) and efficiency (:mod:`kv_latent.efficiency`), for the
  student and its original, as flat metric keys for the record and W&B. The original's lm-eval
  and needle results depend only on (original weights, eval config), so they are computed once
  and cached as JSON; efficiency is timed, so every job measures it again, the student side by
  side with its original.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from kv_latent import records
from kv_latent.config import ConfigError, from_mapping
from kv_latent.data import load_documents, token_blocks
from kv_latent.efficiency import compare_efficiency
from kv_latent.lm_eval_tasks import OFFLINE_TASKS, SUITE_VERSION, prepare_tasks, run_lm_eval, unknown_tasks
from kv_latent.needle import haystack_tokens, needle_grid

log = logging.getLogger(__name__)


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
    """Summed next-token negative log-likelihood and the number of predicted tokens.

    Position ``t`` predicts token ``t + 1``; a prediction counts only if both its context token and
    its target are real (mask 1), so padding on either side never enters the loss. The sum is in
    float32 whatever the logits' dtype (bf16 log-softmax over a large vocab loses digits).

    Returns ``(nll_sum, n_tokens)`` as 0-d tensors, so callers can take token-weighted means
    across batches and devices.
    """
    logits = logits[:, :-1].float()  # (B, T-1, V)
    targets = input_ids[:, 1:]  # (B, T-1)
    if attention_mask is None:
        keep = torch.ones_like(targets, dtype=torch.bool)
    else:
        keep = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
    nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (B, T-1)
    nll = torch.where(keep, nll, torch.zeros_like(nll))
    return nll.sum(), keep.sum()


@torch.no_grad()
def perplexity(model, blocks, *, batch_size: int, max_blocks: int | None = None) -> dict[str, float]:
    """Token-weighted mean next-token NLL of ``model`` over ``blocks`` and its exponential.

    ``blocks`` is a LongTensor ``[N, T]`` of unpadded token blocks (or a sequence of 1-D blocks of
    equal length). Returns ``{"loss": mean NLL (nats/token), "ppl": exp(loss), "tokens": n}``.
    The model is put in eval mode and left there.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size} must be positive")
    if not isinstance(blocks, torch.Tensor):
        blocks = torch.stack(list(blocks))  # (N, T)
    if max_blocks is not None:
        blocks = blocks[:max_blocks]
    if len(blocks) == 0:
        raise ValueError("perplexity needs at least one block")
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        input_ids = blocks[start : start + batch_size].to(device)  # (b, T)
        logits = model(input_ids=input_ids, use_cache=False).logits  # (b, T, V)
        nll_sum, n = token_nll(logits, input_ids)
        total += nll_sum.item()
        count += int(n)
    loss = total / count
    return {"loss": loss, "ppl": math.exp(loss), "tokens": count}



@dataclass
class NeedleConfig:
    """``eval.needle``: the grid (context lengths in tokens, including the ``new_tokens`` the
    model decodes; insertion depths as fractions of the haystack) and trials per cell."""

    enabled: bool = True
    context_lengths: list[int] = field(default_factory=lambda: [256, 512, 1024])
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    trials: int = 4
    new_tokens: int = 8


@dataclass
class EfficiencyConfig:
    """``eval.efficiency``: batch 1, a ``prompt_len``-token prompt of held-out text, ``new_tokens``
    greedy tokens; TTFT and ms/token are medians over ``repeats`` runs after ``warmup``."""

    enabled: bool = True
    prompt_len: int = 896
    new_tokens: int = 64
    repeats: int = 5
    warmup: int = 1


@dataclass
class EvalConfig:
    """The ``eval=`` group: lm-eval ``tasks`` (zero-shot; ``limit`` caps the samples per task,
    null for all), the needle grid, the efficiency protocol and the seed of everything random."""

    name: str = "quick"
    tasks: list[str] = field(default_factory=lambda: list(OFFLINE_TASKS))
    limit: int | None = 32
    batch_size: int = 8
    seed: int = 1234
    needle: NeedleConfig = field(default_factory=NeedleConfig)
    efficiency: EfficiencyConfig = field(default_factory=EfficiencyConfig)

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EvalConfig:
        """Build from a plain mapping (a resolved Hydra group); unknown keys are named."""
        values = dict(values)
        for key, sub in (("needle", NeedleConfig), ("efficiency", EfficiencyConfig)):
            if isinstance(values.get(key), dict):
                values[key] = from_mapping(sub, values[key], f"eval.{key}")
        return from_mapping(cls, values, "eval")

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid ``eval.<key>``. Task names are
        checked too (lm-eval's registry is read only for names outside the offline suite)."""
        positive = {"eval.batch_size": self.batch_size}
        if self.limit is not None and self.limit <= 0:
            raise ConfigError(f"eval.limit={self.limit} must be positive or null")
        if self.needle.enabled:
            n = self.needle
            positive |= {"eval.needle.trials": n.trials, "eval.needle.new_tokens": n.new_tokens}
            if not n.context_lengths or min(n.context_lengths) <= n.new_tokens:
                raise ConfigError(
                    f"eval.needle.context_lengths={n.context_lengths} must be non-empty and each longer "
                    f"than eval.needle.new_tokens={n.new_tokens}"
                )
            if not n.depths or not all(0.0 <= d <= 1.0 for d in n.depths):
                raise ConfigError(f"eval.needle.depths={n.depths} must be non-empty fractions in [0, 1]")
        if self.efficiency.enabled:
            e = self.efficiency
            positive |= {"eval.efficiency.prompt_len": e.prompt_len, "eval.efficiency.new_tokens": e.new_tokens,
                         "eval.efficiency.repeats": e.repeats}
            if e.warmup < 0:
                raise ConfigError(f"eval.efficiency.warmup={e.warmup} must be >= 0")
        for key, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{key}={value} must be positive")
        if len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"eval.tasks={self.tasks} lists a task twice")
        unknown = unknown_tasks(self.tasks)
        if unknown:
            raise ConfigError(
                f"eval.tasks names unknown task(s) {unknown}; the offline suite is {list(OFFLINE_TASKS)}, "
                "other names must be lm-eval tasks"
            )

    def check_context(self, max_length: int) -> None:
        """Raise :class:`ConfigError` if the needle or efficiency windows exceed a model context
        of ``max_length`` tokens."""
        if self.needle.enabled and max(self.needle.context_lengths) > max_length:
            raise ConfigError(
                f"eval.needle.context_lengths={self.needle.context_lengths} exceed the model's context "
                f"({max_length} tokens)"
            )
        e = self.efficiency
        if e.enabled and e.prompt_len + e.new_tokens > max_length:
            raise ConfigError(
                f"eval.efficiency.prompt_len={e.prompt_len} + eval.efficiency.new_tokens={e.new_tokens} "
                f"exceed the model's context ({max_length} tokens)"
            )


@torch.inference_mode()
def copy_probe(model, blocks: torch.Tensor, *, span: int = 64, gap: int = 300, seed: int = 0) -> dict[str, float]:
    """Does ``model`` copy from its context (induction)? Mean NLL (nats/token) of a span's tokens at
    its first occurrence and when it occurs again ``gap`` tokens after its end.

    ``prose_first`` / ``prose_repeat``: a ``span``-token prose span of each block (from position
    100) written again later in the block; ``random_repeat``: the second half of a repeated
    random-token sequence (the first half is unpredictable, at about ``log(vocab)``). A model
    that copies scores far lower on the repeats; one that does not scores the same or higher.
    """
    model.eval()
    device = next(model.parameters()).device
    start, again = 100, 100 + span + gap
    if again + span > blocks.shape[1]:
        raise ValueError(f"blocks of {blocks.shape[1]} tokens are too short for span={span}, gap={gap}")
    prose = blocks.clone()
    prose[:, again : again + span] = prose[:, start : start + span]
    rand = torch.randint(len(model.get_output_embeddings().weight), (len(blocks), span),
                         generator=torch.Generator().manual_seed(seed))
    rand = torch.cat([rand, rand], dim=1)

    def nll(x: torch.Tensor) -> torch.Tensor:  # (B, T - 1): the NLL of token t + 1
        logits = model(input_ids=x.to(device), use_cache=False).logits[:, :-1].float()
        return F.cross_entropy(logits.transpose(1, 2), x[:, 1:].to(device), reduction="none")

    p, r = nll(prose), nll(rand)
    # Target t + 1 sits at column t: the span's tokens after its first, at each occurrence.
    return {
        "prose_first": p[:, start : start + span - 1].mean().item(),
        "prose_repeat": p[:, again : again + span - 1].mean().item(),
        "random_repeat": r[:, span:].mean().item(),
    }


QUALITY_SEQ_LEN = 1024
QUALITY_SLICE_BLOCKS = 8  # the val slice that tests/test_embedded_models.py re-measures
# The needle grid of eval=full (conf/eval/full.yaml): 3 lengths x 5 depths x 8 trials.
QUALITY_NEEDLE = NeedleConfig(context_lengths=[256, 512, 1024], depths=[0.0, 0.25, 0.5, 0.75, 1.0], trials=8,
                              new_tokens=16)


def unigram_loss(train: torch.Tensor, val: torch.Tensor, vocab_size: int) -> float:
    """Mean NLL (nats/token) on ``val[:, 1:]`` of the add-one-smoothed unigram model of ``train``."""
    counts = torch.bincount(train.flatten(), minlength=vocab_size).double() + 1
    return -(counts / counts.sum()).log()[val[:, 1:].flatten()].mean().item()


def base_model_quality(model, tokenizer, *, cache_dir: str | os.PathLike | None, seed: int = 1234) -> dict[str, Any]:
    """The quality bar of a base model on the prose corpus, in fp32 on the model's device.

    ``quality``: val perplexity on every val block of 1024 tokens against the unigram baseline,
    the needle grid of ``eval=full`` on test documents (chance: 1 in 90,000 codes) and the
    :func:`copy_probe` on the val slice;
    ``val_slice``: the perplexity of the first 8 val blocks, which a test re-measures.
    """
    model = model.float().eval()
    train = token_blocks("train", tokenizer=tokenizer, seq_len=QUALITY_SEQ_LEN, cache_dir=cache_dir)
    val = token_blocks("val", tokenizer=tokenizer, seq_len=QUALITY_SEQ_LEN, cache_dir=cache_dir)
    with torch.inference_mode():
        full = perplexity(model, val, batch_size=8)
        sliced = perplexity(model, val, batch_size=8, max_blocks=QUALITY_SLICE_BLOCKS)
    copy = copy_probe(model, val[:QUALITY_SLICE_BLOCKS], seed=seed)
    unigram = unigram_loss(train, val, len(tokenizer))
    texts = [d.text for d in load_documents("test", cache_dir)]
    needle = model_metrics(model, tokenizer, EvalConfig(tasks=[], needle=QUALITY_NEEDLE, seed=seed),
                           include_path=None, texts=texts)
    return {
        "quality": {
            "val_loss_fp32": full["loss"],
            "val_ppl_fp32": full["ppl"],
            "val_tokens": full["tokens"],
            "unigram_val_loss": unigram,
            "unigram_val_ppl": math.exp(unigram),
            "needle": needle,
            "needle_grid": dataclasses.asdict(QUALITY_NEEDLE),
            "copy": copy,
        },
        "val_slice": {"split": "val", "blocks": QUALITY_SLICE_BLOCKS, "seq_len": QUALITY_SEQ_LEN,
                      "dtype": "float32", "loss": sliced["loss"], "ppl": sliced["ppl"]},
    }


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of a model's config and weights (each tensor's name, shape, dtype and float64
    sum: one pass, no copies), so a baseline is never reused for other weights."""
    h = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    with torch.no_grad():
        for name, p in model.state_dict().items():
            h.update(f"{name}{tuple(p.shape)}{p.dtype}{torch.sum(p, dtype=torch.float64).item():.10e}".encode())
    return h.hexdigest()[:16]


def model_metrics(
    model, tokenizer, cfg: EvalConfig, *, include_path: Path | None, texts: list[str], prefix: str = ""
) -> dict[str, float | None]:
    """lm-eval and needle metrics of one model: ``<prefix>eval/...`` and ``<prefix>needle/...``."""
    metrics: dict[str, float | None] = {}
    if cfg.tasks:
        metrics |= run_lm_eval(model, tokenizer, cfg.tasks, include_path=include_path, limit=cfg.limit,
                               batch_size=cfg.batch_size, seed=cfg.seed, prefix=f"{prefix}eval")
    if cfg.needle.enabled:
        n = cfg.needle
        metrics |= needle_grid(model, tokenizer, texts, context_lengths=n.context_lengths, depths=n.depths,
                               trials=n.trials, new_tokens=n.new_tokens, batch_size=cfg.batch_size, seed=cfg.seed,
                               prefix=f"{prefix}needle")
    return metrics


def original_metrics(
    original, tokenizer, cfg: EvalConfig, *, include_path: Path | None, texts: list[str], baseline_cache_dir: Path
) -> dict[str, float | None]:
    """:func:`model_metrics` of the original under ``original/``, cached per (weights, eval config)
    in ``<baseline_cache_dir>/eval-<hash>.json``."""
    relevant = dataclasses.asdict(cfg)
    del relevant["name"], relevant["efficiency"]  # neither changes these results
    relevant |= {"suite_version": SUITE_VERSION}
    key = records.config_hash({"model": {"fingerprint": model_fingerprint(original)}, "eval": relevant})
    path = Path(baseline_cache_dir) / f"eval-{key}.json"
    if path.exists():
        log.info("original model: reusing evaluation %s", path)
        return json.loads(path.read_text())
    metrics = model_metrics(original, tokenizer, cfg, include_path=include_path, texts=texts, prefix="original/")
    records.atomic_write_json(path, metrics)
    return metrics


def evaluate_job(
    student,
    original,
    tokenizer,
    eval_cfg: EvalConfig,
    *,
    cache_dir: str | os.PathLike | None,
    baseline_cache_dir: str | os.PathLike,
) -> dict[str, float | None]:
    """Evaluate a job's student (and its original, if not None) under ``eval_cfg``.

    Returns flat metrics (``None`` where lm-eval reports no stderr):

    - ``eval/<task>/<metric>``, ``eval/<task>/<metric>_stderr``, ``eval/<task>/samples``
    - ``needle/ctx<L>/depth<P>`` (success rate of a cell), ``needle/ctx<L>/mean``, ``needle/mean``
    - the same under ``original/`` for the original (cached in ``baseline_cache_dir``)
    - with an original: ``efficiency/{kv_bytes_per_token,ttft_s,ms_per_token,peak_memory_bytes}``,
      the same under ``original/efficiency/`` and ``efficiency/{kv_bytes,ttft,ms_per_token,
      peak_memory}_ratio`` (student / original), see :func:`kv_latent.efficiency.compare_efficiency`

    ``cache_dir`` holds the prose corpus and the prepared task suite. Works offline once both exist.
    """
    eval_cfg.check_context(student.config.max_position_embeddings)
    include_path = prepare_tasks(cache_dir) if set(eval_cfg.tasks) & set(OFFLINE_TASKS) else None
    texts = [d.text for d in load_documents("test", cache_dir)]
    metrics = model_metrics(student, tokenizer, eval_cfg, include_path=include_path, texts=texts)
    if original is None:
        return metrics
    metrics |= original_metrics(original, tokenizer, eval_cfg, include_path=include_path, texts=texts,
                                baseline_cache_dir=Path(baseline_cache_dir))
    if eval_cfg.efficiency.enabled:
        e = eval_cfg.efficiency
        device = next(student.parameters()).device
        prompt = torch.tensor([haystack_tokens(texts, tokenizer)[: e.prompt_len]], device=device)  # (1, T)
        metrics |= compare_efficiency(student, original, prompt, new_tokens=e.new_tokens, repeats=e.repeats,
                                      warmup=e.warmup)
    return metrics
