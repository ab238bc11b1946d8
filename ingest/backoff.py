"""Capped exponential backoff with full jitter (AWS architecture blog, "Exponential Backoff
And Jitter"): spreads reconnect storms of many instances and never waits longer than ``maximum``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(slots=True)
class Backoff:
    initial: float = 0.2
    maximum: float = 30.0
    attempts: int = 0
    _random: random.Random = field(default_factory=random.Random, repr=False)

    def next_delay(self) -> float:
        """The delay before the next attempt; grows with each call until ``reset``."""
        ceiling = min(self.maximum, self.initial * (2 ** min(self.attempts, 32)))
        self.attempts += 1
        # Full jitter, but never below a tenth of the ceiling so a retry loop cannot spin.
        return self._random.uniform(ceiling / 10, ceiling)

    def reset(self) -> None:
        self.attempts = 0
