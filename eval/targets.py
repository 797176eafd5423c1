"""The target model at the RoPE stretch each document needs, one loaded at a time.

Contexts that fit the model's native window run on the model as it is; longer ones (rope "auto") on
a YaRN-stretched copy with the smallest power-of-two factor that holds them, so short contexts are
never measured on a stretched model. With rope "none" nothing is stretched and the runner cuts long
documents in the middle instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from rapid.models import LoadedModel, ModelSpec, RopeScaling, load_model

RopePolicy = Literal["auto", "none"]


class Targets:
    def __init__(self, spec: ModelSpec, cache_dir: Path | None = None, rope: RopePolicy = "auto"):
        if spec.rope_scaling is not None:
            raise ValueError("give the target without rope scaling; the evaluation stretches it per context")
        self.spec = spec
        self.cache_dir = cache_dir
        self.rope = rope
        self._factor = 1.0
        self._model = load_model(spec, cache_dir)
        self.native_context = self._model.max_context

    @property
    def tokenizer(self):
        return self._model.tokenizer

    def factor_for(self, needed_tokens: int) -> float:
        """1 when `needed_tokens` fit natively (or rope is "none"), else the smallest power of two that holds them."""
        factor = 1
        while self.rope == "auto" and self.native_context * factor < needed_tokens:
            factor *= 2
        return float(factor)

    def get(self, factor: float) -> LoadedModel:
        if factor != self._factor:
            self._model = None  # free the previous copy before loading the next
            scaling = RopeScaling("yarn", factor) if factor > 1 else None
            self._model = load_model(ModelSpec(self.spec.source, self.spec.device, self.spec.dtype, scaling,
                                               self.spec.seed), self.cache_dir)
            self._factor = factor
        return self._model
