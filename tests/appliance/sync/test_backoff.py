"""Exponential backoff with full jitter."""

from __future__ import annotations

import random

import pytest

from appliance.sync.backoff import Backoff


def test_delays_grow_exponentially_capped_and_jittered() -> None:
    backoff = Backoff(0.5, 8.0, rng=random.Random(1))
    ceilings = []
    delays = []
    for _ in range(8):
        ceilings.append(backoff.ceiling())
        delays.append(backoff.next_delay())
    assert ceilings == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0, 8.0]
    assert all(0 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert len({round(d, 6) for d in delays}) == len(delays)  # jittered, not a fixed ladder
    backoff.reset()
    assert backoff.ceiling() == 0.5


def test_retry_after_is_a_floor() -> None:
    backoff = Backoff(0.1, 1.0, rng=random.Random(2))
    assert backoff.next_delay(at_least=30.0) == 30.0


def test_fleet_spreads_out() -> None:
    """100 devices failing together do not retry together."""
    delays = [Backoff(1, 60, rng=random.Random(i)).next_delay() for i in range(100)]
    assert max(delays) - min(delays) > 0.8


def test_bad_bounds() -> None:
    with pytest.raises(ValueError, match="base_s"):
        Backoff(0, 1)
