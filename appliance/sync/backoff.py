"""Exponential backoff with full jitter ("Exponential Backoff And Jitter", AWS blog)."""

from __future__ import annotations

import random


class Backoff:
    """Delay after the n-th consecutive failure: uniform(0, min(cap, base * 2**n)).

    Full jitter spreads a fleet of devices that lost the aggregator at the same moment, so they
    do not all come back at once. ``reset()`` after a success.
    """

    def __init__(self, base_s: float, cap_s: float, rng: random.Random | None = None) -> None:
        if base_s <= 0 or cap_s < base_s:
            raise ValueError(f"need 0 < base_s <= cap_s, got {base_s}, {cap_s}")
        self.base_s = base_s
        self.cap_s = cap_s
        self.failures = 0
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography

    def ceiling(self) -> float:
        """The upper bound of the next delay."""
        return min(self.cap_s, self.base_s * (2 ** min(self.failures, 32)))

    def next_delay(self, at_least: float = 0.0) -> float:
        """Record one more failure and return how long to wait (at least ``at_least``)."""
        delay = self._rng.uniform(0, self.ceiling())
        self.failures += 1
        return max(delay, at_least)

    def reset(self) -> None:
        self.failures = 0
