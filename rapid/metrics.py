"""Speculation metrics, named as vLLM names them so users can compare."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SpecStats:
    num_drafts: int = 0  # verification steps that had at least one drafted node
    num_draft_tokens: int = 0  # drafted nodes sent to the target
    num_accepted_tokens: int = 0  # drafted tokens the target accepted (bonus tokens not counted)
    accepted_per_position: list[int] = field(default_factory=list)  # [d]: steps accepting >= d+1 tokens
    num_emitted_tokens: int = 0
    prefill_seconds: float = 0.0
    retrieval_seconds: float = 0.0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    commit_seconds: float = 0.0
    decode_seconds: float = 0.0  # wall time from the first token to the last

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """1 + accepted / drafts: tokens per target forward, counting the bonus token."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 1.0

    @property
    def tokens_per_second(self) -> float:
        return self.num_emitted_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def record_step(self, drafted: int, accepted: int) -> None:
        if drafted:
            self.num_drafts += 1
            self.num_draft_tokens += drafted
            self.num_accepted_tokens += accepted
        while len(self.accepted_per_position) < accepted:
            self.accepted_per_position.append(0)
        for position in range(accepted):
            self.accepted_per_position[position] += 1

    def merge(self, other: SpecStats) -> None:
        for name in ("num_drafts", "num_draft_tokens", "num_accepted_tokens", "num_emitted_tokens",
                     "prefill_seconds", "retrieval_seconds", "draft_seconds", "verify_seconds",
                     "commit_seconds", "decode_seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for position, count in enumerate(other.accepted_per_position):
            if position == len(self.accepted_per_position):
                self.accepted_per_position.append(0)
            self.accepted_per_position[position] += count

    def to_dict(self) -> dict:
        return {
            "num_drafts": self.num_drafts, "num_draft_tokens": self.num_draft_tokens,
            "num_accepted_tokens": self.num_accepted_tokens, "acceptance_rate": round(self.acceptance_rate, 4),
            "mean_acceptance_length": round(self.mean_acceptance_length, 4),
            "accepted_per_position": list(self.accepted_per_position),
            "num_emitted_tokens": self.num_emitted_tokens, "tokens_per_second": round(self.tokens_per_second, 3),
            "seconds": {k: round(getattr(self, f"{k}_seconds"), 4)
                        for k in ("prefill", "retrieval", "draft", "verify", "commit", "decode")},
        }
