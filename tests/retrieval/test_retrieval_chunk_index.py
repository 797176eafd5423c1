import json

import numpy as np
import pytest
from word_tokenizer import WordTokenizer

from retrieval.chunking import ChunkConfig, chunk_text
from retrieval.index import ChunkIndex, IndexConfig, IndexFormatError
from retrieval.manifest import file_sha256
from retrieval.texts import make_haystack


def unit_vectors(n: int, d: int = 16, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("exact_max_vectors", [1000, 10])
def test_vectors_find_themselves_and_round_trip(tmp_path, exact_max_vectors):
    vectors = unit_vectors(200)
    index = ChunkIndex.build(vectors, "toy", IndexConfig(exact_max_vectors=exact_max_vectors))
    assert index.kind == ("flat" if exact_max_vectors == 1000 else "hnsw")
    assert (index.dim, index.count) == (16, 200)
    hits = index.search(vectors, 3)
    assert hits.ids.shape == (200, 3)
    assert (hits.ids[:, 0] == np.arange(200)).all()
    assert np.all(np.diff(hits.scores, axis=1) <= 1e-6)  # best first

    index.save(tmp_path / "idx")
    loaded = ChunkIndex.load(tmp_path / "idx", embedder_name="toy", dim=16, count=200)
    assert (loaded.kind, loaded.embedder_name) == (index.kind, "toy")
    again = loaded.search(vectors, 3)
    assert np.array_equal(again.ids, hits.ids)
    np.testing.assert_allclose(again.scores, hits.scores, rtol=1e-6)
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert manifest["dim"] == 16 and manifest["count"] == 200 and manifest["format_version"] == 1
    assert manifest["files"]["index.faiss"] == file_sha256(tmp_path / "idx" / "index.faiss")


def test_k_larger_than_count_and_empty_index():
    index = ChunkIndex.build(unit_vectors(3), "toy")
    hits = index.search(unit_vectors(1, seed=1)[0], 5)
    assert hits.ids.shape == (1, 5)
    assert sorted(hits.ids[0, :3].tolist()) == [0, 1, 2] and hits.ids[0, 3:].tolist() == [-1, -1]
    assert np.isneginf(hits.scores[0, 3:]).all()
    empty = ChunkIndex.build(np.zeros((0, 16), dtype=np.float32), "toy")
    assert empty.count == 0 and empty.search(unit_vectors(1)[0], 2).ids.tolist() == [[-1, -1]]


def test_bad_vectors_are_refused():
    with pytest.raises(ValueError, match="L2-normalized"):
        ChunkIndex.build(unit_vectors(4) * 2, "toy")
    with pytest.raises(ValueError, match=r"shape \[N, D\]"):
        ChunkIndex.build(np.ones(16, dtype=np.float32), "toy")
    with pytest.raises(ValueError, match="NaN"):
        ChunkIndex.build(np.full((2, 4), np.nan, dtype=np.float32), "toy")
    index = ChunkIndex.build(unit_vectors(4), "toy")
    with pytest.raises(ValueError, match="dim 8"):
        index.search(unit_vectors(1, d=8), 1)
    with pytest.raises(ValueError, match="k must be positive"):
        index.search(unit_vectors(1), 0)


@pytest.fixture
def saved(tmp_path):
    directory = tmp_path / "idx"
    ChunkIndex.build(unit_vectors(50), "toy").save(directory)
    return directory


def edit_manifest(directory, **changes):
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("truncate", "sha256"),
        ("flip", "sha256"),
        ("junk_with_checksum", "faiss cannot read"),
        ("no_manifest", "missing manifest"),
        ("bad_json", "not valid JSON"),
        ("future_version", "format_version"),
        ("count_lie", "holds 50 vectors of dim 16"),
        ("kind_lie", "manifest says kind"),
        ("dim_not_int", "field 'dim'"),
    ],
)
def test_damaged_index_is_refused(saved, damage, message):
    path = saved / "index.faiss"
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "flip":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x55
        path.write_bytes(bytes(data))
    elif damage == "junk_with_checksum":
        path.write_bytes(b"not a faiss index at all")
        edit_manifest(saved, files={"index.faiss": file_sha256(path)})
    elif damage == "no_manifest":
        (saved / "manifest.json").unlink()
    elif damage == "bad_json":
        (saved / "manifest.json").write_text("[1, 2")
    elif damage == "future_version":
        edit_manifest(saved, format_version=99)
    elif damage == "count_lie":
        edit_manifest(saved, count=60)
    elif damage == "kind_lie":
        edit_manifest(saved, kind="hnsw")
    elif damage == "dim_not_int":
        edit_manifest(saved, dim="16")
    with pytest.raises(IndexFormatError, match=message) as error:
        ChunkIndex.load(saved)
    assert str(saved) in str(error.value)


@pytest.mark.parametrize(
    ("expected", "message"),
    [
        ({"embedder_name": "other-model"}, "built with embedder 'toy', expected 'other-model'"),
        ({"dim": 384}, "has dim 16, expected 384"),
        ({"count": 49}, "has 50 vectors, expected 49"),
    ],
)
def test_mismatched_index_is_refused(saved, expected, message):
    with pytest.raises(IndexFormatError, match=message):
        ChunkIndex.load(saved, **expected)


def test_a_chunk_retrieves_itself_first(embedder):
    text = make_haystack(6000, "The lighthouse keeper hid the silver key under the blue stone.", 0.6, seed=3).text
    chunks = chunk_text(text, WordTokenizer(), ChunkConfig(chunk_tokens=64)).chunks
    vectors = embedder.embed([c.text for c in chunks])
    index = ChunkIndex.build(vectors, embedder.name)
    hits = index.search(vectors, 1)
    assert hits.ids[:, 0].tolist() == list(range(len(chunks)))
