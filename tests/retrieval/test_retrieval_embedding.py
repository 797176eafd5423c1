import numpy as np
import pytest
from word_tokenizer import WordTokenizer

from retrieval.embedding import Embedder, EmbedderConfig
from retrieval.texts import synthetic_filler


class FakeModel:
    """Stands in for a SentenceTransformer: one-hot vectors by the first word, records calls."""

    max_seq_length = 6  # 4 word pieces per window

    def __init__(self):
        self.tokenizer = lambda text, verbose, **kwargs: WordTokenizer()(text, **kwargs)
        self.calls = []

    def get_embedding_dimension(self):
        return 4

    def encode(self, texts, batch_size, show_progress_bar, normalize_embeddings, convert_to_numpy):
        self.calls.append((list(texts), show_progress_bar))
        out = np.zeros((len(texts), 4), dtype=np.float32)
        for row, text in enumerate(texts):
            out[row, {"a": 0, "b": 1, "c": 2}.get(text.split()[0] if text.split() else "", 3)] = 1.0
        return out


def fake_embedder(**config) -> tuple[Embedder, FakeModel]:
    embedder = Embedder(EmbedderConfig(**config))
    embedder._model = FakeModel()
    return embedder, embedder._model


def test_long_texts_are_windowed_and_averaged():
    embedder, model = fake_embedder()
    vectors = embedder.embed(["a x x x b x x x", "c"])
    assert model.calls[0][0] == ["a x x x ", "b x x x", "c"]
    np.testing.assert_allclose(vectors[0], [2**-0.5, 2**-0.5, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(vectors[1], [0, 0, 1, 0])
    assert vectors.dtype == np.float32 and vectors.shape == (2, 4)


def test_progress_bar_only_for_many_batches():
    embedder, model = fake_embedder(batch_size=2, progress_min_batches=2)
    embedder.embed(["a"] * 4)
    embedder.embed(["a"] * 5)
    assert [shown for _, shown in model.calls] == [False, True]


def test_bad_inputs():
    embedder, _ = fake_embedder()
    assert embedder.embed([]).shape == (0, 4)
    with pytest.raises(TypeError, match="sequence of texts"):
        embedder.embed("just one string")
    with pytest.raises(ValueError, match="batch_size"):
        EmbedderConfig(batch_size=0)
    with pytest.raises(FileNotFoundError, match="not a sentence-transformers model"):
        _ = Embedder(EmbedderConfig(model_dir="/nonexistent/model")).dim


def test_names():
    assert Embedder().name == "all-MiniLM-L6-v2"
    assert Embedder(EmbedderConfig(model_dir="/models/bge-small-en")).name == "bge-small-en"
    assert Embedder(EmbedderConfig(model_dir="/models/x", name="mine")).name == "mine"


def test_minilm_vectors(embedder):
    vectors = embedder.embed(["The cat sat on the mat.", "A feline rested on a rug.", "Quarterly tax filing."])
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]
    np.testing.assert_allclose(embedder.embed_query("The cat sat on the mat."), vectors[0], atol=1e-5)


def test_minilm_sees_the_end_of_a_long_chunk(embedder):
    """A needle past the model's 256-piece window still moves the chunk's vector toward it."""
    filler = synthetic_filler(2000, seed=1)  # ~400 word pieces
    needle = "The submarine captain buried emerald treasure beneath the volcano."
    vectors = embedder.embed([filler + " " + needle, filler, needle])
    assert vectors[0] @ vectors[2] > vectors[1] @ vectors[2] + 0.1
