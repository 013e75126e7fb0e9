"""What answers cost, what a collection will cost, and a budget that is never overshot."""

from __future__ import annotations

from dataclasses import dataclass

from distill4all.config import Price


def cost_usd(price: Price, prompt_tokens: int, completion_tokens: int, *, discount: float = 1.0) -> float:
    return discount * (prompt_tokens * price.input + completion_tokens * price.output) / 1e6


@dataclass
class Budget:
    """Spent money plus the worst case of what is in flight never exceeds `limit_usd`.

    Each request reserves its worst case (estimated prompt + max_tokens) before it is sent and
    settles to its real cost when the answer lands, so a stop at the budget is clean: the last
    answers paid for are stored, and nothing more is asked.
    """

    limit_usd: float | None
    spent_usd: float = 0.0
    reserved_usd: float = 0.0

    def reserve(self, worst_usd: float) -> bool:
        if self.limit_usd is not None and self.spent_usd + self.reserved_usd + worst_usd > self.limit_usd:
            return False
        self.reserved_usd += worst_usd
        return True

    def settle(self, worst_usd: float, actual_usd: float) -> None:
        self.reserved_usd = max(0.0, self.reserved_usd - worst_usd)
        self.spent_usd += actual_usd
