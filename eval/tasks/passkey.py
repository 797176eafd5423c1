"""Passkey retrieval in the style of InfiniteBench: a five-digit key hidden in repeated noise.

Scored as InfiniteBench scores it: the first integer of the answer must be the key.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from eval.tasks.example import Example
from eval.tasks.haystack import fit_tokens, noise_repeats, random_digits
from retrieval.texts import insert_needle

INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
               "I will quiz you about the important information there.")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key?"


@dataclass(frozen=True)
class PasskeyConfig:
    lengths: tuple[int, ...] = (1024, 2048, 4096)
    depths: tuple[float, ...] = (0.5,)
    seed: int = 0
    max_new_tokens: int = 16

    def __post_init__(self) -> None:
        if any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise ValueError(f"depths must be in [0, 1], got {self.depths}")


def passkey_example(tokenizer, config: PasskeyConfig, length: int, depth: float) -> Example:
    key = random_digits(random.Random(f"passkey-{config.seed}-{length}-{depth}"), 5)
    needle = NEEDLE.format(key=key)
    head = INSTRUCTION + "\n\n"
    context = fit_tokens(tokenizer, lambda n: head + insert_needle(noise_repeats(n), needle, depth).text,
                         length, length)
    start = context.index(needle)
    example_id = f"passkey-{length}-d{depth:g}-s{config.seed}"
    return Example(example_id, "passkey", example_id, context, QUESTION, (key,), "passkey", config.max_new_tokens,
                   length, depth, ((start, start + len(needle)),))


def passkey_examples(tokenizer, config: PasskeyConfig = PasskeyConfig()) -> list[Example]:
    return [passkey_example(tokenizer, config, length, depth) for length in config.lengths for depth in config.depths]
