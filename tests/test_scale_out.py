"""Scale-out on the procrastinate backend: `broadcaster worker` and `broadcaster serve`
processes on one PostgreSQL store, talking to the local provider simulators. A provider's
rate limit holds across workers, a slow provider never holds up another, a reminder
outlives the node that scheduled it and fires once, and two nodes handed the same alert
open one incident.

Every broadcaster here is a real process (`.venv/bin/broadcaster`), killed when its test
ends; the test's own Broadcaster only publishes and reads the store."""

from __future__ import annotations

import asyncio
import copy
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest
import tomli_w

from broadcaster.core import Broadcaster
from broadcaster.dispatch.distributed import libpq_url
from broadcaster.models import (
    DeliveryState,
    IncidentStatus,
    ReminderKind,
    ReminderState,
    UpdateRequest,
)
from broadcaster.sandbox import FakeTwilio, SlackWebApi
from broadcaster.store.reminders import ReminderStore
from tests.conftest import TEST_WORKERS, fresh_postgres
from tests.test_hooks import FIRING
from tests.test_serve import BANNER, free_port

BROADCASTER = str(Path(sys.executable).with_name("broadcaster"))
# Each worker reads its own Slack token (both valid): the simulator tells who sent what.
TOKEN_A = "xoxb-scale-out-worker-a"
TOKEN_B = "xoxb-scale-out-worker-b"
STATUS = "C0STATUS"
TEAM = "C0COMMS"
TWILIO_ACCOUNT = "AC" + "0123456789abcdef" * 2
TWILIO_TOKEN = "twilio-scale-out-token"
SENDER = "+15017122661"
AM_TOKEN = "am-scale-out-token"


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the processes started here inherit: no proxy for 127.0.0.1, the secrets."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("SLACK_TEST_TOKEN", TOKEN_A)
    monkeypatch.setenv("TWILIO_TEST_TOKEN", TWILIO_TOKEN)
    monkeypatch.setenv("AM_TOKEN", AM_TOKEN)
    for name in ("TWILIO_EDGE", "TWILIO_REGION", "TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN"):
        monkeypatch.delenv(name, raising=False)


class Nodes:
    """The processes a test starts, each with its output in a log file; all killed when
    the test ends."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: list[str], **env: str) -> subprocess.Popen[bytes]:
        with (self.directory / f"{name}.log").open("wb") as log:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **env},
            )
        self.running[name] = process
        return process

    def broadcaster(self, name: str, config: Path, *args: str, **env: str) -> None:
        self.start(name, [BROADCASTER, "--config", str(config), *args], **env)

    def log(self, name: str) -> str:
        return (self.directory / f"{name}.log").read_text(errors="replace")[-4000:]

    def check_alive(self) -> None:
        for name, process in self.running.items():
            if process.poll() is not None:
                raise AssertionError(f"{name} exited with {process.returncode}:\n{self.log(name)}")

    def kill_all(self) -> None:
        for process in self.running.values():
            if process.poll() is None:
                process.kill()
        for process in self.running.values():
            process.wait(timeout=30)


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[Nodes]:
    started = Nodes(tmp_path)
    try:
        yield started
    finally:
        started.kill_all()


async def until(
    condition: Callable[[], Awaitable[bool]],
    *,
    timeout: float,
    what: str,
    nodes: Nodes | None = None,
) -> None:
    """Poll `condition` until it holds; fail naming `what` after `timeout` seconds, or
    at once (with its log) when one of `nodes` died."""
    deadline = time.monotonic() + timeout
    while not await condition():
        if nodes is not None:
            nodes.check_alive()
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        await asyncio.sleep(0.05)


async def query(store: str, sql: str) -> Any:
    """The first column of the first row of `sql` on the store's database."""
    async with await psycopg.AsyncConnection.connect(libpq_url(store)) as conn:
        cursor = await conn.execute(sql)
        row = await cursor.fetchone()
    return row[0] if row else None


async def workers_ready(store: str, nodes: Nodes, *, processes: int, channels: int) -> None:
    """Wait until `processes` worker processes each registered their procrastinate
    workers (one for the control queue, one per channel): they are fetching jobs."""

    async def registered() -> bool:
        count = await query(store, "SELECT count(*) FROM procrastinate_workers")
        return int(count) >= processes * (1 + channels)

    await until(registered, timeout=60, what="workers registered", nodes=nodes)


def write_config(path: Path, store: str, channels: dict[str, Any], **extra: Any) -> Path:
    """A broadcaster.toml on the store with the procrastinate backend and fast workers."""
    workers = {**TEST_WORKERS, **extra.pop("workers", {})}
    settings = {"store": store, "backend": "procrastinate", "workers": workers, **extra}
    path.write_text(tomli_w.dumps({**settings, "channels": channels}))
    return path


def slack_channel(slack: SlackWebApi, channel: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": "slack",
        "token": {"env": "SLACK_TEST_TOKEN"},
        "channels": [channel],
        "base_url": slack.api_url,
        "backoff_seconds": 0.05,
        "backoff_max_seconds": 0.5,
        "rate_limit": {},
        **extra,
    }


def most_in_any_window(times: list[float], seconds: float) -> int:
    """The most of `times` that fall in one window of `seconds`, wherever it starts."""
    ordered = sorted(times)
    most, first = 0, 0
    for last, at in enumerate(ordered):
        while at - ordered[first] >= seconds:
            first += 1
        most = max(most, last - first + 1)
    return most


# -- a rate limit shared by two workers --------------------------------------------------

RATE = 4  # messages a second to one Slack channel, in bursts of as many
INCIDENTS = 24


async def test_a_slack_channels_rate_limit_holds_across_two_worker_processes(
    tmp_path: Path, nodes: Nodes
) -> None:
    """Two workers send one Slack channel's posts; what Slack receives never has more
    than the limit in any one-second window, both workers sent some, each once."""
    store = fresh_postgres()
    with SlackWebApi(tokens=(TOKEN_A, TOKEN_B), channels=(STATUS,)) as slack:
        limit = {"per_target_per_second": RATE, "per_target_burst": RATE}
        config = write_config(
            tmp_path / "broadcaster.toml",
            store,
            {"slack": slack_channel(slack, STATUS, rate_limit=limit)},
            # One delivery a job: any worker may take any post.
            workers={"batch": 1},
        )
        async with await Broadcaster.open(config) as b:
            nodes.broadcaster("worker-a", config, "worker", SLACK_TEST_TOKEN=TOKEN_A)
            nodes.broadcaster("worker-b", config, "worker", SLACK_TEST_TOKEN=TOKEN_B)
            await workers_ready(store, nodes, processes=2, channels=1)

            updates = []
            for n in range(INCIDENTS):
                opened = await b.publish(
                    UpdateRequest(
                        status=IncidentStatus.INVESTIGATING,
                        title=f"Outage number {n:02d}",
                        fields={"summary": "Some requests fail."},
                        channels=["slack"],
                        actor="test",
                    )
                )
                updates.append(opened.update.id)
            progress = await asyncio.wait_for(b.wait(updates), timeout=120)

        (slack_progress,) = progress
        assert slack_progress.counts == {DeliveryState.SENT: INCIDENTS}
        posts = [c for c in slack.calls_to("chat.postMessage") if c.params["channel"] == STATUS]
        assert all(c.ok for c in posts), [c.error for c in posts]
        # Each update once: no post lost, none sent twice by the two workers.
        titles = sorted(str(c.params["text"]).splitlines()[0] for c in posts)
        assert titles == sorted(f"*Investigating: Outage number {n:02d}*" for n in range(INCIDENTS))
        # Both workers sent: the limit was shared, not held by one process alone.
        by_worker = {token: sum(c.token == token for c in posts) for token in (TOKEN_A, TOKEN_B)}
        assert all(by_worker.values()), by_worker
        # Slack's own clock. Together the workers never went faster than the limit:
        # INCIDENTS posts at RATE a second take at least INCIDENTS / RATE - 1 seconds,
        # one more second allowed for a late first post.
        arrived = sorted(c.at for c in posts)
        assert arrived[-1] - arrived[0] >= INCIDENTS / RATE - 2, arrived
        # And never more than RATE in any one second.
        assert most_in_any_window(arrived, 1.0) <= RATE, arrived


# -- a slow provider holds up only its own channel ---------------------------------------

SMS_SUBSCRIBERS = 400
SMS_BATCH = 50  # deliveries a deliver job carries
SMS_DELAY = 1.0  # Twilio answers each message this late
SLACK_WITHIN = 10.0  # seconds from publishing to Slack's post; the SMS need minutes


async def test_a_slow_sms_provider_with_a_backlog_does_not_delay_slack(
    tmp_path: Path, nodes: Nodes
) -> None:
    """Twilio answers each SMS a second late and hundreds wait in deliver jobs; Slack's
    post of a new update still arrives within seconds, while most SMS have not gone out."""
    store = fresh_postgres()
    async with (
        FakeTwilio(
            accounts={TWILIO_ACCOUNT: TWILIO_TOKEN}, numbers=[SENDER], delay=SMS_DELAY
        ) as twilio,
        SlackWebApi(tokens=(TOKEN_A,), channels=(STATUS,)) as slack,
    ):
        sms = {
            "type": "sms",
            "account_sid": TWILIO_ACCOUNT,
            "auth_token": {"env": "TWILIO_TEST_TOKEN"},
            "from_number": SENDER,
            "base_url": twilio.url,
            "concurrency": 2,
            "status_callback": False,
            "rate_limit": {},
        }
        config = write_config(
            tmp_path / "broadcaster.toml",
            store,
            {"sms": sms, "slack": slack_channel(slack, STATUS)},
            workers={"batch": SMS_BATCH},
        )
        async with await Broadcaster.open(config) as b:
            phones = "".join(f"+336123{n:05d},en\n" for n in range(SMS_SUBSCRIBERS))
            report = await b.audience.import_csv("phone,language\n" + phones)
            assert report.added == SMS_SUBSCRIBERS, report.rejected[:3]
            nodes.broadcaster("worker", config, "worker")
            await workers_ready(store, nodes, processes=1, channels=2)

            def outage(title: str, channels: list[str]) -> UpdateRequest:
                return UpdateRequest(
                    status=IncidentStatus.INVESTIGATING,
                    title=title,
                    fields={"summary": "It fails for everyone."},
                    channels=channels,
                    actor="test",
                )

            # A first incident, told by SMS: its deliver jobs wait at the slow provider.
            first = await b.publish(outage("Logins fail", ["sms"]))

            async def backlog() -> bool:
                jobs = await query(
                    store,
                    "SELECT count(*) FROM procrastinate_jobs WHERE task_name = "
                    "'broadcaster.deliver' AND status IN ('todo', 'doing')",
                )
                return int(jobs) >= SMS_SUBSCRIBERS // SMS_BATCH and twilio.max_in_flight > 0

            await until(backlog, timeout=60, what="a backlog of SMS deliver jobs", nodes=nodes)

            # A second incident, to both (a follow-up would supersede the queued SMS).
            published_at = time.time()
            second = await b.publish(outage("Payments fail", ["sms", "slack"]))

            async def slack_posted() -> bool:
                return any(c.ok for c in slack.calls_to("chat.postMessage"))

            await until(
                slack_posted,
                timeout=SLACK_WITHIN,
                what="Slack's post while SMS has a backlog",
                nodes=nodes,
            )
            (post,) = [c for c in slack.calls_to("chat.postMessage") if c.ok]
            # Still pending now, so at least as many were when Slack's post arrived.
            progress = await b.store.progress(update_ids=[first.update.id, second.update.id])

            # The SMS side was working meanwhile (not broken, which would also leave its
            # deliveries queued), only slowly.
            async def sms_flowing() -> bool:
                return len(twilio.messages) >= 4

            await until(sms_flowing, timeout=60, what="SMS accepted by Twilio", nodes=nodes)

        assert post.at - published_at < SLACK_WITHIN
        assert "Payments fail" in str(post.params["text"])
        counts = next(p.counts for p in progress if p.channel == "sms")
        pending = counts.get(DeliveryState.QUEUED, 0) + counts.get(DeliveryState.SENDING, 0)
        sent_by_then = [m for m in twilio.messages if m.created_at.timestamp() <= post.at]
        assert pending >= SMS_SUBSCRIBERS, counts  # of 2 x SMS_SUBSCRIBERS
        assert len(sent_by_then) < SMS_SUBSCRIBERS // 2
        assert all(call.ok for call in twilio.calls), [c.code for c in twilio.calls if not c.ok]


# -- a reminder outlives the node that scheduled it --------------------------------------

NUDGE_IN = 5  # seconds from the publish to the nudge
NUDGE_LATE = 30  # a generous bound on how late the nudge may come
PUBLISH_AND_DIE = """
import asyncio, os, signal, sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from broadcaster.core import Broadcaster
from broadcaster.models import Impact, IncidentStatus, UpdateRequest

async def main() -> None:
    b = await Broadcaster.open(Path(sys.argv[1]))
    promised = datetime.now(UTC) + timedelta(seconds=float(sys.argv[2]))
    result = await b.publish(UpdateRequest(
        status=IncidentStatus.INVESTIGATING, title="Charging sessions fail",
        impact=Impact.CRITICAL, fields={"summary": "Starting a charge fails."},
        next_update_at=promised, actor="comms",
    ))
    print(result.incident.id, result.update.id, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # the node dies as soon as its publish commits

asyncio.run(main())
"""


async def test_a_reminder_fires_once_after_the_node_that_scheduled_it_died(
    tmp_path: Path, nodes: Nodes
) -> None:
    """A node publishes an update promising the next and is killed as soon as the publish
    commits; of the two workers started before it, one nudges the team at the due time,
    once."""
    store = fresh_postgres()
    with SlackWebApi(tokens=(TOKEN_A, TOKEN_B), channels=(TEAM,)) as slack:
        config = write_config(
            tmp_path / "broadcaster.toml",
            store,
            {"status-page": BANNER, "team": slack_channel(slack, TEAM)},
            default_channels=["status-page"],
            # A promise 40 s ahead: the team is nudged NUDGE_IN s after the publish.
            cadence={"notify": ["team"], "nudge_before": f"{40 - NUDGE_IN}s"},
        )
        async with await Broadcaster.open(config) as b:
            nodes.broadcaster("worker-a", config, "worker", SLACK_TEST_TOKEN=TOKEN_A)
            nodes.broadcaster("worker-b", config, "worker", SLACK_TEST_TOKEN=TOKEN_B)
            await workers_ready(store, nodes, processes=2, channels=2)

            node = subprocess.run(
                [sys.executable, "-c", PUBLISH_AND_DIE, str(config), "40"],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert node.returncode == -signal.SIGKILL, node.stderr
            incident_id, update_id = (int(word) for word in node.stdout.split())
            nudge, holding = await ReminderStore(b.store).of_incident(incident_id)
            assert (nudge.kind, holding.kind) == (ReminderKind.NUDGE, ReminderKind.HOLDING)
            assert datetime.now(UTC) < nudge.due_at  # it died before the nudge was due

            async def settled() -> bool:
                return (await ReminderStore(b.store).get(nudge.id)).state is not (
                    ReminderState.PENDING
                )

            async def no_nudge_job_left() -> bool:
                live = await query(
                    store,
                    "SELECT count(*) FROM procrastinate_jobs WHERE task_name = "
                    "'broadcaster.reminders_due' AND args->>'kind' = 'nudge' "
                    "AND status IN ('todo', 'doing')",
                )
                return int(live) == 0

            wait = (nudge.due_at - datetime.now(UTC)).total_seconds() + NUDGE_LATE
            await until(settled, timeout=wait, what="the nudge fired", nodes=nodes)
            await until(no_nudge_job_left, timeout=30, what="the nudge's job over", nodes=nodes)
            # The update it published went out too: its fan-out job committed with it.
            progress = await asyncio.wait_for(b.wait([update_id]), timeout=30)
            fired = await ReminderStore(b.store).get(nudge.id)
            still = await ReminderStore(b.store).get(holding.id)

        assert progress[0].counts == {DeliveryState.DELIVERED: 1}
        assert (fired.state, fired.outcome) == (ReminderState.DONE, "nudged team")
        assert still.state is ReminderState.PENDING  # the promised time is still ahead
        told = [c for c in slack.calls_to("chat.postMessage") if c.params["channel"] == TEAM]
        assert len(told) == 1, [c.params["text"] for c in told]  # once, by one of two workers
        (nudged,) = told
        assert nudged.ok and str(nudged.params["text"]).startswith("Update due by")
        assert f"#{incident_id}" in str(nudged.params["text"])
        assert nudged.at >= nudge.due_at.timestamp()  # at its time, not before
        assert fired.fired_at is not None and fired.fired_at >= nudge.due_at


# -- two serve nodes handed one alert ----------------------------------------------------

ATTEMPTS = 3  # separate alert groups, each sent to both nodes at once


def checkout_alert(attempt: int) -> dict[str, Any]:
    """An Alertmanager notification of its own alert group."""
    body = copy.deepcopy(FIRING)
    name = f"CheckoutDown{attempt}"
    body["groupKey"] = f'{{}}:{{alertname="{name}"}}'
    body["groupLabels"] = {"alertname": name}
    body["commonLabels"] = {"alertname": name, "service": "checkout"}
    body["commonAnnotations"] = {"public_summary": f"Checkout attempt {attempt} fails."}
    body["alerts"][0]["labels"] = {"alertname": name, "service": "checkout"}
    return body


async def test_two_serve_nodes_given_one_alert_at_once_open_one_incident_and_post_once(
    tmp_path: Path, nodes: Nodes
) -> None:
    """A load balancer hands both `serve` nodes the same Alertmanager notification at the
    same moment: one publishes, the other answers duplicate, and Slack is told once."""
    store = fresh_postgres()
    with SlackWebApi(tokens=(TOKEN_A,), channels=(STATUS,)) as slack:
        route = {
            "name": "checkout",
            "source": "alertmanager",
            "match": {"service": "checkout"},
            "title": "Checkout fails",
            "alert_fields": {"summary": "annotations.public_summary"},
            "channels": ["slack"],
            "action": "publish",
            "min_update_interval_seconds": 0,
        }
        config = write_config(
            tmp_path / "broadcaster.toml",
            store,
            {"status-page": BANNER, "slack": slack_channel(slack, STATUS)},
            hooks={"alertmanager_token": {"env": "AM_TOKEN"}},
            routes=[route],
        )
        async with await Broadcaster.open(config) as b:
            ports = [free_port(), free_port()]
            for node, port in zip("ab", ports, strict=True):
                nodes.broadcaster(f"serve-{node}", config, "serve", "--port", str(port))
            nodes.broadcaster("worker", config, "worker")
            headers = {"Authorization": f"Bearer {AM_TOKEN}"}
            async with (
                aiohttp.ClientSession(headers=headers) as one,
                aiohttp.ClientSession(headers=headers) as two,
            ):
                sessions = [(one, ports[0]), (two, ports[1])]

                async def serving() -> bool:
                    try:
                        for session, port in sessions:  # also opens a kept-alive connection
                            async with session.get(f"http://127.0.0.1:{port}/healthz") as answer:
                                if answer.status != 200:
                                    return False
                    except aiohttp.ClientConnectionError:
                        return False
                    return True

                await until(serving, timeout=60, what="both serve nodes answer", nodes=nodes)
                await workers_ready(store, nodes, processes=1, channels=2)

                async def post(session: aiohttp.ClientSession, port: int, body: Any) -> Any:
                    url = f"http://127.0.0.1:{port}/hooks/alertmanager"
                    async with session.post(url, json=body) as answer:
                        assert answer.status == 200, await answer.text()
                        return (await answer.json())["results"][0]

                opened: list[int] = []
                for attempt in range(ATTEMPTS):
                    body = checkout_alert(attempt)
                    answers = await asyncio.gather(*(post(s, p, body) for s, p in sessions))
                    assert sorted(a["action"] for a in answers) == ["duplicate", "published"]
                    (incident_id,) = {a["incident_id"] for a in answers}
                    opened.append(incident_id)

            incidents = await b.incidents()
            assert sorted(i.id for i in incidents) == sorted(opened)
            updates = []
            for incident_id in opened:
                (update,) = (await b.incident(incident_id)).updates
                updates.append(update.id)
            progress = await asyncio.wait_for(b.wait(updates), timeout=60)

        slack_progress = next(p for p in progress if p.channel == "slack")
        assert slack_progress.counts == {DeliveryState.SENT: ATTEMPTS}
        posts = [str(c.params["text"]) for c in slack.calls_to("chat.postMessage")]
        # Each alert posted once: one post per group, none from the node that lost.
        for attempt in range(ATTEMPTS):
            summary = f"Checkout attempt {attempt} fails."
            assert sum(summary in text for text in posts) == 1, posts
        assert len(posts) == ATTEMPTS, posts
