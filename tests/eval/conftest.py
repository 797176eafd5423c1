import pytest

from rapid.models.presets import byte_tokenizer
from retrieval.embedding import Embedder
from retrieval.texts import synthetic_filler


@pytest.fixture(scope="session")
def byte_tok():
    """The tiny preset's byte-level tokenizer: one token per byte, with offsets."""
    return byte_tokenizer()


@pytest.fixture(scope="session")
def corpus() -> str:
    """Offline prose for haystacks (line breaks every few sentences, like a play's text)."""
    return synthetic_filler(60_000, seed=11).replace("er. ", "er.\n")


@pytest.fixture(scope="session")
def embedder() -> Embedder:
    return Embedder()


@pytest.fixture(scope="session")
def default_tokenizer():
    """The default model's BPE tokenizer (merges across a cut, unlike the byte tokenizer)."""
    from rapid.models.default import load_default_tokenizer

    return load_default_tokenizer()
