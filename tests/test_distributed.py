"""The procrastinate backend where it could differ from the embedded one: reminders due
later never hold up one due now, and a worker outlives a database outage."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
import tomli_w

from broadcaster.core import Broadcaster
from broadcaster.models import ComponentState, IncidentStatus, UpdateRequest
from broadcaster.sandbox import Behaviour, WebhookReceiver
from tests.conftest import TEST_WORKERS, MakeBroadcaster, fresh_postgres, webhook_channel
from tests.test_serve import BANNER

COMPONENTS = {"app": "Charging app"}


def outage(title: str, promised: datetime) -> UpdateRequest:
    return UpdateRequest(
        status=IncidentStatus.INVESTIGATING,
        title=title,
        components={"app": ComponentState.MAJOR_OUTAGE},
        fields={"summary": "Starting a charge fails"},
        next_update_at=promised,
        actor="comms",
    )


@pytest.mark.parametrize("make_dispatching", ["procrastinate"], indirect=True)
async def test_a_reminder_due_now_fires_while_others_wait_for_hours(
    make_dispatching: MakeBroadcaster, receiver: WebhookReceiver
) -> None:
    b: Broadcaster = await make_dispatching(
        {"status-page": BANNER, "ops": webhook_channel(receiver, ["oncall"])},
        components=COMPONENTS,
        default_channels=["status-page"],
        cadence={"notify": ["ops"], "nudge_before": "10m"},
    )
    now = datetime.now(UTC).replace(microsecond=0)
    # Scheduled first: reminders hours away (a nudge, a holding update, an escalation).
    await b.publish(outage("Payments slow", now + timedelta(hours=6)))
    # Then a promise whose nudge is due in two seconds.
    soon = await b.publish(outage("Charging fails", now + timedelta(minutes=10, seconds=2)))
    await receiver.wait_for(1, timeout=30)
    (nudge,) = receiver.received
    assert nudge.body is not None
    assert f"broadcaster update {soon.incident.id}" in nudge.body["text"]


def test_a_worker_outlives_a_database_outage(
    tmp_path: Path, thread_receiver: WebhookReceiver
) -> None:
    store = fresh_postgres().replace("postgresql+psycopg://", "postgresql://")
    config = tmp_path / "broadcaster.toml"
    config.write_text(
        tomli_w.dumps(
            {
                "store": store,
                "backend": "procrastinate",
                "workers": TEST_WORKERS,
                "channels": {"hooks": webhook_channel(thread_receiver, ["a"])},
            }
        )
    )
    broadcaster = Path(sys.executable).parent / "broadcaster"
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost"}
    log = tmp_path / "worker.log"
    worker = subprocess.Popen(
        [str(broadcaster), "-c", str(config), "worker"],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:

        async def scenario() -> None:
            async with await Broadcaster.open(config) as b:
                for _ in range(100):  # the worker is up
                    if (await b.backend.problem())[0] is None:
                        break
                    await asyncio.sleep(0.1)
                # The database drops every connection (a restart, a failover).
                with psycopg.connect(store, autocommit=True) as conn:
                    conn.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    )
                await asyncio.sleep(6 * TEST_WORKERS["heartbeat_seconds"])
                assert worker.poll() is None, log.read_text()
                # Published after the outage, still sent by the same worker.
                result = await b.publish(
                    UpdateRequest(
                        status=IncidentStatus.INVESTIGATING,
                        title="API down",
                        fields={"summary": "Requests fail"},
                        actor="test",
                    )
                )
                await asyncio.wait_for(b.wait([result.update.id]), timeout=60)

        asyncio.run(scenario())
        assert worker.poll() is None, log.read_text()
        assert [r.path for r in thread_receiver.received] == ["/hook/a"]
    finally:
        worker.kill()
        worker.wait(timeout=30)


@pytest.mark.parametrize("make_dispatching", ["procrastinate"], indirect=True)
async def test_a_channel_broken_under_many_jobs_at_once_is_reported_once(
    make_dispatching: MakeBroadcaster, receiver: WebhookReceiver
) -> None:
    partners = [f"partner{n}" for n in range(6)]
    for name in partners:
        receiver.script(name, Behaviour(status=401, delay=0.3))  # they revoked our key
    b: Broadcaster = await make_dispatching(
        {
            "status-page": BANNER,
            "partners": webhook_channel(receiver, partners),
            "ops": webhook_channel(receiver, ["oncall"]),
        },
        components=COMPONENTS,
        default_channels=["status-page", "partners"],
        cadence={"notify": ["ops"]},
        # One delivery a job, several jobs at once: each meets the refusal.
        workers={**TEST_WORKERS, "batch": 1, "concurrency": 4},
    )
    opened = await b.publish(outage("Payments slow", datetime.now(UTC) + timedelta(hours=1)))
    await asyncio.wait_for(b.wait([opened.update.id]), timeout=30)
    await asyncio.sleep(1)  # any late second report would have arrived by now
    refused = [a for a in receiver.attempts if a.path.startswith("/hook/partner")]
    assert len(refused) >= 2  # several jobs found it broken at once
    told = [r for r in receiver.received if r.path == "/hook/oncall"]
    assert len(told) == 1
    assert told[0].body is not None
    assert "Channel 'partners' is broken" in told[0].body["text"]
