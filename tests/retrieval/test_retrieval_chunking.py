import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from word_tokenizer import WordTokenizer

from retrieval.chunking import ChunkConfig, chunk_document, chunk_spans, chunk_text, token_boundaries


def assert_tiles_document(text: str, chunks, num_tokens: int, config: ChunkConfig) -> None:
    """Each chunk up to where the next starts (its own part) tiles [0, len(text)) exactly."""
    if num_tokens == 0:
        assert chunks == []
        return
    assert chunks[0].char_start == 0 and chunks[-1].char_end == len(text)
    for chunk, following in zip(chunks, chunks[1:], strict=False):
        assert chunk.char_start <= following.char_start <= chunk.char_end
        assert following.token_start == chunk.token_start + config.stride
    own_parts = [text[a.char_start : b.char_start] for a, b in zip(chunks, chunks[1:], strict=False)]
    own_parts.append(text[chunks[-1].char_start :])
    assert "".join(own_parts) == text
    for i, chunk in enumerate(chunks):
        assert chunk.index == i
        assert chunk.text == text[chunk.char_start : chunk.char_end]
        assert 0 < chunk.num_tokens <= config.chunk_tokens
    assert chunks[-1].token_end == num_tokens


def test_chunk_spans_worked_example():
    assert chunk_spans(10, ChunkConfig(chunk_tokens=4, overlap_tokens=1)) == [(0, 4), (3, 7), (6, 10)]
    assert chunk_spans(0, ChunkConfig(chunk_tokens=4)) == []
    assert chunk_spans(4, ChunkConfig(chunk_tokens=4, overlap_tokens=3)) == [(0, 4)]
    assert chunk_spans(5, ChunkConfig(chunk_tokens=4, overlap_tokens=3)) == [(0, 4), (1, 5)]


def test_token_boundaries_worked_example():
    assert token_boundaries("ab  cd", np.array([[0, 2], [4, 6]])).tolist() == [0, 4, 6]
    # byte-level pieces sharing one character's offsets still give non-decreasing boundaries
    assert token_boundaries("é x", np.array([[0, 1], [0, 1], [2, 3]])).tolist() == [0, 0, 2, 3]


def test_chunk_document_worked_example():
    chunks = chunk_document("ab cd ef", [1, 2, 3], [(0, 2), (3, 5), (6, 8)], ChunkConfig(2))
    assert [c.text for c in chunks] == ["ab cd ", "ef"]
    assert [(c.token_start, c.token_end, c.char_start, c.char_end) for c in chunks] == [
        (0, 2, 0, 6),
        (2, 3, 6, 8),
    ]


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=300),
    chunk_tokens=st.integers(1, 12),
    overlap=st.integers(0, 11),
    byte_pieces=st.booleans(),
)
def test_spans_cover_any_unicode_document(text, chunk_tokens, overlap, byte_pieces):
    config = ChunkConfig(chunk_tokens=chunk_tokens, overlap_tokens=min(overlap, chunk_tokens - 1))
    chunked = chunk_text(text, WordTokenizer(byte_pieces=byte_pieces), config)
    assert_tiles_document(text, chunked.chunks, len(chunked.token_ids), config)


def test_empty_short_and_long_line_documents():
    tokenizer = WordTokenizer()
    assert chunk_text("", tokenizer, ChunkConfig()).chunks == []
    assert chunk_document("", [], [], ChunkConfig()) == []
    assert chunk_text("   \n\t", tokenizer, ChunkConfig()).chunks == []  # no tokens, no chunks

    short = "  Hello, world!  "
    [chunk] = chunk_text(short, tokenizer, ChunkConfig()).chunks
    assert (chunk.char_start, chunk.char_end, chunk.text) == (0, len(short), short)

    line = " ".join(f"w{i}" for i in range(20_000))  # one line of 20K tokens
    config = ChunkConfig(chunk_tokens=512, overlap_tokens=64)
    chunked = chunk_text(line, tokenizer, config)
    assert len(chunked.token_ids) == 20_000
    assert_tiles_document(line, chunked.chunks, 20_000, config)
    assert chunked.chunks[1].text.startswith("w448 ")


@pytest.mark.parametrize(
    ("chunk_tokens", "overlap_tokens", "message"),
    [
        (0, 0, "chunk_tokens must be positive"),
        (-5, 0, "chunk_tokens"),
        (4, 4, "overlap_tokens"),
        (4, -1, "overlap"),
    ],
)
def test_bad_config_is_refused(chunk_tokens, overlap_tokens, message):
    with pytest.raises(ValueError, match=message):
        ChunkConfig(chunk_tokens=chunk_tokens, overlap_tokens=overlap_tokens)


@pytest.mark.parametrize(
    ("ids", "offsets", "message"),
    [
        ([1, 2], [(0, 2)], "2 token ids but 1 offsets"),
        ([1], [(0, 2, 3)], r"shape \[T, 2\]"),
        ([1], [(0, 99)], "not a span of the text"),
        ([1], [(3, 2)], "not a span of the text"),
        ([1], [(-1, 2)], "not a span of the text"),
    ],
)
def test_mismatched_ids_and_offsets_are_refused(ids, offsets, message):
    with pytest.raises(ValueError, match=message):
        chunk_document("abcd", ids, offsets, ChunkConfig())
