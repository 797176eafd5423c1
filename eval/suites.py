"""What `rapid eval` runs: parts of (examples, modes, run settings), run in one process into one JSONL.

`small` is sized to finish in under 15 minutes on 2 CPU cores with the default model, model load
included: the needle grid at 1K/2K/4K x three depths and passkeys at 1K/4K under the quality modes,
then the speed suite at 2K/4K with two questions.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

from eval.modes import QUALITY_MODES, SPEED_MODES, Mode, resolve_modes
from eval.result import Result, ResultWriter
from eval.runner import RunConfig, Runner
from eval.targets import Targets
from eval.tasks.example import Example
from eval.tasks.needle import NeedleConfig, needle_examples
from eval.tasks.passkey import PasskeyConfig, passkey_examples
from eval.tasks.speed import QUESTIONS, SpeedConfig, speed_examples
from retrieval.embedding import Embedder
from retrieval.texts import shakespeare_text


@dataclass(frozen=True)
class Part:
    name: str
    examples: list[Example]
    modes: list[Mode]
    config: RunConfig


class Sources:
    """What task generators read: the target's tokenizer and, on first use, the Shakespeare corpus."""

    def __init__(self, tokenizer, texts_dir: Path):
        self.tokenizer = tokenizer
        self.texts_dir = texts_dir

    @cached_property
    def corpus(self) -> str:
        return shakespeare_text(self.texts_dir)


SMALL_NEEDLE = NeedleConfig(lengths=(1024, 2048, 4096), depths=(0.1, 0.5, 0.9))
SMALL_PASSKEY = PasskeyConfig(lengths=(1024, 4096), depths=(0.5,))
SMALL_SPEED = SpeedConfig(lengths=(2048, 4096), questions=QUESTIONS[:2], max_new_tokens=64)
SMALL_SPEED_MODES = ("dense", "retrieval", "rapid")


def small_parts(sources: Sources, config: RunConfig) -> list[Part]:
    quality = resolve_modes(QUALITY_MODES)
    return [
        Part("needle", needle_examples(sources.tokenizer, sources.corpus, SMALL_NEEDLE), quality, config),
        Part("passkey", passkey_examples(sources.tokenizer, SMALL_PASSKEY), quality, config),
        Part("speed", speed_examples(sources.tokenizer, sources.corpus, SMALL_SPEED), resolve_modes(SMALL_SPEED_MODES),
             replace(config, warmup=True)),
    ]


def speed_part(sources: Sources, speed: SpeedConfig, config: RunConfig, modes: tuple[str, ...] = SPEED_MODES) -> Part:
    return Part("speed", speed_examples(sources.tokenizer, sources.corpus, speed), resolve_modes(modes),
                replace(config, warmup=True))


def run_parts(targets: Targets, embedder: Embedder, parts: list[Part], jsonl: Path) -> list[Result]:
    """Run every part into one JSONL file (written as answers come) and return all results."""
    writer = ResultWriter(jsonl)
    results: list[Result] = []
    try:
        for part in parts:
            print(f"[{part.name}] {len(part.examples)} examples x {len(part.modes)} modes "
                  f"({', '.join(m.name for m in part.modes)})", file=sys.stderr, flush=True)
            results += Runner(targets, embedder, part.modes, part.config, writer.write).run(part.examples)
    finally:
        writer.close()
    return results
