"""`ChunkIndex`: faiss inner-product search over unit vectors (cosine similarity), saved and loaded.

Vector i is chunk i. Exact search (IndexFlatIP) up to `IndexConfig.exact_max_vectors`, HNSW past
it. Measured here (2 shared CPU cores, D = 384, one query): exact search takes ~0.1 ms at 2K
vectors and ~2-16 ms at 20K, ~20-60 ms at 100K; HNSW (M = 32) stays under ~1 ms but costs ~6 s
(20K) to ~70 s (100K) to build and loses recall on hard data. A document of 25M tokens has 50K
chunks of 512 tokens, and retrieval runs once per question, so exact search is the default up to
50K vectors. HNSW rather than IVF: no training step and no nprobe to tune per corpus size.
"""

from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from retrieval.manifest import FormatError, manifest_field, read_manifest, write_manifest

FORMAT_NAME = "rapid.chunk_index"
FORMAT_VERSION = 1
INDEX_FILE = "index.faiss"


class IndexFormatError(FormatError):
    """A saved chunk index that is corrupt, truncated, or does not match what the caller expects."""


@dataclass(frozen=True)
class IndexConfig:
    exact_max_vectors: int = 50_000  # more vectors than this: HNSW
    hnsw_m: int = 32
    hnsw_ef_construction: int = 80
    hnsw_ef_search: int = 128

    def __post_init__(self) -> None:
        for name in ("exact_max_vectors", "hnsw_m", "hnsw_ef_construction", "hnsw_ef_search"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


@dataclass(frozen=True)
class SearchHits:
    """Best-first hits of each query; rows are padded with id -1 and score -inf when k > count."""

    ids: np.ndarray  # [Q, k] int64
    scores: np.ndarray  # [Q, k] float32, cosine similarity


class ChunkIndex:
    def __init__(self, index: faiss.Index, embedder_name: str, kind: str, config: IndexConfig) -> None:
        self.index = index
        self.embedder_name = embedder_name
        self.kind = kind
        self.config = config

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def count(self) -> int:
        return int(self.index.ntotal)

    @classmethod
    def build(cls, vectors: np.ndarray, embedder_name: str, config: IndexConfig | None = None) -> "ChunkIndex":
        """Index unit vectors [N, D] (N may be 0); exact or HNSW by `config.exact_max_vectors`."""
        config = config or IndexConfig()
        x = check_unit_vectors(vectors, "vectors")
        n, d = x.shape
        if n > config.exact_max_vectors:
            index = faiss.IndexHNSWFlat(d, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = config.hnsw_ef_construction
            kind = "hnsw"
        else:
            index = faiss.IndexFlatIP(d)
            kind = "flat"
        index.add(x)
        return cls(index, embedder_name, kind, config)

    def search(self, queries: np.ndarray, k: int) -> SearchHits:
        """Top-k chunks for each query; queries [Q, D] or [D] unit vectors."""
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        q = check_unit_vectors(np.atleast_2d(queries), "queries")
        if q.shape[1] != self.dim:
            raise ValueError(f"queries have dim {q.shape[1]}, the index has dim {self.dim}")
        if self.kind == "hnsw":
            self.index.hnsw.efSearch = max(self.config.hnsw_ef_search, k)
        ids = np.full((len(q), k), -1, dtype=np.int64)
        scores = np.full((len(q), k), -np.inf, dtype=np.float32)
        found = min(k, self.count)
        if found > 0:
            top_scores, top_ids = self.index.search(q, found)
            ids[:, :found] = top_ids
            scores[:, :found] = np.where(top_ids >= 0, top_scores, -np.inf)
        return SearchHits(ids=ids, scores=scores)

    def save(self, directory: Path | str) -> None:
        """Write `index.faiss` and then `manifest.json` into `directory` (created if missing)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(directory / INDEX_FILE))
        fields = {"dim": self.dim, "count": self.count, "embedder": self.embedder_name, "kind": self.kind}
        write_manifest(directory, FORMAT_NAME, FORMAT_VERSION, fields, [INDEX_FILE])

    @classmethod
    def load(
        cls,
        directory: Path | str,
        embedder_name: str | None = None,
        dim: int | None = None,
        count: int | None = None,
        config: IndexConfig | None = None,
    ) -> "ChunkIndex":
        """Load a saved index, refusing it (IndexFormatError) if damaged or not what the caller expects.

        `embedder_name`, `dim` and `count` (e.g. the number of chunks of the document) are checked
        when given.
        """
        directory = Path(directory)
        manifest = read_manifest(directory, FORMAT_NAME, FORMAT_VERSION, IndexFormatError)
        saved_dim = manifest_field(manifest, "dim", int, directory, IndexFormatError)
        saved_count = manifest_field(manifest, "count", int, directory, IndexFormatError)
        saved_embedder = manifest_field(manifest, "embedder", str, directory, IndexFormatError)
        kind = manifest_field(manifest, "kind", str, directory, IndexFormatError)
        path = directory / INDEX_FILE
        if INDEX_FILE not in manifest["files"]:
            raise IndexFormatError(directory / "manifest.json", f"does not list {INDEX_FILE}")
        if embedder_name is not None and saved_embedder != embedder_name:
            raise IndexFormatError(path, f"built with embedder {saved_embedder!r}, expected {embedder_name!r}")
        if dim is not None and saved_dim != dim:
            raise IndexFormatError(path, f"has dim {saved_dim}, expected {dim}")
        if count is not None and saved_count != count:
            raise IndexFormatError(path, f"has {saved_count} vectors, expected {count}")
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as e:
            raise IndexFormatError(path, f"faiss cannot read it ({str(e).splitlines()[0]})") from e
        expected_type = {"flat": faiss.IndexFlatIP, "hnsw": faiss.IndexHNSWFlat}.get(kind)
        if expected_type is None or not isinstance(index, expected_type):
            raise IndexFormatError(path, f"holds a {type(index).__name__}, manifest says kind {kind!r}")
        if index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise IndexFormatError(path, "is not an inner-product index")
        if index.d != saved_dim or index.ntotal != saved_count:
            found = f"{index.ntotal} vectors of dim {index.d}"
            raise IndexFormatError(path, f"holds {found}, the manifest says {saved_count} of dim {saved_dim}")
        return cls(index, saved_embedder, kind, config or IndexConfig())


def check_unit_vectors(vectors: np.ndarray, what: str) -> np.ndarray:
    """`vectors` as a C-contiguous float32 [N, D] array of unit rows, or a ValueError saying why not."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] == 0:
        raise ValueError(f"{what} must have shape [N, D] with D > 0, got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{what} contain NaN or infinity")
    norms = np.linalg.norm(x, axis=1)
    if len(x) and np.abs(norms - 1.0).max() > 1e-3:
        raise ValueError(f"{what} must be L2-normalized (norms range {norms.min():.4f}..{norms.max():.4f})")
    return x
