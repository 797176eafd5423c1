"""Key-value retrieval in the style of InfiniteBench's kv_retrieval: find one UUID's value in a JSON object
of UUID pairs. The queried pair sits at the depth (as a fraction of the pairs); scored by InfiniteBench's
rule (the value is one of the answer's words)."""

from __future__ import annotations

import json
import random
import uuid
from dataclasses import dataclass

from eval.tasks.example import Example
from eval.tasks.haystack import fit_tokens

INSTRUCTION = "Extract the value corresponding to the specified key in the JSON object below."
MIN_TOKENS_PER_PAIR = 8  # two quoted UUIDs are never fewer tokens than this


@dataclass(frozen=True)
class KVConfig:
    lengths: tuple[int, ...] = (1024, 2048, 4096)
    depths: tuple[float, ...] = (0.5,)
    seed: int = 0
    max_new_tokens: int = 48

    def __post_init__(self) -> None:
        if any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise ValueError(f"depths must be in [0, 1], got {self.depths}")


def random_uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def kv_context(pairs: list[tuple[str, str]], target: tuple[str, str], depth: float) -> str:
    """The instruction and a one-line JSON object of `pairs` with `target` inserted at `depth`."""
    at = round(depth * len(pairs))
    data = dict([*pairs[:at], target, *pairs[at:]])
    return f"{INSTRUCTION}\n\nJSON data:\n{json.dumps(data, ensure_ascii=False)}"


def kv_example(tokenizer, config: KVConfig, length: int, depth: float) -> Example:
    rng = random.Random(f"kv-{config.seed}-{length}-{depth}")
    target = (random_uuid(rng), random_uuid(rng))
    pairs = [(random_uuid(rng), random_uuid(rng)) for _ in range(length // MIN_TOKENS_PER_PAIR)]
    context = fit_tokens(tokenizer, lambda n: kv_context(pairs[:n], target, depth), length, len(pairs))
    pair_text = json.dumps(dict([target]))[1:-1]
    start = context.index(pair_text)
    question = f'What is the value associated with the key "{target[0]}" in the JSON data?'
    example_id = f"kv-{length}-d{depth:g}-s{config.seed}"
    return Example(example_id, "kv", example_id, context, question, (target[1],), "kv_word", config.max_new_tokens,
                   length, depth, ((start, start + len(pair_text)),))


def kv_examples(tokenizer, config: KVConfig = KVConfig()) -> list[Example]:
    return [kv_example(tokenizer, config, length, depth) for length in config.lengths for depth in config.depths]
