"""A dead man's switch: while `serve` is ready, it tells a monitoring service so.

healthchecks.io, Cronitor, Better Stack and the like alert when the expected request
stops coming, so someone hears when the broadcaster itself is down — the one thing it
cannot announce. "Ready" is what /readyz answers: the store answers and no due delivery
has waited past `serve.ready_stall_seconds`. While not ready, nothing is sent (or
`serve.heartbeat_fail_url` is, to alert at once). The URLs are credentials: a log line
names the setting and the host, never the URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp

from broadcaster.core import Broadcaster
from broadcaster.secrets import SecretRef

log = logging.getLogger("broadcaster.heartbeat")

TIMEOUT_SECONDS = 10.0


def _resolve(key: str, ref: SecretRef | None, base_dir: Path) -> str | None:
    if ref is None:
        return None
    value = ref.resolve(base_dir)
    if value is None or not value.get_secret_value():
        log.warning("serve.%s: nothing at %s; it is not fetched", key, ref.describe())
        return None
    return value.get_secret_value()


async def _fetch(session: aiohttp.ClientSession, key: str, url: str) -> bool:
    """GET the URL; a failure is logged (by setting and host) and never raised."""
    host = urlsplit(url).hostname or "?"
    try:
        async with session.get(url) as response:
            if response.status < 400:
                return True
            log.warning(
                "serve.%s (%s) answered HTTP %d",
                key,
                host,
                response.status,
                extra={"outcome": "refused", "status": response.status},
            )
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        # The exception's text may quote the URL: only its kind is logged.
        log.warning(
            "serve.%s (%s) unreachable: %s",
            key,
            host,
            type(exc).__name__,
            extra={"outcome": "unreachable"},
        )
    return False


async def beat_while_ready(broadcaster: Broadcaster, stop: asyncio.Event) -> None:
    """Every `serve.heartbeat_interval_seconds` until `stop`: fetch the heartbeat URL if
    ready, else the fail URL if one is set. Returns at once when no heartbeat is set."""
    settings = broadcaster.settings.serve
    base_dir = broadcaster.settings.resolve_path(Path("."))
    url = _resolve("heartbeat_url", settings.heartbeat_url, base_dir)
    if url is None:
        return
    fail_url = _resolve("heartbeat_fail_url", settings.heartbeat_fail_url, base_dir)
    interval = settings.heartbeat_interval_seconds
    timeout = aiohttp.ClientTimeout(total=min(TIMEOUT_SECONDS, interval))
    was_ready: bool | None = None
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while not stop.is_set():
            try:
                was_ready = await _beat(broadcaster, session, url, fail_url, was_ready)
            except Exception:  # a bug here must end neither the heartbeat nor serving
                log.exception("heartbeat: unexpected error; trying again")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)


async def _beat(
    broadcaster: Broadcaster,
    session: aiohttp.ClientSession,
    url: str,
    fail_url: str | None,
    was_ready: bool | None,
) -> bool:
    """One beat; whether serve is ready. A change of readiness is logged once."""
    problem = await broadcaster.dispatch_problem()
    if problem is None:
        await _fetch(session, "heartbeat_url", url)
        if was_ready is False:
            log.info("ready again, heartbeat resumed", extra={"outcome": "resumed"})
        return True
    if fail_url is not None:
        await _fetch(session, "heartbeat_fail_url", fail_url)
    if was_ready is not False:
        log.warning("not ready, heartbeat withheld: %s", problem, extra={"outcome": "withheld"})
    return False
