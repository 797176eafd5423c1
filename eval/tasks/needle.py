"""Needle in a haystack over public-domain prose: a grid of context lengths by needle depths.

The haystack is a window of the Shakespeare texts (retrieval.texts) at a seeded line start; the
needle is a sentence such as "The special magic number for Lisbon is 48213." inserted at a sentence
end at or after the depth (retrieval.texts.insert_needle). With several needles (the multi-needle
variant) the first sits at the depth and the others are spread evenly after it; the question asks
for every value, and the score is the fraction found.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from eval.tasks.example import Example
from eval.tasks.haystack import CITIES, fit_tokens, prose_window, random_digits
from retrieval.texts import insert_needle

NEEDLE = "The special magic number for {key} is {value}."
CHARS_PER_TOKEN_BOUND = 8  # prose never needs more characters than this per token


@dataclass(frozen=True)
class NeedleConfig:
    lengths: tuple[int, ...] = (1024, 2048, 4096)
    depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    num_needles: int = 1
    seed: int = 0
    max_new_tokens: int = 24

    def __post_init__(self) -> None:
        if not 1 <= self.num_needles <= len(CITIES):
            raise ValueError(f"num_needles must be in [1, {len(CITIES)}], got {self.num_needles}")
        if any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise ValueError(f"depths must be in [0, 1], got {self.depths}")


def spread_depths(depth: float, count: int) -> list[float]:
    """The first at `depth`, the rest evenly after it: spread_depths(0.4, 3) == [0.4, 0.6, 0.8]."""
    return [depth + i * (1.0 - depth) / count for i in range(count)]


def place_needles(text: str, needles: list[str], depths: list[float]) -> str:
    for needle, depth in zip(needles, depths, strict=True):
        text = insert_needle(text, needle, depth).text
    return text


def names(items: list[str]) -> str:
    """names(["A"]) == "A"; names(["A", "B", "C"]) == "A, B and C"."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def needle_example(tokenizer, corpus: str, config: NeedleConfig, length: int, depth: float) -> Example:
    count = config.num_needles
    task = "needle" if count == 1 else f"needle-{count}"
    rng = random.Random(f"{task}-{config.seed}-{length}-{depth}")
    keys = rng.sample(CITIES, count)
    values = [random_digits(rng, 5) for _ in keys]
    needles = [NEEDLE.format(key=k, value=v) for k, v in zip(keys, values, strict=True)]
    filler = prose_window(corpus, CHARS_PER_TOKEN_BOUND * length, rng)
    depths = spread_depths(depth, count)
    context = fit_tokens(tokenizer, lambda n: place_needles(filler(n), needles, depths), length,
                         CHARS_PER_TOKEN_BOUND * length)
    spans = tuple((context.index(n), context.index(n) + len(n)) for n in needles)
    question = (f"What is the special magic number for {keys[0]}?" if count == 1
                else f"What are the special magic numbers for {names(keys)}?")
    example_id = f"{task}-{length}-d{depth:g}-s{config.seed}"
    return Example(example_id, task, example_id, context, question, tuple(values), "match_all",
                   config.max_new_tokens, length, depth, spans)


def needle_examples(tokenizer, corpus: str, config: NeedleConfig = NeedleConfig()) -> list[Example]:
    """One example per (length, depth); the same config and corpus always give the same examples."""
    return [needle_example(tokenizer, corpus, config, length, depth)
            for length in config.lengths for depth in config.depths]
