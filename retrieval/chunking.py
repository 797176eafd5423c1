"""Token-aware chunking of a document into fixed-size token windows with exact char spans.

The caller tokenizes (with the *target* tokenizer, so a chunk of 512 tokens is 512 target tokens):
`token_ids` and per-token char `offsets` as a Hugging Face fast tokenizer returns them with
`return_offsets_mapping=True, add_special_tokens=False`.

Char spans are cut at token starts: the boundary before token k is the char where token k starts,
so the whitespace between two tokens belongs to the chunk on its left, the first chunk starts at
char 0 and the last ends at `len(text)`. Taking each chunk up to where the next one starts (its
"own" part, without the overlap) therefore tiles the document exactly.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class ChunkConfig:
    chunk_tokens: int = 512
    overlap_tokens: int = 0

    def __post_init__(self) -> None:
        if self.chunk_tokens <= 0:
            raise ValueError(f"chunk_tokens must be positive, got {self.chunk_tokens}")
        if not 0 <= self.overlap_tokens < self.chunk_tokens:
            raise ValueError(
                f"overlap_tokens must be in [0, chunk_tokens={self.chunk_tokens}), got {self.overlap_tokens}"
            )

    @property
    def stride(self) -> int:
        return self.chunk_tokens - self.overlap_tokens


@dataclass(frozen=True)
class Chunk:
    """One window of the document: tokens [token_start, token_end), chars [char_start, char_end)."""

    index: int
    token_start: int
    token_end: int
    char_start: int
    char_end: int
    text: str

    @property
    def num_tokens(self) -> int:
        return self.token_end - self.token_start


@dataclass(frozen=True)
class ChunkedText:
    """What `chunk_text` returns: the token ids it produced and the chunks over them."""

    token_ids: np.ndarray  # [T] int64
    chunks: list[Chunk]


class OffsetTokenizer(Protocol):
    """Anything called like a Hugging Face fast tokenizer that returns input ids and offsets."""

    def __call__(
        self, text: str, *, add_special_tokens: bool, return_offsets_mapping: bool
    ) -> Mapping[str, Sequence]: ...


def chunk_spans(num_tokens: int, config: ChunkConfig) -> list[tuple[int, int]]:
    """Token spans [start, end) of the chunks of a `num_tokens`-token document.

    Chunk i starts at i * stride (stride = chunk_tokens - overlap_tokens); the last chunk is the
    first one that reaches the end, so it may be shorter.

    Worked example: 10 tokens, chunk_tokens=4, overlap_tokens=1 (stride 3):
    >>> chunk_spans(10, ChunkConfig(chunk_tokens=4, overlap_tokens=1))
    [(0, 4), (3, 7), (6, 10)]
    >>> chunk_spans(0, ChunkConfig(chunk_tokens=4))
    []
    """
    spans = []
    start = 0
    while start < num_tokens:
        end = min(start + config.chunk_tokens, num_tokens)
        spans.append((start, end))
        if end == num_tokens:
            break
        start += config.stride
    return spans


def token_boundaries(text: str, offsets: np.ndarray) -> np.ndarray:
    """Char position of every token boundary: [T + 1] int64, boundaries[0] = 0, boundaries[T] = len(text).

    boundaries[k] (0 < k < T) is where token k starts, raised to the running maximum so that a
    tokenizer giving several tokens the same or an empty offset (byte-level pieces of one
    character) still yields non-decreasing boundaries.

    Worked example: "ab  cd" tokenized as "ab" (0, 2) and "cd" (4, 6):
    >>> token_boundaries("ab  cd", np.array([[0, 2], [4, 6]])).tolist()
    [0, 4, 6]
    """
    boundaries = np.empty(len(offsets) + 1, dtype=np.int64)
    boundaries[0] = 0
    boundaries[1:-1] = offsets[1:, 0]
    boundaries[-1] = len(text)
    return np.maximum.accumulate(boundaries)


def chunk_document(
    text: str, token_ids: Sequence[int] | np.ndarray, offsets: Sequence | np.ndarray, config: ChunkConfig
) -> list[Chunk]:
    """Split a tokenized document into chunks of `config.chunk_tokens` tokens.

    Worked example: "ab cd ef" with tokens "ab" (0, 2), "cd" (3, 5), "ef" (6, 8), two per chunk:
    >>> [c.text for c in chunk_document("ab cd ef", [1, 2, 3], [(0, 2), (3, 5), (6, 8)], ChunkConfig(2))]
    ['ab cd ', 'ef']
    """
    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)  # [T]
    spans = np.asarray(offsets, dtype=np.int64)
    if len(ids) == 0 and spans.size == 0:
        return []
    if spans.ndim != 2 or spans.shape[1] != 2:
        raise ValueError(f"offsets must have shape [T, 2], got {spans.shape}")
    if len(spans) != len(ids):
        raise ValueError(f"got {len(ids)} token ids but {len(spans)} offsets")
    bad = (spans[:, 0] < 0) | (spans[:, 0] > spans[:, 1]) | (spans[:, 1] > len(text))
    if bad.any():
        k = int(np.argmax(bad))
        raise ValueError(
            f"offset {tuple(spans[k].tolist())} of token {k} is not a span of the text "
            f"(length {len(text)}): were the offsets made from this text?"
        )
    boundaries = token_boundaries(text, spans)
    chunks = []
    for index, (start, end) in enumerate(chunk_spans(len(ids), config)):
        char_start, char_end = int(boundaries[start]), int(boundaries[end])
        chunks.append(Chunk(index, start, end, char_start, char_end, text[char_start:char_end]))
    return chunks


def chunk_text(text: str, tokenizer: OffsetTokenizer, config: ChunkConfig) -> ChunkedText:
    """Tokenize `text` (no special tokens) and chunk it; `tokenizer` is any HF fast tokenizer."""
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    token_ids = np.asarray(encoding["input_ids"], dtype=np.int64).reshape(-1)
    offsets = np.asarray(encoding["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    return ChunkedText(token_ids=token_ids, chunks=chunk_document(text, token_ids, offsets, config))
