"""Jittered exponential backoff: how long a reader waits before it tries Redis again."""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["Backoff"]


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delays of ``initial_s · multiplier^attempt``, capped at ``max_s``, with equal jitter.

    Equal jitter (half fixed, half random) rather than full jitter: the fixed half keeps a
    reader from retrying in a hot loop, the random half keeps every shard and gateway from
    reconnecting to a restarted Redis in the same millisecond.
    """

    initial_s: float = 0.05
    max_s: float = 2.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if not (0 < self.initial_s <= self.max_s) or self.multiplier < 1:
            raise ValueError("need 0 < initial_s <= max_s and multiplier >= 1")

    def delay_s(self, attempt: int, rng: random.Random | None = None) -> float:
        """The wait before retry number ``attempt`` (0 for the first), in seconds."""
        # min() before the power would overflow a float after ~1,000 attempts.
        exponent = min(attempt, 64)
        ceiling_s = min(self.max_s, self.initial_s * self.multiplier**exponent)
        return ceiling_s / 2 + (rng or random).uniform(0, ceiling_s / 2)
