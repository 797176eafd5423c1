"""The short RAG context for one question (RAPID): the most similar chunks, in document order.

Budget (RAPID bounds it between 4096 tokens and 1/24 of the input):

    budget = min(T, max(min_tokens, floor(T * input_fraction)))      T = document tokens
    budget = min(budget, max_tokens)                                 when max_tokens is set

If the whole document fits (T <= budget) the context is the document itself. Otherwise the chunks
with similarity >= `similarity_threshold` are taken best first while they fit (a chunk that does
not fit is skipped and smaller ones may still fill the rest), the best chunk is always kept, the
kept chunks are put back into document order, and runs of adjacent or overlapping chunks are
joined as one contiguous token span with `separator` token ids only between runs. The budget
counts a separator after every kept chunk but the first, so the context never exceeds it (unless
the best chunk alone does).

Worked example: a 10000-token document in 512-token chunks (19 of 512, a last one of 272),
min_tokens=1024, input_fraction=1/24 -> budget = max(1024, 416) = 1024; separator [0]. Best-first
hits 7 (0.9), 3 (0.8), 8 (0.7): chunk 7 (512 tokens) fits, chunk 3 needs 512 + 1 > 512 left and
is skipped, chunk 8 likewise; the context is chunk 7 alone. With min_tokens=2048 all three fit
(512 + 513 + 513 = 1538 <= 2048) and the context is chunk 3, separator, chunks 7 and 8 joined:
tokens[1536:2048] + [0] + tokens[3584:4608], 1537 tokens.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from retrieval.chunking import Chunk
from retrieval.embedding import Embedder
from retrieval.index import ChunkIndex, SearchHits


@dataclass(frozen=True)
class RagContextConfig:
    min_tokens: int = 4096
    input_fraction: float = 1 / 24
    max_tokens: int | None = None  # hard cap, e.g. the drafter's window minus question and answer room
    similarity_threshold: float = 0.1  # cosine; MiniLM scores unrelated text around 0 to 0.1
    separator: tuple[int, ...] = ()  # token ids placed between non-adjacent chunks

    def __post_init__(self) -> None:
        if self.min_tokens <= 0:
            raise ValueError(f"min_tokens must be positive, got {self.min_tokens}")
        if not 0.0 < self.input_fraction <= 1.0:
            raise ValueError(f"input_fraction must be in (0, 1], got {self.input_fraction}")
        if self.max_tokens is not None and self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {self.max_tokens}")
        if not -1.0 <= self.similarity_threshold <= 1.0:
            raise ValueError(f"similarity_threshold must be a cosine in [-1, 1], got {self.similarity_threshold}")
        if any(int(t) < 0 for t in self.separator):
            raise ValueError("separator token ids must be >= 0")

    def budget(self, num_tokens: int) -> int:
        """Context token budget for a document of `num_tokens` tokens."""
        budget = min(num_tokens, max(self.min_tokens, int(num_tokens * self.input_fraction)))
        return budget if self.max_tokens is None else min(budget, self.max_tokens)


@dataclass(frozen=True)
class SourceSpan:
    """A chunk the context was built from, for citations."""

    chunk_index: int
    token_start: int
    token_end: int
    char_start: int
    char_end: int
    score: float  # cosine similarity to the question


@dataclass(frozen=True)
class RagContext:
    token_ids: np.ndarray  # [T_ctx] int64
    sources: list[SourceSpan]  # document order
    budget: int
    whole_document: bool  # the document fit in the budget and is the context as is


def select_chunks(hits: SearchHits, chunks: Sequence[Chunk], config: RagContextConfig, budget: int) -> list[int]:
    """Chunk indices kept from best-first `hits` (first query row) under the budget and threshold."""
    kept: list[int] = []
    used = 0
    for chunk_id, score in zip(hits.ids[0].tolist(), hits.scores[0].tolist(), strict=True):
        if chunk_id < 0:
            break
        if kept and score < config.similarity_threshold:
            break
        cost = chunks[chunk_id].num_tokens + (len(config.separator) if kept else 0)
        if kept and used + cost > budget:
            continue
        kept.append(chunk_id)
        used += cost
    return kept


def join_chunks(
    kept: Sequence[int], chunks: Sequence[Chunk], token_ids: np.ndarray, separator: Sequence[int]
) -> np.ndarray:
    """Token ids [T_ctx] of the kept chunks in document order: adjacent or overlapping chunks form
    one contiguous run, and `separator` goes between runs."""
    pieces: list[np.ndarray] = []
    run_start = run_end = -1
    for i in sorted(kept, key=lambda i: chunks[i].token_start):
        chunk = chunks[i]
        if chunk.token_start > run_end:  # a gap: close the current run
            if run_end >= 0:
                pieces += [token_ids[run_start:run_end], np.asarray(separator, dtype=np.int64)]
            run_start = chunk.token_start
        run_end = max(run_end, chunk.token_end)
    if run_end >= 0:
        pieces.append(token_ids[run_start:run_end])
    return np.concatenate(pieces).astype(np.int64) if pieces else np.zeros(0, dtype=np.int64)


def source_spans(kept: Sequence[int], chunks: Sequence[Chunk], hits: SearchHits) -> list[SourceSpan]:
    """Citation spans of the kept chunks in document order, with their scores from `hits`."""
    scores = dict(zip(hits.ids[0].tolist(), hits.scores[0].tolist(), strict=True))
    return [
        SourceSpan(i, chunks[i].token_start, chunks[i].token_end, chunks[i].char_start, chunks[i].char_end, scores[i])
        for i in sorted(kept, key=lambda i: chunks[i].token_start)
    ]


class RagContextBuilder:
    """Per-document retrieval state: the chunks, their index and the document's token ids."""

    def __init__(
        self,
        embedder: Embedder,
        index: ChunkIndex,
        chunks: Sequence[Chunk],
        token_ids: Sequence[int] | np.ndarray,
        config: RagContextConfig | None = None,
    ) -> None:
        self.token_ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)  # [T]
        if index.count != len(chunks):
            raise ValueError(f"the index holds {index.count} vectors but there are {len(chunks)} chunks")
        if chunks and chunks[-1].token_end != len(self.token_ids):
            raise ValueError(f"the chunks end at token {chunks[-1].token_end}; the document has {len(self.token_ids)}")
        if index.embedder_name != embedder.name:
            raise ValueError(f"the index was built with {index.embedder_name!r}, the embedder is {embedder.name!r}")
        self.embedder = embedder
        self.index = index
        self.chunks = list(chunks)
        self.config = config or RagContextConfig()

    def build(self, question: str) -> RagContext:
        budget = self.config.budget(len(self.token_ids))
        if not self.chunks:
            return RagContext(np.zeros(0, dtype=np.int64), [], budget, whole_document=True)
        query = self.embedder.embed([question])  # [1, D]
        if len(self.token_ids) <= budget:
            hits = self.index.search(query, len(self.chunks))
            sources = source_spans(range(len(self.chunks)), self.chunks, hits)
            return RagContext(self.token_ids.copy(), sources, budget, whole_document=True)
        longest = max(c.num_tokens for c in self.chunks)
        hits = self.index.search(query, min(len(self.chunks), 2 * (budget // longest) + 8))
        kept = select_chunks(hits, self.chunks, self.config, budget)
        token_ids = join_chunks(kept, self.chunks, self.token_ids, self.config.separator)
        return RagContext(token_ids, source_spans(kept, self.chunks, hits), budget, whole_document=False)
