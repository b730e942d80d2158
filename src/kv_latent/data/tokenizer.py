"""The shipped tokenizer: a byte-level BPE trained on the train split of the prose corpus.

``<|endoftext|>`` is its only special token. The tokenizer lives in ``assets/tokenizer/``
(committed), with ``provenance.json`` saying how it was made; :func:`tokenizer_hash` keys every
cache of token blocks.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from kv_latent.files import atomic_write_text

EOS_TOKEN = "<|endoftext|>"
TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "assets" / "tokenizer"
TOKENIZER_VOCAB_SIZE = 4096
PROVENANCE_FILE = "provenance.json"


def load_tokenizer(path: str | os.PathLike | None = None):
    """The shipped byte-level BPE tokenizer (or the transformers tokenizer dir at ``path``).

    ``<|endoftext|>`` is its only special token and serves as BOS, EOS, PAD and UNK (GPT-2
    style); no special tokens are added on encode, and documents are joined with it in training
    blocks.
    """
    from transformers import AutoTokenizer

    directory = Path(path) if path is not None else TOKENIZER_DIR
    if not (directory / "tokenizer.json").exists():
        raise FileNotFoundError(
            f"no tokenizer in {directory}; build it with `python -m kv_latent.data tokenizer`"
        )
    return AutoTokenizer.from_pretrained(str(directory))


def _split_texts(corpus: Path, split: str) -> list[str]:
    """The document texts of ``corpus/<split>.jsonl``."""
    with open(corpus / f"{split}.jsonl", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def train_tokenizer(
    corpus: Path,
    *,
    vocab_size: int = TOKENIZER_VOCAB_SIZE,
    out_dir: str | os.PathLike = TOKENIZER_DIR,
) -> Path:
    """Train a byte-level BPE on the train split of ``corpus`` (a directory built by
    :func:`kv_latent.data.corpus.prepare_corpus`) and save it as a transformers tokenizer dir.

    Also writes ``provenance.json`` (how it was made, corpus stats, tokens per split) into
    ``out_dir`` and adds the token counts to the corpus ``stats.json``. Returns ``out_dir``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    train_texts = _split_texts(corpus, "train")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(train_texts, trainer=trainer, length=len(train_texts))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out))
    tokenizer = load_tokenizer(out)  # count with exactly what was saved
    stats = add_token_counts(corpus, tokenizer)
    provenance = {
        "command": "python -m kv_latent.data tokenizer",
        "model": "byte-level BPE (tokenizers.models.BPE, ByteLevel pre-tokenizer and decoder)",
        "vocab_size": len(tokenizer),
        "min_frequency": 2,
        "special_tokens": {"bos": EOS_TOKEN, "eos": EOS_TOKEN, "pad": EOS_TOKEN, "unk": EOS_TOKEN},
        "trained_on": "train split of the prose corpus (kv_latent.data.prepare_corpus)",
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "corpus": stats,
    }
    atomic_write_text(out / PROVENANCE_FILE, json.dumps(provenance, indent=2) + "\n")
    return out


def tokenizer_hash(tokenizer) -> str:
    """A short content hash of a tokenizer (vocab, merges, normalisation), for cache keys."""
    if getattr(tokenizer, "is_fast", False):
        content = tokenizer.backend_tokenizer.to_str()
    else:
        content = json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(content.encode()).hexdigest()[:16]


def encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """The token ids of each of ``texts``, without special tokens."""
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def add_token_counts(corpus: Path, tokenizer) -> dict[str, Any]:
    """Add tokens per split (and the tokenizer hash) to ``corpus/stats.json``; return the stats."""
    stats = json.loads((corpus / "stats.json").read_text())
    for split, counts in stats["splits"].items():
        texts = _split_texts(corpus, split)
        batches = (texts[i : i + 256] for i in range(0, len(texts), 256))
        counts["tokens"] = sum(len(ids) for batch in batches for ids in encode(tokenizer, batch))
    stats["tokenizer_hash"] = tokenizer_hash(tokenizer)
    atomic_write_text(corpus / "stats.json", json.dumps(stats, indent=2) + "\n")
    return stats
