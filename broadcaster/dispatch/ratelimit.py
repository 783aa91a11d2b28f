"""Rate limits keyed the way providers limit: per channel instance and target, plus one
per account. In-process token buckets (embedded backend), or reservations shared in the
store by every worker on every node (procrastinate backend).
"""

from __future__ import annotations

import asyncio
import contextlib
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator

from aiolimiter import AsyncLimiter

from broadcaster.models import RateLimit
from broadcaster.store import Store
from broadcaster.store.jobs import RateLog

Key = tuple[str, ...]


class Limiters(ABC):
    """`slot()` holds a send: it waits for the account's limit, then the target's."""

    @contextlib.asynccontextmanager
    async def slot(
        self, *, account: str, channel: str, target: str, limit: RateLimit
    ) -> AsyncIterator[None]:
        """Around one send to `target` of `channel` on `account`."""
        buckets: list[tuple[Key, float, int]] = []
        if limit.global_per_second:
            buckets.append((("account", account), limit.global_per_second, limit.global_burst))
        if limit.per_target_per_second:
            buckets.append(
                (("target", channel, target), limit.per_target_per_second, limit.per_target_burst)
            )
        taken = []
        try:
            for key, per_second, burst in buckets:
                taken.append(await self.wait(key, per_second, burst))
            yield
        finally:
            if taken:
                await self.sent(taken)

    @abstractmethod
    async def wait(self, key: Key, per_second: float, burst: int) -> int | None:
        """Wait until the limit `burst` at once, refilled at `per_second`, lets one pass;
        what `sent` is told once it went (or failed)."""

    async def sent(self, taken: list[int | None]) -> None:  # noqa: B027 - optional hook
        """The send these waits let through is over."""


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
        return None


class SharedRateLimiters(Limiters):
    """Limits that hold across processes: at most `burst` messages in any window of
    `burst / per_second` seconds, reserved in the store (`RateLog`). Once a send is
    over, its reservation moves to that time: the provider saw it no later, so a message
    slowed on its way (a cold connection) never lets the next ones crowd the window."""

    def __init__(self, store: Store) -> None:
        self.log = RateLog(store)

    async def wait(self, key: Key, per_second: float, burst: int) -> int:
        reservation, delay = await self.log.reserve(":".join(key), burst, burst / per_second)
        if delay > 0:
            await asyncio.sleep(delay)
        return reservation

    async def sent(self, taken: list[int | None]) -> None:
        with contextlib.suppress(Exception):  # best effort: the reserved time stands
            await self.log.sent([t for t in taken if t is not None])
