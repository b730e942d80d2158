"""``python -m kv_latent.data prepare|tokenizer``: build the corpus, or train the shipped tokenizer."""

from __future__ import annotations

import argparse
import json

from kv_latent.data.corpus import prepare_corpus
from kv_latent.data.tokenizer import TOKENIZER_DIR, TOKENIZER_VOCAB_SIZE, train_tokenizer


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
    corpus = prepare_corpus(args.cache_dir)
    if args.command == "tokenizer":
        train_tokenizer(corpus, vocab_size=args.vocab_size, out_dir=args.out_dir)
    stats = json.loads((corpus / "stats.json").read_text())
    print(f"corpus: {corpus}")
    for split, counts in stats["splits"].items():
        print(f"  {split:5s} " + "  ".join(f"{k}={v:,}" for k, v in counts.items()))


if __name__ == "__main__":
    main()
