"""Settings read from the environment (`RAPID_*`) — the only place the environment is read."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RAPID_", extra="ignore")

    cache_dir: Path = Field(default=Path.home() / ".cache" / "rapid",
                            description="models, texts, converted weights")
    model: str = Field(default="default",
                       description="'default', a preset, a model directory or a .gguf file")
    device: str = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    prefill_chunk: int = Field(default=1024, ge=1)
    threads: int = Field(default=1, ge=1, description="torch CPU threads; on a shared machine more threads "
                         "spin against each other and run many times slower")

    # the service
    data_dir: Path = Field(default=Path.home() / ".local" / "share" / "rapid",
                           description="documents, their indexes and caches, and the SQLite metadata")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    api_keys: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(), description="comma-separated Bearer keys; empty = no authentication")
    served_model_name: str | None = Field(
        default=None, description="the model name clients send; default: the model id")
    max_document_bytes: int = Field(default=16 * 1024 * 1024, ge=1, description="UTF-8 bytes of one document")
    max_tokens_limit: int = Field(default=4096, ge=1, description="largest max_tokens a request may ask for")
    default_max_tokens: int = Field(default=256, ge=1, description="max_tokens of an ask without one")
    queue_size: int = Field(default=64, ge=1, description="generations waiting for the worker; more get 429")
    max_pending_ingests: int = Field(default=16, ge=1, description="ingests waiting or running; more get 429")
    max_ingest_attempts: int = Field(default=3, ge=1,
                                     description="crashed ingests of a document before it is marked failed")
    request_timeout_s: float = Field(default=600.0, gt=0,
                                     description="a generation running longer is cancelled (504)")

    # retrieval, used at ingest and per question
    embedder_dir: str | None = Field(default=None,
                                     description="a sentence-transformers directory; default: bundled MiniLM")
    chunk_tokens: int = Field(default=512, ge=16)
    rag_min_tokens: int = Field(default=4096, ge=1, description="RAG context budget floor (RAPID: 4096)")
    rag_similarity_threshold: float = Field(default=0.1, ge=-1.0, le=1.0)
    loaded_documents: int = Field(default=8, ge=1,
                                  description="documents kept loaded in memory between questions")

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value):
        if isinstance(value, str):
            return tuple(key.strip() for key in value.split(",") if key.strip())
        return value


def load_settings(**overrides) -> Settings:
    return Settings(**{k: v for k, v in overrides.items() if v is not None})
