"""RULER-style needle variants (Hsieh et al. 2024): single, multi-key, multi-value and multi-query needles.

Each needle reads "One of the special magic numbers for {key} is: {value}." with a city as key and a
seven-digit value, in a prose (Shakespeare) or noise haystack after RULER's instruction.
- single: one needle at the depth.
- multikey: the asked needle at the depth plus `distractors` needles with other keys at random depths.
- multivalue: `values` needles with the same key; every value must be recalled.
- multiquery: `queries` needles with different keys, all asked at once.
Scored by RULER's string_match_all: the fraction of the expected values found in the answer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from eval.tasks.example import Example
from eval.tasks.haystack import CITIES, fit_tokens, noise_repeats, prose_window, random_digits
from eval.tasks.needle import CHARS_PER_TOKEN_BOUND, names, place_needles

Variant = Literal["single", "multikey", "multivalue", "multiquery"]
VARIANTS: tuple[Variant, ...] = ("single", "multikey", "multivalue", "multiquery")
INSTRUCTION = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
               "I will quiz you about the numbers afterwards.")
NEEDLE = "One of the special magic numbers for {key} is: {value}."
MAX_NEW_TOKENS: dict[Variant, int] = {"single": 32, "multikey": 32, "multivalue": 72, "multiquery": 72}


@dataclass(frozen=True)
class RulerConfig:
    lengths: tuple[int, ...] = (1024, 2048, 4096)
    depths: tuple[float, ...] = (0.5,)
    variants: tuple[Variant, ...] = VARIANTS
    haystack: Literal["prose", "noise"] = "prose"
    distractors: int = 3
    values: int = 4
    queries: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = set(self.variants) - set(VARIANTS)
        if unknown:
            raise ValueError(f"unknown RULER variants {sorted(unknown)}; choose from {VARIANTS}")
        if any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise ValueError(f"depths must be in [0, 1], got {self.depths}")
        if min(self.distractors, self.values - 1, self.queries - 1) < 0 or self.queries > len(CITIES):
            raise ValueError("need distractors >= 0, values >= 1 and 1 <= queries <= the number of cities")


@dataclass(frozen=True)
class NeedleSet:
    needles: list[tuple[str, str]]  # (key, value); the first is the asked one, at the depth
    question: str
    references: tuple[str, ...]


def needle_set(variant: Variant, config: RulerConfig, rng: random.Random) -> NeedleSet:
    keys = rng.sample(CITIES, 1 + max(config.distractors, config.queries))
    if variant == "multivalue":
        needles = [(keys[0], random_digits(rng, 7)) for _ in range(config.values)]
    else:
        count = {"single": 1, "multikey": 1 + config.distractors, "multiquery": config.queries}[variant]
        needles = [(key, random_digits(rng, 7)) for key in keys[:count]]
    asked = needles if variant in ("multivalue", "multiquery") else needles[:1]
    if variant == "multiquery":
        question = f"What are all the special magic numbers for {names([k for k, _ in asked])} mentioned in the text?"
    elif variant == "multivalue":
        question = f"What are all the special magic numbers for {keys[0]} mentioned in the text?"
    else:
        question = f"What is the special magic number for {keys[0]} mentioned in the text?"
    return NeedleSet(needles, question, tuple(v for _, v in asked))


def ruler_example(tokenizer, corpus: str, config: RulerConfig, variant: Variant, length: int,
                  depth: float) -> Example:
    rng = random.Random(f"ruler-{variant}-{config.haystack}-{config.seed}-{length}-{depth}")
    chosen = needle_set(variant, config, rng)
    texts = [NEEDLE.format(key=k, value=v) for k, v in chosen.needles]
    depths = [depth] + [rng.random() for _ in texts[1:]]
    order = sorted(range(len(texts)), key=lambda i: depths[i])
    if config.haystack == "prose":
        filler, units = prose_window(corpus, CHARS_PER_TOKEN_BOUND * length, rng), CHARS_PER_TOKEN_BOUND * length
    else:
        filler, units = noise_repeats, length
    head = INSTRUCTION + "\n\n"
    context = fit_tokens(
        tokenizer, lambda n: head + place_needles(filler(n), [texts[i] for i in order], [depths[i] for i in order]),
        length, units)
    spans = tuple((context.index(t), context.index(t) + len(t)) for t in texts)
    example_id = f"ruler-{variant}-{config.haystack}-{length}-d{depth:g}-s{config.seed}"
    return Example(example_id, f"ruler-{variant}", example_id, context, chosen.question, chosen.references,
                   "match_all", MAX_NEW_TOKENS[variant], length, depth, spans)


def ruler_examples(tokenizer, corpus: str, config: RulerConfig = RulerConfig()) -> list[Example]:
    """One example per (variant, length, depth); needles other than the first go at seeded random depths."""
    return [ruler_example(tokenizer, corpus, config, variant, length, depth)
            for variant in config.variants for length in config.lengths for depth in config.depths]
