"""Middle truncation (LongBench): a prompt longer than the model's limit keeps its head and its tail.

The question usually sits at the start or the end of a long input and the answer's evidence is spread
through it, so cutting the middle loses the least. Token level, worked example: 10 tokens into 5 keep
the first 5 // 2 = 2 and the last 3:

    >>> keep_middle_out(list(range(10)), 5)
    [0, 1, 7, 8, 9]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Truncation:
    text: str
    original_tokens: int
    tokens: int  # after truncation (== original_tokens when nothing was cut)

    @property
    def cut_tokens(self) -> int:
        return self.original_tokens - self.tokens


def keep_middle_out(token_ids: Sequence[int], max_tokens: int) -> list[int]:
    """The first max_tokens // 2 and the last max_tokens - max_tokens // 2 tokens (all if they fit)."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if len(token_ids) <= max_tokens:
        return list(token_ids)
    head = max_tokens // 2
    return list(token_ids[:head]) + list(token_ids[len(token_ids) - (max_tokens - head):])


def truncate_middle(text: str, tokenizer, max_tokens: int) -> Truncation:
    """Cut the middle of `text` at token boundaries (the original characters are kept on both sides) so it
    tokenizes to at most `max_tokens` tokens. Re-tokenizing the joined text can merge across the cut, so
    the cut grows until the result fits."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    total = len(encoded.input_ids)
    if total <= max_tokens:
        return Truncation(text, total, total)
    offsets = encoded.offset_mapping
    keep = max_tokens
    while True:
        head = keep // 2
        tail_start = total - (keep - head)
        cut = text[: offsets[head - 1][1]] if head else ""
        cut += text[offsets[tail_start][0]:]
        count = len(tokenizer(cut, add_special_tokens=False).input_ids)
        if count <= max_tokens:
            return Truncation(cut, total, count)
        keep -= count - max_tokens
