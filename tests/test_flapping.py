"""Flapping damping: an alert's update coming sooner than the route's
`min_update_interval_seconds` after the incident's previous update is held (in the store)
and published when due, unless the alert fires again meanwhile."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from broadcaster.core import Broadcaster
from broadcaster.models import DraftState, IncidentStatus
from broadcaster.sandbox import Behaviour, WebhookReceiver
from tests.conftest import MakeBroadcaster, webhook_channel
from tests.test_hooks import FIRING, TOKEN, checkout, post, refired, resolved
from tests.test_serve import serving

INTERVAL = 0.4  # seconds: short enough for tests, long enough to act inside it
BANNER = {"type": "banner", "output": "public"}
BROADCASTER = str(Path(sys.executable).with_name("broadcaster"))


def publish_route(interval: float = INTERVAL) -> dict[str, Any]:
    return {
        "name": "checkout",
        "source": "alertmanager",
        "match": {"service": "checkout"},
        "title": "Checkout is down",
        "action": "publish",
        "fields": {"summary": "Orders cannot be placed."},
        "channels": ["partners"],
        "min_update_interval_seconds": interval,
    }


async def open_broadcaster(
    make_broadcaster: MakeBroadcaster,
    receiver: WebhookReceiver,
    monkeypatch: pytest.MonkeyPatch,
    interval: float = INTERVAL,
) -> Broadcaster:
    monkeypatch.setenv("AM_TOKEN", TOKEN)
    broadcaster: Broadcaster = await make_broadcaster(
        {"status-page": BANNER, "partners": webhook_channel(receiver, ["partner"])},
        hooks={"alertmanager_token": {"env": "AM_TOKEN"}},
        routes=[publish_route(interval)],
    )
    return broadcaster


async def answer(base: str, body: dict[str, Any]) -> dict[str, Any]:
    status, payload = await post(base, body)
    assert status == 200, payload
    result: dict[str, Any] = payload["results"][0]
    return result


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def statuses(receiver: WebhookReceiver) -> list[str]:
    """The incident status of every update the partner received, in order."""
    return [r.body["status"] for r in receiver.received if r.body is not None]


async def test_resolve_then_refire_within_the_interval_cancel_out(
    receiver: WebhookReceiver, make_broadcaster: MakeBroadcaster, monkeypatch: pytest.MonkeyPatch
) -> None:
    b = await open_broadcaster(make_broadcaster, receiver, monkeypatch)
    async with serving(b) as base:
        opened = await answer(base, checkout(FIRING))
        assert opened["action"] == "published"
        held = await answer(base, checkout(resolved()))
        assert held["action"] == "held" and held["incident_id"] == opened["incident_id"]
        assert held["not_before"] is not None and "flapping damping" in held["reason"]
        again = await answer(base, checkout(refired()))
        assert again["action"] == "duplicate" and again["incident_id"] == opened["incident_id"]
        assert "fired again before its resolution went out" in again["reason"]
        await asyncio.sleep(INTERVAL * 3)  # past the time the resolution was due
        await asyncio.wait_for(b.wait(), timeout=10)

    incident = await b.incident(opened["incident_id"])
    assert incident.status is IncidentStatus.INVESTIGATING and len(incident.updates) == 1
    assert [i.id for i in await b.incidents()] == [opened["incident_id"]]
    assert statuses(receiver) == ["investigating"]  # nobody read "resolved"
    (cancelled,) = await b.drafts(state=None)
    assert cancelled.state is DraftState.OBSOLETE and cancelled.update_id is None


async def test_held_resolution_goes_out_when_the_interval_has_passed(
    receiver: WebhookReceiver, make_broadcaster: MakeBroadcaster, monkeypatch: pytest.MonkeyPatch
) -> None:
    b = await open_broadcaster(make_broadcaster, receiver, monkeypatch)
    async with serving(b) as base:
        opened = await answer(base, checkout(FIRING))
        held = await answer(base, checkout(resolved()))
        assert held["action"] == "held"
        repeat = await answer(base, checkout(resolved()))  # Alertmanager re-sends it
        assert repeat["action"] == "duplicate" and repeat["reason"] == "already held"

        # People see it waiting, with when it goes out.
        (waiting,) = await b.drafts(state=DraftState.HELD)
        incident = await b.incident(opened["incident_id"])
        assert waiting.not_before is not None
        assert waiting.not_before >= incident.updates[0].created_at
        assert incident.status is IncidentStatus.INVESTIGATING

        async def resolved_now() -> bool:
            return (await b.incident(opened["incident_id"])).status is IncidentStatus.RESOLVED

        await eventually(resolved_now)
        await asyncio.wait_for(b.wait(), timeout=10)

    incident = await b.incident(opened["incident_id"])
    assert [u.status for u in incident.updates] == [
        IncidentStatus.INVESTIGATING,
        IncidentStatus.RESOLVED,
    ]
    gap = incident.updates[1].created_at - incident.updates[0].created_at
    assert gap.total_seconds() >= INTERVAL
    assert statuses(receiver) == ["investigating", "resolved"]
    (published,) = await b.drafts(state=DraftState.PUBLISHED)
    assert published.update_id == incident.updates[1].id


async def test_refire_after_the_resolution_went_out_opens_a_new_incident(
    receiver: WebhookReceiver, make_broadcaster: MakeBroadcaster, monkeypatch: pytest.MonkeyPatch
) -> None:
    b = await open_broadcaster(make_broadcaster, receiver, monkeypatch)
    async with serving(b) as base:
        opened = await answer(base, checkout(FIRING))
        await answer(base, checkout(resolved()))

        async def published() -> bool:
            return bool(await b.drafts(state=DraftState.PUBLISHED))

        await eventually(published)
        assert (await answer(base, checkout(FIRING)))["action"] == "duplicate"  # late repeat
        again = await answer(base, checkout(refired()))
        assert again["action"] == "published" and again["incident_id"] != opened["incident_id"]


async def test_zero_interval_publishes_the_resolution_at_once(
    receiver: WebhookReceiver, make_broadcaster: MakeBroadcaster, monkeypatch: pytest.MonkeyPatch
) -> None:
    b = await open_broadcaster(make_broadcaster, receiver, monkeypatch, interval=0)
    async with serving(b) as base:
        opened = await answer(base, checkout(FIRING))
        closed = await answer(base, checkout(resolved()))
        assert closed["action"] == "published" and closed["incident_id"] == opened["incident_id"]
        assert (await b.incident(opened["incident_id"])).status is IncidentStatus.RESOLVED
    assert await b.drafts(state=None) == []


async def test_held_update_survives_a_restart(
    receiver: WebhookReceiver, make_broadcaster: MakeBroadcaster, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = await open_broadcaster(make_broadcaster, receiver, monkeypatch, interval=1.0)
    async with serving(first) as base:
        opened = await answer(base, checkout(FIRING))
        assert (await answer(base, checkout(resolved())))["action"] == "held"
    await first.close()  # stopped before the resolution was due

    second = await open_broadcaster(make_broadcaster, receiver, monkeypatch, interval=1.0)
    (waiting,) = await second.drafts(state=DraftState.HELD)
    async with serving(second):

        async def resolved_now() -> bool:
            incident = await second.incident(opened["incident_id"])
            return incident.status is IncidentStatus.RESOLVED

        await eventually(resolved_now)
        await asyncio.wait_for(second.wait(), timeout=10)
    assert statuses(receiver) == ["investigating", "resolved"]
    assert (await second.draft(waiting.id)).state is DraftState.PUBLISHED


async def test_a_person_can_publish_a_held_update_early(
    receiver: WebhookReceiver, make_broadcaster: MakeBroadcaster, monkeypatch: pytest.MonkeyPatch
) -> None:
    b = await open_broadcaster(make_broadcaster, receiver, monkeypatch, interval=300)
    async with serving(b) as base:
        opened = await answer(base, checkout(FIRING))
        held = await answer(base, checkout(resolved()))
        result = await b.approve(held["draft_id"], actor="cli:alice")
        assert result.incident.id == opened["incident_id"]
        assert result.incident.status is IncidentStatus.RESOLVED
    assert (await b.draft(held["draft_id"])).state is DraftState.APPROVED


def write_config(folder: Path, receiver: WebhookReceiver, port: int, interval: float = 1.0) -> Path:
    config = {
        "store": "sqlite:///broadcaster.db",
        "serve": {"port": port},
        # A short lease: the restarted serve takes over from the killed one quickly.
        "dispatch": {"lease_seconds": 3, "poll_seconds": 0.05},
        "channels": {"status-page": BANNER, "partners": webhook_channel(receiver, ["partner"])},
        "hooks": {"alertmanager_token": {"env": "AM_TOKEN"}},
        "routes": [publish_route(interval)],
    }
    path = folder / "broadcaster.toml"
    path.write_text(tomli_w.dumps(config))
    return path


def start_serve(config: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [BROADCASTER, "--config", str(config), "serve"],
        env={**os.environ, "AM_TOKEN": TOKEN},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def until_healthy(base: str, process: subprocess.Popen[bytes]) -> None:
    import aiohttp

    async def up() -> bool:
        assert process.poll() is None, "serve exited"
        try:
            async with aiohttp.ClientSession() as s, s.get(f"{base}/healthz") as response:
                return response.status == 200
        except aiohttp.ClientError:
            return False

    await eventually(up, timeout=30)


async def test_sigkill_after_answering_loses_neither_the_delivery_nor_the_held_update(
    tmp_path: Path, thread_receiver: WebhookReceiver
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    # The resolution is due after the restarted serve has sent the opening again (and
    # after the killed one's hung request is answered): sooner, the resolution would
    # supersede the opening still queued, and rightly so, but that is another test.
    config = write_config(tmp_path, thread_receiver, port, interval=4.0)
    # The partner hangs: the opening is in flight (`sending`) when serve is killed.
    thread_receiver.default(Behaviour(delay=3))
    server = start_serve(config)
    try:
        await until_healthy(base, server)
        opened = await answer(base, checkout(FIRING))
        assert opened["action"] == "published"
        assert (await answer(base, checkout(resolved())))["action"] == "held"

        async def in_flight() -> bool:
            with sqlite3.connect(tmp_path / "broadcaster.db") as db:
                return db.execute("SELECT state FROM deliveries").fetchall() == [("sending",)]

        await eventually(in_flight)
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=10)
        thread_receiver.default(Behaviour())

        server = start_serve(config)
        await until_healthy(base, server)

        async def both_delivered() -> bool:
            return {"investigating", "resolved"} <= set(statuses(thread_receiver))

        await eventually(both_delivered, timeout=20)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=20)
    # The opening was resumed after the kill (at most a duplicate of what was in flight:
    # the hung request may still be answered late), and the held resolution went out
    # after it.
    delivered = statuses(thread_receiver)
    assert delivered.count("investigating") <= 2 and delivered.count("resolved") == 1
    assert delivered.index("investigating") < delivered.index("resolved")


def test_drafts_command_shows_held_updates_with_when_they_go_out(
    tmp_path: Path, thread_receiver: WebhookReceiver
) -> None:
    from datetime import UTC, datetime

    from broadcaster.alerts import AlertEvent, take_alert
    from tests.test_cli import Cli

    config = write_config(tmp_path, thread_receiver, port=0, interval=300)
    started = datetime.now(UTC)

    async def flap() -> int:
        async with await Broadcaster.open(config) as b:
            for status in ("firing", "resolved"):
                event = AlertEvent(source="alertmanager", group="g", status=status,
                                   started_at=started, labels={"service": "checkout"})  # fmt: skip
                result = await take_alert(b, event)
            assert result.action == "held" and result.draft_id is not None
            return result.draft_id

    draft_id = asyncio.run(flap())
    cli = Cli(config)
    (listed,) = cli.json("drafts")
    assert listed["id"] == draft_id and listed["state"] == "held"
    assert listed["request"]["status"] == "resolved"
    not_before = datetime.fromisoformat(listed["not_before"])
    assert 290 < (not_before - started).total_seconds() < 310
    shown = cli.ok("drafts").stdout
    assert f"#{draft_id}" in shown and f"{not_before:%H:%M:%S}" in shown
