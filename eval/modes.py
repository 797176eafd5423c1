"""The ways of answering an example that one evaluation run compares.

Each mode maps to a `QAConfig` (who drafts, how the target reads the document) and `AskOptions`
(sampling, RAPID's eta), or to the RAG-only baseline. A greedy speculative mode names the greedy
mode it must equal token for token (DESIGN invariant 1, with the same attention on both sides).

    dense           the long-context target, dense attention, plain autoregressive decoding
    squeezed        the same target reading the document through squeezed attention
    rag-only        the target answering from the short RAG context alone (no long context)
    rapid           RAPID: the target drafting from the RAG context, fused with the retrieval tree,
                    verified over the full context; greedy, so it must equal `dense`
    rapid-eta       RAPID with sampling (temperature 0.5, fixed seed) and eta = 1: the output moves
                    toward the RAG drafter on purpose, so it is not the target's own distribution
    rapid-squeezed  RAPID verified through squeezed attention; must equal `squeezed`
    retrieval       drafts copied from the document's token datastore only (REST / prompt lookup)
    layer-skip      the target's first 8 layers drafting (self-speculation by early exit; fewer layers
                    on models that shallow)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from api.qa import AskOptions, DrafterName, QAConfig
from rapid.sampling import SamplingConfig

Attention = Literal["dense", "squeezed"]


@dataclass(frozen=True)
class Mode:
    name: str
    description: str
    drafter: DrafterName = "none"
    attention: Attention = "dense"
    rag_only: bool = False
    temperature: float = 0.0
    eta: float = 0.0
    seed: int = 0
    reference: str | None = None  # the greedy mode whose output this one must equal token for token

    def __post_init__(self) -> None:
        if self.eta > 0 and self.temperature == 0:
            raise ValueError(f"mode {self.name}: eta > 0 needs sampling (temperature > 0)")
        if self.reference is not None and self.temperature > 0:
            raise ValueError(f"mode {self.name}: only greedy modes can be held to a reference's tokens")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def qa_config(self, base: QAConfig) -> QAConfig:
        return replace(base, drafter=self.drafter, attention=self.attention)

    def ask_options(self, max_new_tokens: int) -> AskOptions:
        sampling = SamplingConfig(temperature=self.temperature, seed=None if self.greedy else self.seed)
        return AskOptions(max_new_tokens=max_new_tokens, sampling=sampling, eta=self.eta)


MODES: dict[str, Mode] = {mode.name: mode for mode in (
    Mode("dense", "target, full context, dense attention, autoregressive"),
    Mode("squeezed", "target, full context, squeezed attention, autoregressive", attention="squeezed"),
    Mode("rag-only", "target on the RAG context alone", rag_only=True),
    Mode("rapid", "RAPID eta=0 greedy: RAG drafter + retrieval tree, dense verify", drafter="self",
         reference="dense"),
    Mode("rapid-eta", "RAPID eta=1, T=0.5 seed 0: moves toward the RAG drafter on purpose", drafter="self",
         temperature=0.5, eta=1.0),
    Mode("rapid-squeezed", "RAPID eta=0 greedy, squeezed verify", drafter="self", attention="squeezed",
         reference="squeezed"),
    Mode("retrieval", "retrieval-tree drafts only (prompt lookup), greedy", drafter="retrieval", reference="dense"),
    Mode("layer-skip", "the target's first 8 layers drafting, greedy", drafter="layer-skip", reference="dense"),
)}
QUALITY_MODES = ("dense", "squeezed", "rag-only", "rapid", "rapid-eta")
SPEED_MODES = ("dense", "retrieval", "rapid", "layer-skip")
BASELINE = "dense"  # what speedups are measured against


def sort_modes(names) -> list[str]:
    """Distinct mode names in the order of MODES (names not in it last, as first seen)."""
    known = list(MODES)
    distinct = list(dict.fromkeys(names))
    return sorted(distinct, key=lambda m: known.index(m) if m in known else len(known))


def resolve_modes(names: list[str] | tuple[str, ...]) -> list[Mode]:
    """The named modes plus any reference they need, references first, without duplicates."""
    unknown = [n for n in names if n not in MODES]
    if unknown:
        raise ValueError(f"unknown modes {unknown}; choose from {sorted(MODES)}")
    ordered: list[str] = []
    for name in names:
        reference = MODES[name].reference
        for needed in (reference, name):
            if needed is not None and needed not in ordered:
                ordered.append(needed)
    return [MODES[n] for n in ordered]
