"""The autoregressive decode loop (our own, not `model.generate`): the baseline the engine must match."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from rapid.cache import KVCache
from rapid.runner import ModelRunner
from rapid.sampling import SamplingConfig, next_token


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    stop_reason: str = ""  # "stop" (a stop token) or "length" (max_new_tokens)

    @property
    def decode_tokens_per_second(self) -> float:
        return self.new_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0


def generate(runner: ModelRunner, prompt_ids: list[int], config: GenerationConfig,
             stats: GenerationStats | None = None, show_progress: bool = False,
             cache: KVCache | None = None) -> Iterator[int]:
    """Yield new token ids one by one. A stop token is yielded, then generation ends.

    The first token comes from the prefill logits; each later one costs one decode step. `cache` may
    already hold a prefix (a document); the prompt is appended to it.
    """
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = len(prompt_ids)
    if cache is None:
        cache = runner.new_cache(len(prompt_ids) + config.max_new_tokens)
    gen = config.sampling.generator(runner.device) if not config.sampling.greedy else None
    start = time.perf_counter()
    logits = runner.prefill(cache, prompt_ids, show_progress=show_progress)
    stats.prefill_seconds = time.perf_counter() - start
    start = time.perf_counter()
    stop = set(config.stop_token_ids)
    for step in range(config.max_new_tokens):
        token = next_token(logits, config.sampling, gen)
        stats.new_tokens += 1
        stats.decode_seconds = time.perf_counter() - start
        yield token
        if token in stop:
            stats.stop_reason = "stop"
            return
        if step + 1 < config.max_new_tokens:
            logits = runner.decode(cache, token)
    stats.stop_reason = "length"
    stats.decode_seconds = time.perf_counter() - start


@torch.inference_mode()
def generate_all(runner: ModelRunner, prompt_ids: list[int], config: GenerationConfig) -> list[int]:
    return list(generate(runner, prompt_ids, config))
