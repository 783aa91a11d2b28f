"""Per-client-address request limits of `broadcaster serve`: one token bucket per address.

The public side spends a token per request. `/hooks/*` spends one per *refused* request
(wrong or missing credential, malformed body), and the admin API `/v1/` one per refused
credential: a token guesser or a scanner is stopped, while a monitoring system or a
person with valid credentials is never held up — Alertmanager does not retry a 429, a
big outage makes it send hundreds of notifications at once, and the comms team must
publish mid-outage.

The address is `scope["client"]`, which the proxy-headers middleware (outside this one)
has already set to the real client when the request came through a trusted proxy.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broadcaster.config import PerIpRateLimits, RateLimit

# Load balancers' probes and Prometheus come from a few known addresses, often a lot.
UNLIMITED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
# Limited by refusals only, per prefix: the answers that spend a token. A webhook is
# refused before anything runs; on the admin API a 404 or a failed check is a person's
# ordinary mistake, a wrong token is not.
INBOUND_REFUSALS = {
    "/hooks/": frozenset({400, 401, 403, 404, 405, 413, 422}),
    # Provider callbacks (Telegram's support bot): a wrong secret is refused like a hook's.
    "/inbound/": frozenset({400, 401, 403, 404, 405, 413, 422}),
    "/v1/": frozenset({401, 403}),
    # Self-service links (manage pages, one-click unsubscribe, confirmation links): the
    # signed token is the credential, so only a refused one spends (a mail provider's
    # one-click POSTs come from a few addresses, for many subscribers).
    "/manage/": frozenset({400, 403, 404, 405, 410, 413, 422}),
    "/subscribe/confirm": frozenset({400, 403, 404, 405, 410, 413, 422}),
}
# Sent to by anyone, and each one may send a message to an address: every POST spends a
# token of the inbound limit, accepted or not (with the per-address and SMS caps and the
# proof of work, this is what keeps the form from being used to spam or pump SMS).
INBOUND_EVERY_POST = frozenset({"/subscribe", "/subscribe/verify"})


class TokenBuckets:
    """One token bucket per key, at most `max_keys` of them.

    The least recently seen key is forgotten first: an idle bucket is full again, so
    forgetting it only matters for a key still draining, which starts over at `burst`.
    """

    def __init__(
        self,
        *,
        rate: float,
        burst: int,
        max_keys: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.max_keys = max_keys
        self._clock = clock
        # key -> (tokens, when counted); a dict keeps insertion order, so re-inserting a
        # key on each request makes the first key the least recently seen.
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str) -> float:
        """Take a token: 0.0 when there was one, else the seconds until there is one."""
        return self._count(key, take=True)

    def wait(self, key: str) -> float:
        """The seconds until `key` has a token (0.0: it has one); nothing is taken."""
        return self._count(key, take=False)

    def _count(self, key: str, *, take: bool) -> float:
        now = self._clock()
        counted = self._buckets.pop(key, None)
        tokens = (
            self.burst
            if counted is None
            else min(self.burst, counted[0] + (now - counted[1]) * self.rate)
        )
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0 if take else 0.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self.max_keys:
            del self._buckets[next(iter(self._buckets))]
        return wait

    def __len__(self) -> int:
        return len(self._buckets)


def buckets_for(limit: RateLimit, max_keys: int) -> TokenBuckets | None:
    """The buckets of one limit; None when its rate is 'off'."""
    if limit.rate is None:
        return None
    burst = limit.burst or max(1, math.ceil(limit.rate))
    return TokenBuckets(rate=limit.rate, burst=burst, max_keys=max_keys)


class PerIpRateLimit:
    """Answers 429 with Retry-After to an address past its limit, before the app runs
    (so before any body is read or anything stored).

    A plain ASGI middleware, like `HookRequestCounter`: the webhook path has a
    throughput target, and this costs a dict lookup per request. `on_refusal` is told
    which limit refused ("inbound" or "site") — a bounded label for metrics."""

    def __init__(
        self, app: ASGIApp, *, limits: PerIpRateLimits, on_refusal: Callable[[str], None]
    ) -> None:
        self.app = app
        self.on_refusal = on_refusal
        self.inbound = buckets_for(limits.inbound, limits.max_addresses)
        self.site = buckets_for(limits.site, limits.max_addresses)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] != "http" or path in UNLIMITED_PATHS:
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        address = client[0] if client else ""
        refusals = next(
            (codes for prefix, codes in INBOUND_REFUSALS.items() if path.startswith(prefix)),
            None,
        )
        if path in INBOUND_EVERY_POST and scope.get("method") == "POST":
            kind, buckets, refusals = "inbound", self.inbound, None
            wait = 0.0 if buckets is None else buckets.take(address)
        elif refusals is not None:
            kind, buckets = "inbound", self.inbound
            wait = 0.0 if buckets is None else buckets.wait(address)
        else:
            kind, buckets = "site", self.site
            wait = 0.0 if buckets is None else buckets.take(address)
        if not wait:
            if refusals is not None and buckets is not None:
                counted = _spending_on_refusal(send, buckets, address, refusals)
                await self.app(scope, receive, counted)
            else:
                await self.app(scope, receive, send)
            return
        self.on_refusal(kind)
        # Retry-After is whole seconds (RFC 9110 delay-seconds); round up, never 0.
        retry_after = max(1, math.ceil(wait))
        body = json.dumps(
            {"detail": f"too many requests from your address — retry in {retry_after} s"}
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 429,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"retry-after", str(retry_after).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _spending_on_refusal(
    send: Send, buckets: TokenBuckets, address: str, refusals: frozenset[int]
) -> Send:
    """`send`, taking a token from `address` when the answer is one of `refusals`."""

    async def counting(message: Message) -> None:
        if message["type"] == "http.response.start" and message["status"] in refusals:
            buckets.take(address)
        await send(message)

    return counting
