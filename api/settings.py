"""Settings read from the environment (`RAPID_*`) — the only place the environment is read."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# = kvcache.calibration.DEFAULT_BUDGETS = rapid.squeeze.SqueezeConfig.budgets: thresholds stored at ingest
CALIBRATED_BUDGETS = (0.05, 0.1, 0.125, 0.2, 0.3)
SQUEEZE_BUDGET = 0.125  # = rapid.squeeze.BUDGET (this module stays free of torch)


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

    # speculative decoding (every request runs rapid.engine; at temperature 0 the answer is the
    # target's own greedy answer whatever is chosen here, only the speed changes)
    drafter: Literal["none", "retrieval", "self", "layer-skip"] = Field(
        default="self", description="what drafts tokens: 'self' = the target on the RAG context (RAPID), "
        "'layer-skip' = the target's first layers, 'retrieval' = continuations copied from the document, "
        "'none' = plain decoding")
    fuse_retrieval: bool = Field(default=True, description="fuse the retrieval tree into a model drafter's tree")
    tree_budget: int = Field(default=16, ge=1, description="drafted tokens verified per target forward, at most")
    budget_policy: Literal["fixed", "acceptance", "cost"] = Field(
        default="cost", description="how each step's tree is sized: 'cost' = the size with the most expected "
        "tokens per second from measured step times and acceptance, 'acceptance' = from acceptance alone, "
        "'fixed' = always tree_budget")
    layer_skip_layers: int = Field(default=8, ge=1, description="decoder layers of the 'layer-skip' drafter")
    eta: float = Field(default=0.0, ge=0.0, description="RAPID retrieval-augmented target when sampling: > 0 "
                       "moves sampled answers toward the RAG drafter ON PURPOSE (the output distribution is "
                       "no longer the target's); 0 = exact speculative sampling; no effect at temperature 0")

    # the document KV cache (prefilled and clustered at ingest, memory-mapped per question)
    document_cache: bool = Field(default=True, description="prefill and cluster the target's KV of each "
                                 "document at ingest and reuse it for every question")
    document_cache_room: int = Field(default=512, ge=1, description="tokens a cached document must leave in "
                                     "the model's window for a question and its answer")
    attention: Literal["dense", "squeezed"] = Field(
        default="dense", description="how the target reads a cached document: all of it, or the KV "
        "clusters that matter (Squeezed Attention; approximate)")
    squeeze_budget: float = Field(default=SQUEEZE_BUDGET, gt=0.0, le=1.0,
                                  description="fraction of the document's keys a query reads ('squeezed')")
    squeeze_rule: Literal["threshold", "top"] = Field(
        default="threshold", description="'threshold' = calibrated thresholds (budget 0.05, 0.1, 0.125, 0.2 or 0.3), "
        "'top' = the best clusters up to the budget")
    squeeze_dense_layers: int = Field(  # default = rapid.squeeze.DENSE_LAYERS
        default=2, ge=0, description="the first layers read every document key ('squeezed'): their attention "
        "is too broad to squeeze")
    squeeze_rest: Literal["ignore", "estimate", "calibrated"] | None = Field(  # None = rapid.squeeze.default_rest
        default=None, description="'squeezed': the clusters a query does not read are ignored, counted by their "
        "centroid and mean value ('estimate'), or estimated in the layers where calibration found it closer to "
        "dense attention ('calibrated', rule 'threshold'); unset: 'calibrated' with rule 'threshold', else 'ignore'")
    squeeze_recent_tokens: int = Field(  # default = rapid.squeeze.RECENT_TOKENS
        default=1024, ge=0, description="'squeezed': the document's last positions form one cluster that every "
        "query reads (decode queries attend to them by position)")
    squeeze_keep_fraction: float | None = Field(  # default = rapid.squeeze.KEEP_FRACTION
        default=None, gt=0, le=1, description="'squeezed': treat the budget's clusters as candidates and attend to "
        "this fraction of the document keys with the highest q.k among them (unset: read whole clusters)")

    @model_validator(mode="after")
    def _calibrated_budget(self):
        if self.squeeze_rule == "threshold" and self.squeeze_budget not in CALIBRATED_BUDGETS:
            raise ValueError(f"squeeze_budget must be one of the calibrated {CALIBRATED_BUDGETS} with "
                             f"squeeze_rule 'threshold', got {self.squeeze_budget}")
        if self.squeeze_rest == "calibrated" and self.squeeze_rule != "threshold":
            raise ValueError("squeeze_rest 'calibrated' needs squeeze_rule 'threshold'")
        if self.squeeze_keep_fraction is not None and self.squeeze_keep_fraction > self.squeeze_budget:
            raise ValueError(f"squeeze_keep_fraction {self.squeeze_keep_fraction} exceeds squeeze_budget "
                             f"{self.squeeze_budget}: the kept keys are picked among the budget's clusters")
        return self

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value):
        if isinstance(value, str):
            return tuple(key.strip() for key in value.split(",") if key.strip())
        return value


def load_settings(**overrides) -> Settings:
    return Settings(**{k: v for k, v in overrides.items() if v is not None})
