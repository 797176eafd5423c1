import numpy as np
import pytest
from word_tokenizer import WordTokenizer

from retrieval.chunking import Chunk, ChunkConfig, chunk_spans, chunk_text
from retrieval.context import RagContextBuilder, RagContextConfig, join_chunks, select_chunks
from retrieval.index import ChunkIndex, SearchHits
from retrieval.texts import make_haystack


def token_chunks(num_tokens: int, config: ChunkConfig) -> list[Chunk]:
    """Chunks of a document whose token k is char k (text irrelevant here)."""
    return [Chunk(i, a, b, a, b, "") for i, (a, b) in enumerate(chunk_spans(num_tokens, config))]


def hits(ids: list[int], scores: list[float]) -> SearchHits:
    return SearchHits(ids=np.array([ids]), scores=np.array([scores], dtype=np.float32))


@pytest.mark.parametrize(
    ("num_tokens", "config", "budget"),
    [
        (1_000, RagContextConfig(), 1_000),  # shorter than 4096: all of it
        (48_000, RagContextConfig(), 4_096),  # 1/24 is 2000 < 4096
        (240_000, RagContextConfig(), 10_000),  # 1/24 of the input
        (240_000, RagContextConfig(max_tokens=6_000), 6_000),
        (1_000, RagContextConfig(min_tokens=512, input_fraction=0.25), 512),
    ],
)
def test_budget(num_tokens, config, budget):
    assert config.budget(num_tokens) == budget


def test_worked_example():
    chunks = token_chunks(10_000, ChunkConfig(chunk_tokens=512))
    assert len(chunks) == 20 and chunks[-1].num_tokens == 272
    tokens = np.arange(10_000) + 1000
    best_first = hits([7, 3, 8], [0.9, 0.8, 0.7])
    small = RagContextConfig(min_tokens=1024, separator=(0,))
    assert small.budget(10_000) == 1024
    assert select_chunks(best_first, chunks, small, 1024) == [7]
    large = RagContextConfig(min_tokens=2048, separator=(0,))
    kept = select_chunks(best_first, chunks, large, large.budget(10_000))
    assert kept == [7, 3, 8]
    ids = join_chunks(kept, chunks, tokens, large.separator)
    expected = np.concatenate([tokens[1536:2048], [0], tokens[3584:4608]])
    assert np.array_equal(ids, expected) and len(ids) == 1537


def test_threshold_and_always_the_best_chunk():
    chunks = token_chunks(4096, ChunkConfig(chunk_tokens=512))
    config = RagContextConfig(min_tokens=4096, similarity_threshold=0.5)
    assert select_chunks(hits([2, 5, 1], [0.9, 0.6, 0.4]), chunks, config, 4096) == [2, 5]
    assert select_chunks(hits([2, 5], [0.2, 0.1]), chunks, config, 4096) == [2]  # best kept below threshold
    assert select_chunks(hits([-1], [-np.inf]), chunks, config, 4096) == []


def test_skips_a_chunk_that_does_not_fit_and_fills_with_a_smaller_one():
    chunks = token_chunks(1100, ChunkConfig(chunk_tokens=500))  # 500, 500, 100
    config = RagContextConfig(min_tokens=1, similarity_threshold=0.0)
    assert select_chunks(hits([0, 1, 2], [0.9, 0.8, 0.7]), chunks, config, 650) == [0, 2]


def test_overlapping_and_adjacent_chunks_join_without_duplicates():
    chunks = token_chunks(40, ChunkConfig(chunk_tokens=10, overlap_tokens=5))  # starts 0, 5, 10, ...
    tokens = np.arange(40)
    ids = join_chunks([1, 0, 5], chunks, tokens, separator=[99, 98])
    assert ids.tolist() == [*range(0, 15), 99, 98, *range(25, 35)]


def test_config_is_validated():
    for bad in (
        {"min_tokens": 0},
        {"input_fraction": 0.0},
        {"input_fraction": 1.5},
        {"max_tokens": -1},
        {"similarity_threshold": 2.0},
        {"separator": (-1,)},
    ):
        with pytest.raises(ValueError):
            RagContextConfig(**bad)


@pytest.fixture(scope="module")
def haystack_builder(embedder):
    needle = "The lighthouse keeper hid the silver key under the blue stone."
    haystack = make_haystack(30_000, needle, depth=0.7, seed=5)
    chunked = chunk_text(haystack.text, WordTokenizer(), ChunkConfig(chunk_tokens=128))
    index = ChunkIndex.build(embedder.embed([c.text for c in chunked.chunks]), embedder.name)
    return haystack, chunked, index


def test_builder_finds_the_needle_within_budget(embedder, haystack_builder):
    haystack, chunked, index = haystack_builder
    config = RagContextConfig(min_tokens=300, input_fraction=1 / 24, separator=(7,))
    builder = RagContextBuilder(embedder, index, chunked.chunks, chunked.token_ids, config)
    context = builder.build("Where did the lighthouse keeper hide the silver key?")
    assert not context.whole_document and context.budget == config.budget(len(chunked.token_ids))
    assert len(context.token_ids) <= context.budget
    starts = [s.token_start for s in context.sources]
    assert starts == sorted(starts)
    best = max(context.sources, key=lambda s: s.score)
    assert best.char_start <= haystack.needle_start < best.char_end
    assert haystack.needle in haystack.text[best.char_start : best.char_end + len(haystack.needle)]


def test_builder_returns_a_short_document_whole(embedder):
    chunked = chunk_text("Rain fell on the town. The market closed early.", WordTokenizer(), ChunkConfig(4))
    index = ChunkIndex.build(embedder.embed([c.text for c in chunked.chunks]), embedder.name)
    context = RagContextBuilder(embedder, index, chunked.chunks, chunked.token_ids).build("When did it close?")
    assert context.whole_document and np.array_equal(context.token_ids, chunked.token_ids)
    assert [s.chunk_index for s in context.sources] == list(range(len(chunked.chunks)))


def test_builder_checks_its_parts(embedder, haystack_builder):
    _, chunked, index = haystack_builder
    with pytest.raises(ValueError, match="vectors but there are"):
        RagContextBuilder(embedder, index, chunked.chunks[:-1], chunked.token_ids)
    with pytest.raises(ValueError, match="the document has"):
        RagContextBuilder(embedder, index, chunked.chunks, chunked.token_ids[:-1])
    other = ChunkIndex(index.index, "another-model", index.kind, index.config)
    with pytest.raises(ValueError, match="another-model"):
        RagContextBuilder(embedder, other, chunked.chunks, chunked.token_ids)
