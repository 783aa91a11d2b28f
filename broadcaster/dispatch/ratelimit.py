"""Rate limits keyed the way providers limit: per channel instance and target, plus one
per account. In-process token buckets (embedded backend), or reservations shared in the
store by every worker on every node (procrastinate backend).
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod

from aiolimiter import AsyncLimiter

from broadcaster.models import RateLimit
from broadcaster.store import Store
from broadcaster.store.jobs import RateLog

Key = tuple[str, ...]


class Limiters(ABC):
    """`acquire` waits for the account's limit, then the target's."""

    async def acquire(self, *, account: str, channel: str, target: str, limit: RateLimit) -> None:
        """Return once one more message may go to `target` of `channel` on `account`."""
        if limit.global_per_second:
            await self.wait(("account", account), limit.global_per_second, limit.global_burst)
        if limit.per_target_per_second:
            await self.wait(
                ("target", channel, target), limit.per_target_per_second, limit.per_target_burst
            )

    @abstractmethod
    async def wait(self, key: Key, per_second: float, burst: int) -> None:
        """Wait until the limit `burst` at once, refilled at `per_second`, lets one pass."""


class RateLimiters(Limiters):
    """Lazily created token buckets of this process."""

    def __init__(self) -> None:
        self._buckets: dict[Key, AsyncLimiter] = {}

    async def wait(self, key: Key, per_second: float, burst: int) -> None:
        bucket = self._buckets.get(key)
        if bucket is None:
            # aiolimiter's capacity is `max_rate` per `time_period`: a burst of `burst`
            # tokens refilled at `per_second`.
            bucket = AsyncLimiter(max_rate=burst, time_period=burst / per_second)
            self._buckets[key] = bucket
        await bucket.acquire()


class SharedRateLimiters(Limiters):
    """Limits that hold across processes: at most `burst` messages in any window of
    `burst / per_second` seconds, reserved in the store (`RateLog`)."""

    def __init__(self, store: Store) -> None:
        self.log = RateLog(store)

    async def wait(self, key: Key, per_second: float, burst: int) -> None:
        delay = await self.log.reserve(":".join(key), burst, burst / per_second)
        if delay > 0:
            await asyncio.sleep(delay)
