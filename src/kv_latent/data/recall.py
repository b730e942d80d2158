"""Recall documents: synthetic blocks whose targets can only be predicted by copying from the context."""

from __future__ import annotations

import random

import torch

from kv_latent.config import RECALL_FACT_MIN_SEQ_LEN

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
    positions to attend to (``conf/recipe/copy_circuit.yaml``, step ``copy_warmup``).
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
