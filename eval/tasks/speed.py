"""Speed prompts: questions with long free-form answers over a window of public-domain prose, so the
speed suite has many decoded tokens to time. They have no references and are not scored; one
document per length is shared by all its questions."""

from __future__ import annotations

import random
from dataclasses import dataclass

from eval.tasks.example import Example
from eval.tasks.haystack import fit_tokens, prose_window
from eval.tasks.needle import CHARS_PER_TOKEN_BOUND

QUESTIONS = (
    "Summarize what happens in this passage.",
    "Quote the first five lines of the passage exactly.",
    "Which characters speak in this passage, and what does each of them want?",
)


@dataclass(frozen=True)
class SpeedConfig:
    lengths: tuple[int, ...] = (2048, 4096)
    questions: tuple[str, ...] = QUESTIONS
    max_new_tokens: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.questions:
            raise ValueError("the speed suite needs at least one question")


def speed_examples(tokenizer, corpus: str, config: SpeedConfig = SpeedConfig()) -> list[Example]:
    examples = []
    for length in config.lengths:
        rng = random.Random(f"speed-{config.seed}-{length}")
        filler = prose_window(corpus, CHARS_PER_TOKEN_BOUND * length, rng)
        context = fit_tokens(tokenizer, filler, length, CHARS_PER_TOKEN_BOUND * length)
        document_id = f"speed-{length}-s{config.seed}"
        for i, question in enumerate(config.questions):
            examples.append(Example(f"{document_id}-q{i}", "speed", document_id, context, question, (), "none",
                                    config.max_new_tokens, length))
    return examples
