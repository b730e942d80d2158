"""Token blocks: documents tokenized, joined with EOS and cut into ``LongTensor[N, seq_len]``.

Blocks of the prose corpus (:func:`token_blocks`) or of a (streamed) HF dataset are cached as
``.npy`` under ``<cache_dir>/blocks/``, keyed by everything they depend on; :func:`load_blocks`
serves a data config, mixing the synthetic recall documents into the train split.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from kv_latent.config import DataConfig, DataSource
from kv_latent.data.corpus import CORPUS_VERSION, cache_root, check_split, load_documents, split_of
from kv_latent.data.recall import recall_blocks
from kv_latent.data.tokenizer import encode, load_tokenizer, tokenizer_hash
from kv_latent.files import atomic_path


def blocks_from_texts(
    texts: Iterable[str], *, tokenizer, seq_len: int, max_blocks: int | None = None
) -> torch.Tensor:
    """Tokenize ``texts``, end each with EOS, concatenate and cut into blocks.

    Returns a ``LongTensor[N, seq_len]`` of contiguous blocks (the incomplete tail is dropped).
    With ``max_blocks`` it stops reading ``texts`` once that many blocks are filled, so it can
    consume an endless stream.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len={seq_len} must be positive")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token; documents are joined with it")
    need = None if max_blocks is None else max_blocks * seq_len
    pieces: list[np.ndarray] = []
    total = 0
    batch: list[str] = []

    def flush() -> None:
        nonlocal total
        if not batch:
            return
        for ids in encode(tokenizer, batch):
            pieces.append(np.asarray(ids + [eos], dtype=np.int64))
            total += len(ids) + 1
        batch.clear()

    with tqdm(texts, desc="tokenizing", unit="doc", disable=None) as progress:
        for text in progress:
            batch.append(text)
            if len(batch) == 256:
                flush()
                if need is not None and total >= need:
                    break
    flush()
    flat = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    n = len(flat) // seq_len
    if max_blocks is not None:
        n = min(n, max_blocks)
    return torch.from_numpy(flat[: n * seq_len].reshape(n, seq_len).copy())  # (N, seq_len)


def _cached_blocks(path: Path, build) -> torch.Tensor:
    """The blocks saved at ``path``, or ``build()`` saved there (atomically) and returned."""
    if path.exists():
        return torch.from_numpy(np.load(path).astype(np.int64))
    blocks = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    # uint16 halves the file for vocabularies below 65536 (the shipped one, SmolLM2's).
    dtype = np.uint16 if blocks.numel() == 0 or int(blocks.max()) < 2**16 else np.int32
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, blocks.numpy().astype(dtype))
    return blocks


def token_blocks(
    split: str,
    *,
    tokenizer=None,
    seq_len: int,
    cache_dir: str | os.PathLike | None = None,
    max_blocks: int | None = None,
) -> torch.Tensor:
    """Blocks of one split of the prose corpus: ``LongTensor[N, seq_len]``.

    ``tokenizer`` defaults to the shipped one. Cached in ``<cache_dir>/blocks/`` keyed by
    (split, tokenizer hash, seq_len); ``max_blocks`` keeps the first blocks (a mixed sample, as
    documents are stored in hash order).
    """
    check_split(split)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer()
    cache = cache_root(cache_dir)
    name = f"prose-v{CORPUS_VERSION}-{split}-{tokenizer_hash(tokenizer)}-{seq_len}.npy"
    path = cache / "blocks" / name
    blocks = _cached_blocks(
        path,
        lambda: blocks_from_texts(
            [d.text for d in load_documents(split, cache)], tokenizer=tokenizer, seq_len=seq_len
        ),
    )
    return blocks if max_blocks is None else blocks[:max_blocks]


def split_rows(
    rows: Iterable[dict[str, Any]], split: str, *, text_field: str = "text", id_field: str = "id"
) -> Iterator[str]:
    """The texts of the rows of ``split``, assigned by a hash of ``row[id_field]`` as for the
    prose corpus (for datasets that have a single split, such as fineweb-edu)."""
    check_split(split)
    for row in rows:
        if id_field not in row or text_field not in row:
            missing = "id_field" if id_field not in row else "text_field"
            raise ValueError(
                f"data.{missing}={(id_field if missing == 'id_field' else text_field)!r} is not a "
                f"column of the dataset (columns: {sorted(row)})"
            )
        if split_of(str(row[id_field])) == split:
            yield row[text_field]


def load_blocks(cfg: DataConfig, split: str, *, tokenizer=None) -> torch.Tensor:
    """Blocks of ``split`` for a data config: the prose corpus or a (streamed) HF dataset.

    ``tokenizer`` defaults to the shipped one; pass the model's own tokenizer for a pretrained
    model. HF blocks are cached like prose blocks, keyed also by dataset and block cap.
    """
    check_split(split)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer()
    blocks = _source_blocks(cfg, split, tokenizer)
    if split == "train" and cfg.recall_fraction > 0:
        n = round(len(blocks) * cfg.recall_fraction / (1 - cfg.recall_fraction))
        recall = recall_blocks(
            blocks,
            tokenizer=tokenizer,
            n=n,
            seed=len(blocks),
            fact_share=cfg.recall_fact_share,
            fact_min_len=cfg.recall_fact_min_len,
        )
        blocks = torch.cat([blocks, recall])
    return blocks


def _source_blocks(cfg: DataConfig, split: str, tokenizer) -> torch.Tensor:
    cap = cfg.blocks_cap(split)
    if cfg.source == DataSource.prose:
        return token_blocks(
            split, tokenizer=tokenizer, seq_len=cfg.seq_len, cache_dir=cfg.cache_dir, max_blocks=cap
        )
    from datasets import load_dataset

    slug = re.sub(r"[^A-Za-z0-9]+", "_", f"{cfg.hf_path}-{cfg.hf_name}-{cfg.hf_split}")
    path = (
        cache_root(cfg.cache_dir)
        / "blocks"
        / f"hf-{slug}-{split}-{tokenizer_hash(tokenizer)}-{cfg.seq_len}-{cap}.npy"
    )

    def build() -> torch.Tensor:
        rows = load_dataset(cfg.hf_path, cfg.hf_name, split=cfg.hf_split, streaming=cfg.streaming)
        texts = split_rows(rows, split, text_field=cfg.text_field, id_field=cfg.id_field)
        return blocks_from_texts(texts, tokenizer=tokenizer, seq_len=cfg.seq_len, max_blocks=cap)

    return _cached_blocks(path, build)
