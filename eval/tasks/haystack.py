"""Haystacks sized in target tokens: public-domain prose, or the repeated noise of InfiniteBench/RULER.

Every synthetic task builds its context from a count n of some unit (characters of prose, noise
sentences, key-value pairs) and needs the largest n whose context fits a token budget; `fit_tokens`
finds it by bisection, so it holds for any tokenizer.
"""

from __future__ import annotations

import random
from collections.abc import Callable

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

CITIES = (
    "Lisbon", "Oslo", "Nairobi", "Lima", "Hanoi", "Dublin", "Quito", "Tunis", "Riga", "Manila", "Havana",
    "Kyoto", "Porto", "Zagreb", "Accra", "Bogota", "Helsinki", "Dakar", "Seville", "Tbilisi", "Montreal",
    "Santiago", "Krakow", "Cairo", "Valencia", "Jakarta", "Vienna", "Tallinn", "Marseille", "Kampala",
)


def token_count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def fit_tokens(tokenizer, build: Callable[[int], str], budget: int, max_units: int) -> str:
    """`build(n)` for the largest n in [0, max_units] with at most `budget` tokens (the token count
    must grow with n). Bisection over n, so about log2(max_units) tokenizer calls.

    Raises ValueError when `build(0)` (the fixed part: instructions, needles) is over budget, or when
    even `build(max_units)` is under it (the source is too short to fill the budget).
    """
    if token_count(tokenizer, build(0)) > budget:
        raise ValueError(f"the fixed part of this context alone is over {budget} tokens")
    if token_count(tokenizer, build(max_units)) <= budget:
        raise ValueError(f"{max_units} units do not fill {budget} tokens; the haystack source is too short")
    fits, over = 0, max_units
    while over - fits > 1:
        middle = (fits + over) // 2
        if token_count(tokenizer, build(middle)) <= budget:
            fits = middle
        else:
            over = middle
    return build(fits)


def prose_window(corpus: str, num_chars: int, rng: random.Random) -> Callable[[int], str]:
    """A builder of the first n (<= num_chars) characters of `corpus` from a random line start,
    wrapping around to the corpus start when it runs out."""
    if not corpus:
        raise ValueError("the haystack corpus is empty")
    start = rng.randrange(len(corpus))
    line = corpus.find("\n", start)
    start = line + 1 if 0 <= line < len(corpus) - 1 else 0
    repeats = 1 + (start + num_chars) // len(corpus)
    text = (corpus * repeats)[start:start + num_chars]
    return lambda n: text[:n]


def noise_repeats(n: int) -> str:
    """n copies of the noise passage, the filler of InfiniteBench's passkey and RULER's noise haystack."""
    return " ".join([NOISE] * n)


def random_digits(rng: random.Random, digits: int) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10 ** digits))
