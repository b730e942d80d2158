"""The quality bar of a base model (DESIGN.md §2.4), recorded in its ``provenance.json``.

:func:`base_model_quality` measures val perplexity against a unigram baseline
(:func:`unigram_loss`), the needle grid of ``eval=full`` and in-context copying
(:func:`copy_probe`), so a shipped model shows it learnt more than word frequencies and can
retrieve from its context.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import torch
import torch.nn.functional as F

from kv_latent.config import EvalConfig, NeedleConfig
from kv_latent.data.blocks import token_blocks
from kv_latent.data.corpus import load_documents
from kv_latent.evaluation.perplexity import perplexity
from kv_latent.evaluation.suite import model_metrics

QUALITY_SEQ_LEN = 1024
QUALITY_SLICE_BLOCKS = 8  # the val slice that tests/test_embedded_models.py re-measures
# The needle grid of eval=full (conf/eval/full.yaml): 3 lengths x 5 depths x 8 trials.
QUALITY_NEEDLE = NeedleConfig(context_lengths=[256, 512, 1024], depths=[0.0, 0.25, 0.5, 0.75, 1.0], trials=8,
                              new_tokens=16)


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
    needle, _ = model_metrics(model, tokenizer, EvalConfig(tasks=[], needle=QUALITY_NEEDLE, seed=seed),
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
