"""Token buckets keyed the way providers limit: per channel instance and target, plus one
per account. In-process (embedded backend); a distributed backend shares them in the store.
"""

from __future__ import annotations

from aiolimiter import AsyncLimiter

from broadcaster.models import RateLimit


class RateLimiters:
    """Lazily created buckets; `acquire` waits for a token from every bucket that applies."""

    def __init__(self) -> None:
        self._buckets: dict[tuple[str, ...], AsyncLimiter] = {}

    def _bucket(self, key: tuple[str, ...], per_second: float, burst: int) -> AsyncLimiter:
        bucket = self._buckets.get(key)
        if bucket is None:
            # aiolimiter's capacity is `max_rate` per `time_period`: a burst of `burst`
            # tokens refilled at `per_second`.
            bucket = AsyncLimiter(max_rate=burst, time_period=burst / per_second)
            self._buckets[key] = bucket
        return bucket

    async def acquire(self, *, account: str, channel: str, target: str, limit: RateLimit) -> None:
        """Wait for the account's bucket, then the target's."""
        if limit.global_per_second:
            await self._bucket(
                ("account", account), limit.global_per_second, limit.global_burst
            ).acquire()
        if limit.per_target_per_second:
            await self._bucket(
                ("target", channel, target), limit.per_target_per_second, limit.per_target_burst
            ).acquire()
