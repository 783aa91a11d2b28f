"""High availability on the procrastinate backend: three `broadcaster worker` processes
share one fan-out of more than 10,000 deliveries over webhooks, SMS and email; one is
killed (SIGKILL) midway and a second one later, and the last one finishes the fan-out.

Nothing is lost, and what is sent twice is only what a killed worker had in flight: the
deliveries it held `sending` when it died, which its jobs take back when they run again.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import tomli_w
from sqlalchemy import create_engine, insert, text

from broadcaster.config import WorkerSettings
from broadcaster.core import Broadcaster
from broadcaster.models import ComponentState, DeliveryState, IncidentStatus, UpdateRequest
from broadcaster.sandbox import FakeSmtp, FakeTwilio, WebhookReceiver
from broadcaster.store import Store
from broadcaster.store.tables import SUBSCRIBERS, SUBSCRIPTIONS
from tests.conftest import TEST_WORKERS, fresh_postgres

N_SMS = 4000
N_EMAIL = 4000
N_HOOKS = 2500
TOTAL = N_SMS + N_EMAIL + N_HOOKS
ACCOUNT = "AC" + "7e" * 16
TOKEN = "ha-twilio-token"
SENDER = "+15017122661"
WORKERS = 3
KILLS_AT = (0.25, 0.6)  # the share of deliveries settled when each worker is killed


def phone(i: int) -> str:
    return f"+336{i:08d}"


def email(i: int) -> str:
    return f"s{i}@subscribers.example.com"


@pytest.fixture
async def simulators() -> AsyncIterator[tuple[FakeTwilio, FakeSmtp, WebhookReceiver]]:
    async with (
        FakeTwilio(accounts={ACCOUNT: TOKEN}, numbers=[SENDER]) as twilio,
        FakeSmtp() as smtp,
        WebhookReceiver() as hooks,
    ):
        yield twilio, smtp, hooks


def write_config(
    path: Path, store: str, twilio: FakeTwilio, smtp: FakeSmtp, hooks: WebhookReceiver
) -> Path:
    fast = {"backoff_seconds": 0.1, "backoff_max_seconds": 1, "rate_limit": {}}
    config = {
        "store": store.replace("postgresql+psycopg://", "postgresql://"),
        "backend": "procrastinate",
        "workers": TEST_WORKERS,
        "components": {"api": "API"},
        "channels": {
            "sms": {
                "type": "sms",
                "account_sid": ACCOUNT,
                "auth_token": {"env": "HA_TWILIO_TOKEN"},
                "from_number": SENDER,
                "base_url": twilio.url,
                **fast,
            },
            "email": {
                "type": "email",
                "host": "127.0.0.1",
                "port": smtp.port,
                "security": "none",
                "from_address": "Status <status@example.com>",
                "helo_hostname": "broadcaster.test",
                **fast,
            },
            "hooks": {
                "type": "webhook",
                "targets": [
                    {"name": f"t{i}", "url": hooks.target(f"t{i}")} for i in range(N_HOOKS)
                ],
                **fast,
            },
        },
    }
    target = path / "broadcaster.toml"
    target.write_text(tomli_w.dumps(config))
    return target


async def seed_subscribers(store_url: str) -> None:
    """The store migrated, then N_SMS phone and N_EMAIL email subscribers in bulk."""
    store = await Store.open(store_url)
    await store.close()
    now = datetime.now(UTC)
    people, consents = [], []
    for i in range(1, N_SMS + N_EMAIL + 1):
        sms = i <= N_SMS
        people.append(
            {
                "id": i,
                "phone": phone(i) if sms else None,
                "email": None if sms else email(i),
                "language": "en",
                "components": None,
                "timezone": None,
                "created_at": now,
                "updated_at": None,
            }
        )
        consents.append(
            {
                "subscriber_id": i,
                "channel": "sms" if sms else "email",
                "subscribed": True,
                "changed_at": now,
                "source": "test",
            }
        )
    engine = create_engine(store_url)
    with engine.begin() as conn:
        conn.execute(insert(SUBSCRIBERS), people)
        conn.execute(insert(SUBSCRIPTIONS), consents)
        conn.execute(text("SELECT setval('subscribers_id_seq', :n)"), {"n": len(people)})
    engine.dispose()


@pytest.fixture
def worker_processes(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


def start_worker(config: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "HA_TWILIO_TOKEN": TOKEN,
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    broadcaster = Path(sys.executable).parent / "broadcaster"
    return subprocess.Popen(
        [str(broadcaster), "-c", str(config), "worker"],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env=env,
    )


def in_flight(store_url: str, update_id: int) -> set[tuple[str, str]]:
    """(channel, address) of the update's deliveries `sending` right now."""
    engine = create_engine(store_url)
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT d.channel, CASE d.channel WHEN 'hooks' THEN d.recipient "
                "WHEN 'sms' THEN s.phone ELSE s.email END "
                "FROM deliveries d LEFT JOIN subscribers s "
                "ON d.channel <> 'hooks' AND CAST(s.id AS text) = d.recipient "
                "WHERE d.update_id = :u AND d.state = 'sending'"
            ),
            {"u": update_id},
        ).all()
    engine.dispose()
    return {(channel, address) for channel, address in rows}


async def settled_share(b: Broadcaster, update_id: int) -> float:
    progress = await b.store.progress(update_ids=[update_id])
    done = sum(n for p in progress for state, n in p.counts.items() if not state.is_pending)
    return done / TOTAL


async def test_killed_workers_lose_nothing_and_repeat_only_what_was_in_flight(
    tmp_path: Path,
    simulators: tuple[FakeTwilio, FakeSmtp, WebhookReceiver],
    worker_processes: list[subprocess.Popen[bytes]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    twilio, smtp, hooks = simulators
    store_url = fresh_postgres()
    await seed_subscribers(store_url)
    config = write_config(tmp_path, store_url, twilio, smtp, hooks)
    for n in range(WORKERS):
        worker_processes.append(start_worker(config, tmp_path / f"worker{n}.log"))

    monkeypatch.setenv("HA_TWILIO_TOKEN", TOKEN)
    b = await Broadcaster.open(config)
    try:
        result = await b.publish(
            UpdateRequest(
                status=IncidentStatus.INVESTIGATING,
                title="API down",
                components={"api": ComponentState.MAJOR_OUTAGE},
                fields={"summary": "Requests fail."},
                actor="test",
            )
        )
        update_id = result.update.id
        snapshots: list[set[tuple[str, str]]] = []
        for victim, share in zip(worker_processes[:2], KILLS_AT, strict=True):
            async with asyncio.timeout(240):
                while (done := await settled_share(b, update_id)) < share:
                    await asyncio.sleep(0.05)
            assert done < 0.95, "the fan-out finished before a worker could be killed"
            victim.send_signal(signal.SIGKILL)
            victim.wait(timeout=10)
            # What it held `sending` as it died: its jobs take these back when they run
            # again, so these (and only these) may go out twice.
            snapshots.append(in_flight(store_url, update_id))
        async with asyncio.timeout(240):
            while not await b.settled([update_id]):
                await asyncio.sleep(0.2)
        assert worker_processes[2].poll() is None  # the survivor did the rest

        progress = await b.store.progress(update_ids=[update_id])
        counts = {p.channel: p.counts for p in progress}
        # Every delivery settled, and settled as sent: none lost, none left in flight.
        assert counts["sms"] == {DeliveryState.SENT: N_SMS}
        assert counts["email"] == {DeliveryState.SENT: N_EMAIL}
        assert counts["hooks"] == {DeliveryState.DELIVERED: N_HOOKS}

        received: Counter[tuple[str, str]] = Counter()
        received.update(("sms", m.to) for m in twilio.messages)
        received.update(("email", rcpt) for m in smtp.received for rcpt in m.rcpt_tos)
        received.update(("hooks", r.path.rsplit("/", 1)[1]) for r in hooks.received)
        expected = (
            {("sms", phone(i)) for i in range(1, N_SMS + 1)}
            | {("email", email(i)) for i in range(N_SMS + 1, N_SMS + N_EMAIL + 1)}
            | {("hooks", f"t{i}") for i in range(N_HOOKS)}
        )
        assert set(received) == expected  # every recipient reached, nobody else
        twice = {key: n - 1 for key, n in received.items() if n > 1}
        held = set().union(*snapshots)
        assert set(twice) <= held, "sent twice without being in flight at a kill"
        assert sum(twice.values()) <= sum(len(s) for s in snapshots)
        # In flight is at most a few batches per worker and channel, never the fan-out.
        limits = WorkerSettings(**TEST_WORKERS)
        most = WORKERS * len(counts) * limits.concurrency * limits.batch
        assert all(len(s) <= most for s in snapshots)
    finally:
        await b.close()
