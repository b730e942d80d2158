"""Needle in a haystack, scored (DESIGN.md §2.4; the paper's protocol scaled to the model).

One trial: a haystack of held-out text fills the window, a needle sentence ("The secret code of
Lisbon is 48213.") is inserted at a sentence boundary near the given depth, the needle's first
words ("The secret code of Lisbon is") are appended as the query, and the model decodes
``new_tokens`` greedy tokens with its KV cache. The trial succeeds when the continuation starts
with the code. The paper: a 3,840-token haystack in a 4K window, 32 new tokens.

``context_length`` is the whole window: haystack + needle + query + new tokens. Every trial of a
context length therefore has the same prompt length, so a row of the grid decodes as unpadded
batches. Each trial's city, code and haystack window come from ``(seed, length, depth, trial)``
alone, so the grid is the same for a student and its original, and across runs.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from tqdm import tqdm

from kv_latent.evaluation.decoding import greedy_decode

CITIES = (
    "Lisbon", "Oslo", "Cairo", "Lima", "Dublin", "Vienna", "Madrid", "Berlin", "Paris", "London",
    "Rome", "Athens", "Prague", "Warsaw", "Moscow", "Tokyo", "Delhi", "Sydney", "Toronto", "Boston",
)  # fmt: skip
_SENTENCE_END = (".", "!", "?", "\n")


def needle_sentence(rng: random.Random) -> tuple[str, str]:
    """A random needle split into the query (its first words) and the answer (a 5-digit code)."""
    return f"The secret code of {rng.choice(CITIES)} is", str(rng.randrange(10_000, 100_000))


def haystack_tokens(texts: Sequence[str], tokenizer) -> list[int]:
    """Held-out documents as one token stream, separated by blank lines."""
    return tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]


def _sentence_starts(tokenizer) -> torch.Tensor:
    """``starts[id]`` is True when a sentence may start after token ``id``."""
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    text = [tokenizer.convert_tokens_to_string([t]).rstrip(" ") for t in vocab]
    return torch.tensor([t.endswith(_SENTENCE_END) for t in text])


def build_trial(
    stream: list[int], tokenizer, *, context_length: int, depth: float, new_tokens: int, rng: random.Random,
    sentence_starts: torch.Tensor,
) -> tuple[list[int], str]:
    """The prompt ids of one trial (``context_length - new_tokens`` long) and its answer."""
    query, answer = needle_sentence(rng)
    needle = tokenizer(f" {query} {answer}.", add_special_tokens=False)["input_ids"]
    query_ids = tokenizer(f" {query}", add_special_tokens=False)["input_ids"]
    size = context_length - new_tokens - len(needle) - len(query_ids)
    if size <= 0 or size > len(stream):
        raise ValueError(f"context_length={context_length} leaves {size} haystack tokens (have {len(stream)})")
    start = rng.randrange(len(stream) - size + 1)
    hay = stream[start : start + size]
    # Insert at the sentence boundary nearest the depth, so the needle reads as a sentence.
    boundaries = [0, size] + [i for i in range(1, size) if sentence_starts[hay[i - 1]]]
    at = min(boundaries, key=lambda i: abs(i - depth * size))
    return hay[:at] + needle + hay[at:] + query_ids, answer


def needle_grid(
    model,
    tokenizer,
    texts: Sequence[str],
    *,
    context_lengths: Sequence[int],
    depths: Sequence[float],
    trials: int,
    new_tokens: int,
    batch_size: int,
    seed: int,
    prefix: str = "needle",
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Success rate per (context length, depth) cell of the needle grid, for one model.

    ``texts`` are held-out documents (the haystack). Returns the rates, ``<prefix>/ctx<L>/depth<P>``
    (the rate of the cell; ``P`` is the depth in percent), ``<prefix>/ctx<L>/mean`` per row and
    ``<prefix>/mean`` over all cells; and the trials behind the means, ``<prefix>/ctx<L>/mean`` and
    ``<prefix>/mean`` (1.0 for a hit, 0.0 for a miss, depth by depth), for intervals over trials.
    Every cell has ``trials`` trials, so a mean of trials equals the mean of its cells.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    stream = haystack_tokens(texts, tokenizer)
    starts = _sentence_starts(tokenizer)
    rates: dict[str, float] = {}
    items: dict[str, list[float]] = {f"{prefix}/mean": []}
    progress = tqdm(total=len(context_lengths) * len(depths) * trials, desc=prefix, unit="trial")
    try:
        for length in context_lengths:
            cells = [(depth, trial) for depth in depths for trial in range(trials)]
            prompts, answers = [], []
            for depth, trial in cells:
                rng = random.Random(f"{seed}/{length}/{depth}/{trial}")
                ids, answer = build_trial(stream, tokenizer, context_length=length, depth=depth,
                                          new_tokens=new_tokens, rng=rng, sentence_starts=starts)
                prompts.append(ids)
                answers.append(answer)
            hits = []
            for i in range(0, len(prompts), batch_size):
                batch = torch.tensor(prompts[i : i + batch_size], device=device)  # (b, L - new_tokens)
                out = greedy_decode(model, batch, new_tokens=new_tokens)
                texts_out = tokenizer.batch_decode(out.tolist())
                hits += [t.lstrip().startswith(a) for t, a in zip(texts_out, answers[i : i + batch_size])]
                progress.update(len(batch))
            row = []
            for d, depth in enumerate(depths):
                rate = sum(hits[d * trials : (d + 1) * trials]) / trials
                rates[f"{prefix}/ctx{length}/depth{depth * 100:g}"] = rate
                row.append(rate)
            rates[f"{prefix}/ctx{length}/mean"] = sum(row) / len(row)
            items[f"{prefix}/ctx{length}/mean"] = [float(hit) for hit in hits]
            items[f"{prefix}/mean"] += items[f"{prefix}/ctx{length}/mean"]
    finally:
        progress.close()
        model.train(was_training)
    cells = [v for k, v in rates.items() if not k.endswith("/mean")]
    rates[f"{prefix}/mean"] = sum(cells) / len(cells)
    return rates, items
