"""How many draft nodes the next speculative step sends to the target.

Policies:
  fixed       always the configured tree budget;
  acceptance  4 x (1 + the recent mean accepted length), clamped to [min, max];
  cost        the budget b that maximises the expected tokens per second,
                  (1 + sum_{k=1..b} p^k) / (a + c b),
              from two running estimates: p, the chance the target accepts the next drafted token
              given it accepted the ones before (each step adds its accepted tokens as successes and,
              unless its whole deepest path was accepted, one failure; a Beta(1, 1) prior), and the
              line a + c n fitted to the measured seconds of past steps with n drafted nodes
              (least squares, older steps decaying). Until the steps seen differ in size, the slope
              is unknown and the acceptance policy decides.

A step's cost grows with its node count: on this CPU in fp32 at 16K context each node added about a
quarter of a decode step (`python -m eval.bench_tree`), so a budget that suits a cheap GPU verify
drowns a CPU one. Example: p = 0.5, a = 1, c = 0.25 -> b = 1 gives 1.5 / 1.25 = 1.2 tokens per unit of
time, b = 2 gives 1.17, b = 4 gives 0.97: the budget is 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

BudgetPolicy = Literal["fixed", "acceptance", "cost"]


@dataclass
class _Line:
    """Exponentially weighted least squares of y = a + c x."""

    decay: float
    w: float = 0.0
    x: float = 0.0
    xx: float = 0.0
    y: float = 0.0
    xy: float = 0.0

    def add(self, x: float, y: float) -> None:
        d = self.decay
        self.w, self.x, self.xx = d * self.w + 1, d * self.x + x, d * self.xx + x * x
        self.y, self.xy = d * self.y + y, d * self.xy + x * y

    def fit(self) -> tuple[float, float] | None:
        """(a, c) with c >= 0, or None while the x seen are (nearly) all equal."""
        spread = self.w * self.xx - self.x * self.x
        if self.w < 2 or spread <= 1e-6 * self.w * self.w:
            return None
        slope = max(0.0, (self.w * self.xy - self.x * self.y) / spread)
        return (self.y - slope * self.x) / self.w, slope


class TreeBudget:
    @classmethod
    def for_request(cls, policy: BudgetPolicy, min_budget: int, max_budget: int, seeded_sampling: bool) -> TreeBudget:
        """A seeded sampling request sizes its trees from acceptance alone: trees sized from timings would
        make the same seed give different samples on a busier machine."""
        if policy == "cost" and seeded_sampling:
            policy = "acceptance"
        return cls(policy, min_budget, max_budget)

    def __init__(self, policy: BudgetPolicy, min_budget: int, max_budget: int, decay: float = 0.9):
        if not 1 <= min_budget <= max_budget:
            raise ValueError(f"need 1 <= min_budget <= max_budget, got {min_budget}, {max_budget}")
        self.policy = policy
        self.min_budget, self.max_budget = min_budget, max_budget
        self.decay = decay
        self.cost = _Line(decay)
        self.successes = self.failures = 0.0
        self.accepted_ema = 1.0

    def next(self) -> int:
        if self.policy == "fixed":
            return self.max_budget
        fit = self.cost.fit() if self.policy == "cost" else None
        if fit is None:
            return self._clamp(round(4 * (self.accepted_ema + 1)))
        base, per_node = fit
        p = (self.successes + 1) / (self.successes + self.failures + 2)
        best, best_rate, expected = self.min_budget, -1.0, 1.0
        for budget in range(1, self.max_budget + 1):
            expected += p**budget  # 1 + p + ... + p^budget
            rate = expected / max(base + per_node * budget, 1e-9)
            if budget >= self.min_budget and rate > best_rate:
                best, best_rate = budget, rate
        return best

    def observe(self, drafted: int, depth: int, accepted: int, seconds: float) -> None:
        """One step: `drafted` nodes in a tree `depth` deep, `accepted` of them taken, `seconds` of wall time."""
        self.accepted_ema = 0.7 * self.accepted_ema + 0.3 * accepted
        self.cost.add(drafted, seconds)
        if drafted:
            self.successes = self.decay * self.successes + accepted
            self.failures = self.decay * self.failures + (1.0 if accepted < depth else 0.0)

    def _clamp(self, budget: int) -> int:
        return max(self.min_budget, min(self.max_budget, budget))
