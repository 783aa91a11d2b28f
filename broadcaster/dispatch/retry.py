"""When to try a failed delivery again: exponential backoff with jitter, honouring Retry-After.

Retries are stored (`next_attempt_at`), not slept on, so they survive a restart; that is
why this is a pure function of the attempt number rather than a retrying decorator.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff of one channel: base * 2^(attempt-1), capped, with equal jitter."""

    base_seconds: float
    max_seconds: float
    max_attempts: int

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait after `attempt` failed; never less than the provider asked."""
        ceiling = min(self.max_seconds, self.base_seconds * 2 ** max(0, attempt - 1))
        # Equal jitter: half fixed, half random, so many recipients failing together
        # (a provider outage) do not all come back at the same instant.
        backoff = ceiling / 2 + random.uniform(0, ceiling / 2)
        return float(max(backoff, retry_after or 0.0))

    def next_attempt(
        self, *, attempt: int, now: datetime, deadline: datetime, retry_after: float | None
    ) -> datetime | None:
        """When to try again, or None when the attempts or the deadline are spent."""
        if attempt >= self.max_attempts:
            return None
        when = now + timedelta(seconds=self.delay(attempt, retry_after))
        return when if when <= deadline else None
