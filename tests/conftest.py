"""Shared fixtures: a webhook receiver simulator, broadcasters on a temporary store, the
PostgreSQL running on this machine, and `require` for any service or tool a test needs
(skipped only when absent and CI is unset)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from broadcaster.config import Settings
from broadcaster.core import Broadcaster
from broadcaster.sandbox import WebhookReceiver

POSTGRES_URL = os.environ.get(
    "BROADCASTER_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


@pytest.fixture
async def receiver() -> AsyncIterator[WebhookReceiver]:
    async with WebhookReceiver() as sim:
        yield sim


@pytest.fixture
def thread_receiver() -> Iterator[WebhookReceiver]:
    """A receiver on its own thread and loop, for code under test in another process."""
    sim = WebhookReceiver()
    sim.start_in_thread()
    try:
        yield sim
    finally:
        sim.stop_thread()


def webhook_channel(receiver: WebhookReceiver, names: list[str], **extra: Any) -> dict[str, Any]:
    """A webhook channel config whose targets are the receiver's, with fast retries."""
    return {
        "type": "webhook",
        "targets": [{"name": n, "url": receiver.target(n)} for n in names],
        "backoff_seconds": 0.05,
        "backoff_max_seconds": 0.5,
        "rate_limit": {},
        **extra,
    }


def targets(n: int, prefix: str = "t") -> list[str]:
    return [f"{prefix}{i:04d}" for i in range(n)]


MakeBroadcaster = Callable[..., Any]


@pytest.fixture
async def make_broadcaster(tmp_path: Path) -> AsyncIterator[MakeBroadcaster]:
    """Open broadcasters on a SQLite store in tmp_path; closed at the end of the test."""
    opened: list[Broadcaster] = []

    async def make(channels: dict[str, Any], **settings: Any) -> Broadcaster:
        settings.setdefault("store", f"sqlite:///{tmp_path}/broadcaster.db")
        settings.setdefault("dispatch", {"poll_seconds": 0.05, "lease_seconds": 5})
        config = Settings(channels=channels, config_path=tmp_path / "broadcaster.toml", **settings)
        broadcaster = await Broadcaster.open(settings=config)
        opened.append(broadcaster)
        return broadcaster

    yield make
    for broadcaster in opened:
        await broadcaster.close()


def require(available: bool, missing: str) -> None:
    """Skip a test whose service or tool is `missing` on a developer's machine; fail it
    when CI is set, because CI never passes by skipping."""
    if available:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{missing} (CI is set: CI never passes by skipping)")
    pytest.skip(missing)


def postgres_reachable() -> bool:
    try:
        import psycopg

        with psycopg.connect(
            POSTGRES_URL.replace("postgresql+psycopg", "postgresql"), connect_timeout=3
        ):
            return True
    except Exception:
        return False


def fresh_postgres() -> str:
    """This machine's PostgreSQL test database, emptied (the store and the job tables)."""
    require(postgres_reachable(), f"PostgreSQL is not reachable at {POSTGRES_URL}")
    import psycopg

    with psycopg.connect(POSTGRES_URL.replace("postgresql+psycopg", "postgresql")) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")
    return POSTGRES_URL


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The store tests run on SQLite and on this machine's PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path}/store.db"
    return fresh_postgres()


# Fast workers for tests: a killed worker's jobs run again within a few seconds.
TEST_WORKERS = {
    "poll_seconds": 0.05,
    "heartbeat_seconds": 0.5,
    "stalled_seconds": 2,
    "retry_stalled_every": 1,
}


@pytest.fixture(params=["embedded", "procrastinate"])
async def make_dispatching(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[MakeBroadcaster]:
    """`make_broadcaster` on each backend: embedded on SQLite, or procrastinate on this
    machine's PostgreSQL with a `broadcaster worker` (its own Broadcaster) running in the
    test's loop, so the same test proves both."""
    opened: list[Broadcaster] = []
    workers: list[asyncio.Task[None]] = []
    procrastinate = request.param == "procrastinate"
    store = fresh_postgres() if procrastinate else f"sqlite:///{tmp_path}/broadcaster.db"

    async def make(channels: dict[str, Any], **settings: Any) -> Broadcaster:
        settings.setdefault("store", store)
        settings.setdefault("dispatch", {"poll_seconds": 0.05, "lease_seconds": 5})
        if procrastinate:
            settings.setdefault("backend", "procrastinate")
            settings.setdefault("workers", TEST_WORKERS)
        config = Settings(channels=channels, config_path=tmp_path / "broadcaster.toml", **settings)
        broadcaster = await Broadcaster.open(settings=config)
        opened.append(broadcaster)
        if procrastinate and not workers:
            worker = await Broadcaster.open(settings=config)
            opened.append(worker)
            workers.append(asyncio.create_task(worker.work()))
        return broadcaster

    yield make
    for task in workers:
        task.cancel()
    await asyncio.gather(*workers, return_exceptions=True)
    for broadcaster in reversed(opened):
        await broadcaster.close()
