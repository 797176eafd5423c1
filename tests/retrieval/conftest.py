import pytest

from retrieval.embedding import Embedder


@pytest.fixture(scope="session")
def embedder() -> Embedder:
    """The bundled all-MiniLM-L6-v2, loaded once for the whole session."""
    embedder = Embedder()
    assert embedder.dim == 384
    return embedder
