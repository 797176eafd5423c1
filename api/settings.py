"""Settings read from the environment (`RAPID_*`) — the only place the environment is read."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RAPID_", extra="ignore")

    cache_dir: Path = Field(default=Path.home() / ".cache" / "rapid", description="models, texts, converted weights")
    model: str = Field(default="default", description="'default', a preset, a model directory or a .gguf file")
    device: str = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    prefill_chunk: int = Field(default=1024, ge=1)


def load_settings(**overrides) -> Settings:
    return Settings(**{k: v for k, v in overrides.items() if v is not None})
