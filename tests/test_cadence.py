"""Promised updates: the team is nudged before one is due, a holding update goes out (or
is drafted) when it passes, a newer update or a resolution resets the schedule, and a
due time fires once — across a restart, a crash mid-fire and a second process on the
same store. Time is injected (`fire_due(now)`), never slept; the team's channel is the
real Slack SDK against the local Slack simulator."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from broadcaster.core import Broadcaster
from broadcaster.dispatch import EmbeddedBackend
from broadcaster.errors import ConfigError
from broadcaster.models import (
    ComponentState,
    DraftState,
    Impact,
    IncidentStatus,
    ReminderKind,
    ReminderState,
    UpdateRequest,
)
from broadcaster.sandbox import Behaviour, SlackWebApi, WebhookReceiver
from broadcaster.store import Store
from broadcaster.store.reminders import ReminderStore
from tests.conftest import MakeBroadcaster, webhook_channel
from tests.test_serve import BANNER, serving

SLACK_TOKEN = "xoxb-cadence-0000-token"
TEAM = "C0COMMS"
COMPONENTS = {"app": "Charging app"}


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("SLACK_TEST_TOKEN", SLACK_TOKEN)


@pytest.fixture
async def slack() -> AsyncIterator[SlackWebApi]:
    async with SlackWebApi(tokens=(SLACK_TOKEN,), channels=(TEAM,)) as fake:
        yield fake


def team_channel(slack: SlackWebApi) -> dict[str, Any]:
    return {
        "type": "slack",
        "token": {"env": "SLACK_TEST_TOKEN"},
        "channels": [TEAM],
        "base_url": slack.api_url,
        "backoff_seconds": 0.05,
        "rate_limit": {},
    }


async def open_broadcaster(
    make_broadcaster: MakeBroadcaster, slack: SlackWebApi, **cadence: Any
) -> Broadcaster:
    """The status page for everyone, and the comms team's Slack channel for nudges."""
    b: Broadcaster = await make_broadcaster(
        {"status-page": BANNER, "team": team_channel(slack)},
        components=COMPONENTS,
        default_channels=["status-page"],
        cadence={"notify": ["team"], **cadence},
    )
    return b


def told(slack: SlackWebApi) -> list[str]:
    return [str(c.params["text"]) for c in slack.calls_to("chat.postMessage") if c.ok]


def outage(
    promised: datetime | None,
    *,
    impact: Impact = Impact.CRITICAL,
    status: IncidentStatus = IncidentStatus.INVESTIGATING,
) -> UpdateRequest:
    return UpdateRequest(
        status=status,
        title="Charging sessions fail",
        impact=impact,
        components={"app": ComponentState.MAJOR_OUTAGE},
        fields={"summary": "Starting a charge fails for most users"},
        next_update_at=promised,
        actor="comms",
    )


def soon() -> datetime:
    """A promised time half an hour ahead, to the second."""
    return (datetime.now(UTC) + timedelta(minutes=30)).replace(microsecond=0)


async def reminders(b: Broadcaster, incident: int) -> list[tuple[ReminderKind, datetime, str]]:
    found = await ReminderStore(b.store).of_incident(incident)
    return [(r.kind, r.due_at, r.state.value) for r in found]


async def test_a_promise_stores_a_nudge_before_it_and_a_holding_reminder_at_it(
    make_broadcaster: MakeBroadcaster, slack: SlackWebApi
) -> None:
    b = await open_broadcaster(make_broadcaster, slack)
    due = soon()
    opened = await b.publish(outage(due))
    assert await reminders(b, opened.incident.id) == [
        (ReminderKind.NUDGE, due - timedelta(minutes=5), "pending"),
        (ReminderKind.HOLDING, due, "pending"),
    ]
    # No promise, no reminders; a promise less than 5 minutes ahead gets no nudge.
    quiet = await b.publish(outage(None))
    assert await reminders(b, quiet.incident.id) == []
    close = (datetime.now(UTC) + timedelta(minutes=3)).replace(microsecond=0)
    hurried = await b.publish(outage(close))
    assert await reminders(b, hurried.incident.id) == [(ReminderKind.HOLDING, close, "pending")]


async def test_the_team_is_nudged_five_minutes_before_with_what_was_said_and_the_command(
    make_broadcaster: MakeBroadcaster, slack: SlackWebApi
) -> None:
    b = await open_broadcaster(make_broadcaster, slack)
    due = soon()
    opened = await b.publish(outage(due))

    assert await b.scheduler.fire_due(due - timedelta(minutes=6)) == []
    assert told(slack) == []
    (nudge,) = await b.scheduler.fire_due(due - timedelta(minutes=5))
    assert nudge.kind is ReminderKind.NUDGE and nudge.state is ReminderState.DONE
    assert nudge.outcome == "nudged team"
    (text,) = told(slack)
    assert f"Update due by {due:%H:%M} UTC (in 5 min)" in text
    assert f"#{opened.incident.id}" in text and "Charging sessions fail" in text
    assert "by comms (investigating): Starting a charge fails for most users" in text
    assert f"broadcaster update {opened.incident.id} --status investigating" in text
    assert "a holding update goes out by itself" in text
    # Once only.
    assert await b.scheduler.fire_due(due - timedelta(minutes=4)) == []
    assert len(told(slack)) == 1


async def test_at_the_promised_time_a_holding_update_goes_out_with_a_fresh_promise_once(
    make_broadcaster: MakeBroadcaster, slack: SlackWebApi
) -> None:
    b = await open_broadcaster(make_broadcaster, slack)
    due = soon()
    opened = await b.publish(outage(due))
    incident = opened.incident.id

    fired = await b.scheduler.fire_due(due + timedelta(seconds=5))
    assert [(r.kind, r.state) for r in fired] == [
        (ReminderKind.NUDGE, ReminderState.CANCELLED),  # found after the time it nudges for
        (ReminderKind.HOLDING, ReminderState.DONE),
    ]
    assert told(slack) == []
    current = await b.incident(incident)
    holding = current.updates[-1]
    assert (holding.template, holding.actor) == ("holding", "scheduler")
    assert holding.status is IncidentStatus.INVESTIGATING
    assert holding.channels == ["status-page"]
    assert holding.next_update_at == due + timedelta(seconds=5) + timedelta(minutes=30)
    assert fired[1].outcome == f"holding update #{holding.id}"
    (render,) = (await b.store.renders(holding.id)).values()
    assert "still working on" in render.variant("en").text.lower()
    # The fresh promise has its own reminders; the old ones never fire again.
    assert [r for r in await reminders(b, incident) if r[2] == "pending"] == [
        (ReminderKind.NUDGE, holding.next_update_at - timedelta(minutes=5), "pending"),
        (ReminderKind.HOLDING, holding.next_update_at, "pending"),
    ]
    assert await b.scheduler.fire_due(due + timedelta(minutes=1)) == []
    assert len((await b.incident(incident)).updates) == 2


async def test_an_update_before_the_time_keeps_the_promise_and_resets_the_schedule(
    make_broadcaster: MakeBroadcaster, slack: SlackWebApi
) -> None:
    b = await open_broadcaster(make_broadcaster, slack)
    due = soon()
    opened = await b.publish(outage(due))
    later = due + timedelta(minutes=45)
    await b.publish(outage(later, status=IncidentStatus.IDENTIFIED), opened.incident.id)

    assert await reminders(b, opened.incident.id) == [
        (ReminderKind.NUDGE, due - timedelta(minutes=5), "cancelled"),
        (ReminderKind.HOLDING, due, "kept"),
        (ReminderKind.NUDGE, later - timedelta(minutes=5), "pending"),
        (ReminderKind.HOLDING, later, "pending"),
    ]
    assert await b.scheduler.fire_due(due + timedelta(minutes=1)) == []
    assert told(slack) == []


async def test_resolving_ends_the_schedule(
    make_broadcaster: MakeBroadcaster, slack: SlackWebApi
) -> None:
    b = await open_broadcaster(make_broadcaster, slack)
    due = soon()
    opened = await b.publish(outage(due))
    await b.publish(outage(None, status=IncidentStatus.RESOLVED), opened.incident.id)
    assert {state for _, _, state in await reminders(b, opened.incident.id)} == {
        "cancelled",
        "kept",
    }
    assert await b.scheduler.fire_due(due + timedelta(hours=1)) == []
    assert told(slack) == []
    assert len((await b.incident(opened.incident.id)).updates) == 2


async def test_a_minor_incident_gets_a_holding_draft_and_the_team_the_approve_command(
    make_broadcaster: MakeBroadcaster, slack: SlackWebApi
) -> None:
    b = await open_broadcaster(make_broadcaster, slack)
    due = soon()
    opened = await b.publish(outage(due, impact=Impact.MINOR))
    await b.scheduler.fire_due(due - timedelta(minutes=5))
    fired = await b.scheduler.fire_due(due)
    (draft,) = await b.drafts()
    assert draft.incident_id == opened.incident.id and draft.request.template == "holding"
    assert fired[-1].outcome == f"holding draft #{draft.id}; told team"
    assert len((await b.incident(opened.incident.id)).updates) == 1  # nothing went out
    assert f"broadcaster approve {draft.id}" in told(slack)[-1]
    assert "drafted for approval" in told(slack)[0]  # the nudge said what would happen

    published = await b.approve(draft.id, actor="comms")
    assert published.update.template == "holding"
    assert (await b.draft(draft.id)).state is DraftState.APPROVED


async def test_policy_off_only_tells_the_team(
    make_broadcaster: MakeBroadcaster, slack: SlackWebApi
) -> None:
    b = await open_broadcaster(make_broadcaster, slack, holding={"critical": "off"})
    due = soon()
    opened = await b.publish(outage(due))
    await b.scheduler.fire_due(due)
    assert len((await b.incident(opened.incident.id)).updates) == 1
    assert await b.drafts() == []
    assert "is due and nothing was posted" in told(slack)[-1]


async def test_after_a_restart_what_came_due_meanwhile_fires_exactly_once(
    make_broadcaster: MakeBroadcaster, slack: SlackWebApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = await open_broadcaster(make_broadcaster, slack)
    due = soon()
    opened = await first.publish(outage(due))
    await first.close()  # down from before the nudge until after the promised time

    # The process that comes back is killed while storing the holding update ...
    second = await open_broadcaster(make_broadcaster, slack)
    store_publish = Store.publish

    async def killed(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("killed")

    monkeypatch.setattr(Store, "publish", killed)
    fired = await second.scheduler.fire_due(due + timedelta(minutes=2))
    assert [r.kind for r in fired] == [ReminderKind.NUDGE]  # dropped: its time came first
    monkeypatch.setattr(Store, "publish", store_publish)
    await second.close()

    # ... so the next one publishes it (not zero times), and is killed right after the
    # commit, before it could settle anything itself ...
    third = await open_broadcaster(make_broadcaster, slack)

    def killed_after_commit(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("killed")

    monkeypatch.setattr(EmbeddedBackend, "published", killed_after_commit)
    assert await third.scheduler.fire_due(due + timedelta(minutes=3)) == []  # it died
    monkeypatch.undo()
    await third.close()

    # ... and the one after finds nothing left to do (not twice).
    fourth = await open_broadcaster(make_broadcaster, slack)
    assert await fourth.scheduler.fire_due(due + timedelta(minutes=4)) == []
    updates = (await fourth.incident(opened.incident.id)).updates
    assert [u.template for u in updates] == ["investigating", "holding"]
    assert [(kind, state) for kind, _, state in await reminders(fourth, opened.incident.id)][
        :2
    ] == [(ReminderKind.NUDGE, "cancelled"), (ReminderKind.HOLDING, "done")]


async def test_serve_fires_a_due_holding_update_by_itself(
    make_broadcaster: MakeBroadcaster, slack: SlackWebApi
) -> None:
    b = await open_broadcaster(make_broadcaster, slack)
    async with serving(b):
        # The one test on the real clock: a promise a second ahead, kept by `serve`.
        due = datetime.now(UTC) + timedelta(seconds=1)
        opened = await b.publish(outage(due))
        deadline = asyncio.get_running_loop().time() + 15
        while len((await b.incident(opened.incident.id)).updates) < 2:
            assert asyncio.get_running_loop().time() < deadline, "no holding update"
            await asyncio.sleep(0.1)
    holding = (await b.incident(opened.incident.id)).updates[1]
    assert holding.template == "holding" and holding.created_at >= due


async def test_a_due_time_found_beyond_the_grace_is_reported_missed_not_fired(
    make_broadcaster: MakeBroadcaster, slack: SlackWebApi
) -> None:
    b = await open_broadcaster(make_broadcaster, slack, grace="15m")
    due = soon()
    opened = await b.publish(outage(due))
    fired = await b.scheduler.fire_due(due + timedelta(minutes=20))
    assert [(r.kind, r.state) for r in fired] == [
        (ReminderKind.NUDGE, ReminderState.MISSED),
        (ReminderKind.HOLDING, ReminderState.MISSED),
    ]
    assert len((await b.incident(opened.incident.id)).updates) == 1
    (text,) = told(slack)  # one report, for the promise (not for the stale nudge)
    assert text.startswith(f"Missed: the update promised for {due:%H:%M} UTC")


async def test_a_second_process_on_the_same_store_never_fires(
    make_broadcaster: MakeBroadcaster, slack: SlackWebApi
) -> None:
    one = await open_broadcaster(make_broadcaster, slack)
    two = await open_broadcaster(make_broadcaster, slack)
    due = soon()
    await one.publish(outage(due))
    at = due - timedelta(minutes=5)

    assert await one.backend.fire_if_holder(  # type: ignore[attr-defined]
        lambda still_mine: one.scheduler.fire_due(at, still_mine=still_mine)
    )
    assert not await two.backend.fire_if_holder(  # type: ignore[attr-defined]
        lambda still_mine: two.scheduler.fire_due(at, still_mine=still_mine)
    )
    # Even firing directly, the second finds nothing pending: settled in the store.
    assert await two.scheduler.fire_due(at) == []
    assert len(told(slack)) == 1


async def test_a_retracted_promise_does_not_fire(
    make_broadcaster: MakeBroadcaster, slack: SlackWebApi
) -> None:
    b = await open_broadcaster(make_broadcaster, slack)
    due = soon()
    opened = await b.publish(outage(due))
    await b.retract(opened.update.id, actor="comms")
    assert {state for _, _, state in await reminders(b, opened.incident.id)} == {"cancelled"}
    assert await b.scheduler.fire_due(due) == []


async def test_team_channels_are_checked_when_the_config_loads(
    make_broadcaster: MakeBroadcaster, slack: SlackWebApi
) -> None:
    with pytest.raises(ValueError, match=r"cadence\.notify: unknown channel 'comms'"):
        await make_broadcaster({"status-page": BANNER}, cadence={"notify": ["comms"]})
    with pytest.raises(ConfigError, match="'status-page' is a banner channel"):
        await make_broadcaster({"status-page": BANNER}, cadence={"notify": ["status-page"]})
    with pytest.raises(ValueError, match="is not a duration"):
        await make_broadcaster({"status-page": BANNER}, cadence={"nudge_before": "soon"})


async def test_metrics_count_promises_kept_nudged_held_and_missed(
    make_broadcaster: MakeBroadcaster, slack: SlackWebApi
) -> None:
    from broadcaster.server.metrics import Metrics

    b = await open_broadcaster(make_broadcaster, slack)
    metrics = Metrics(b)
    due = soon()
    kept = await b.publish(outage(due))
    await b.scheduler.fire_due(due - timedelta(minutes=5))  # nudged
    await b.publish(outage(due + timedelta(hours=1)), kept.incident.id)  # kept, and pending
    held = await b.publish(outage(due))
    missed = await b.publish(outage(due + timedelta(minutes=10)))
    await b.scheduler.fire_due(due + timedelta(minutes=1))  # held (critical: published)
    # missed: 20 min late; and the holding update's fresh promise is nudged
    await b.scheduler.fire_due(due + timedelta(minutes=30))
    assert held.incident.id != missed.incident.id

    text = (await metrics.render()).decode()
    shown = {
        line.split('"')[1]: float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("broadcaster_promised_updates{")
    }
    # pending: the kept incident's new promise and the holding update's fresh one
    assert shown == {"kept": 1, "nudged": 2, "held": 1, "missed": 1, "pending": 2}


async def test_an_incident_unresolved_too_long_is_escalated_once(
    make_broadcaster: MakeBroadcaster, slack: SlackWebApi
) -> None:
    b = await open_broadcaster(make_broadcaster, slack, escalate_after="4h")
    opened = await b.publish(outage(None))
    started = opened.incident.created_at
    (escalation,) = await ReminderStore(b.store).of_incident(opened.incident.id)
    assert escalation.kind is ReminderKind.ESCALATE
    assert abs(escalation.due_at - (started + timedelta(hours=4))) < timedelta(seconds=1)
    # Follow-ups keep it; it fires once, four hours after the incident opened.
    await b.publish(outage(None, status=IncidentStatus.IDENTIFIED), opened.incident.id)
    assert [r.id for r in await b.schedule()] == [escalation.id]
    assert await b.scheduler.fire_due(started + timedelta(hours=3, minutes=59)) == []
    (fired,) = await b.scheduler.fire_due(escalation.due_at + timedelta(minutes=1))
    assert fired.outcome == "escalated to team"
    (text,) = told(slack)
    assert text.startswith(f"Escalation: incident #{opened.incident.id} “Charging sessions")
    assert "unresolved for 4.0 h (identified, critical)" in text
    assert await b.scheduler.fire_due(started + timedelta(hours=9)) == []

    # Resolved in time: no escalation.
    quick = await b.publish(outage(None))
    await b.publish(outage(None, status=IncidentStatus.RESOLVED), quick.incident.id)
    assert await b.scheduler.fire_due(datetime.now(UTC) + timedelta(hours=5)) == []
    assert len(told(slack)) == 1


async def test_the_team_is_told_when_a_channel_breaks_mid_incident(
    make_broadcaster: MakeBroadcaster, slack: SlackWebApi, receiver: WebhookReceiver
) -> None:
    receiver.script("partner", Behaviour(status=401))  # the partner revoked our key
    b: Broadcaster = await make_broadcaster(
        {
            "status-page": BANNER,
            "partners": webhook_channel(receiver, ["partner"]),
            "team": team_channel(slack),
        },
        components=COMPONENTS,
        default_channels=["status-page", "partners"],
        cadence={"notify": ["team"]},
    )
    opened = await b.publish(outage(None))
    await asyncio.wait_for(b.wait([opened.update.id]), timeout=20)
    deadline = asyncio.get_running_loop().time() + 10
    while not told(slack):
        assert asyncio.get_running_loop().time() < deadline, "the team was not told"
        await asyncio.sleep(0.05)
    (text,) = told(slack)
    assert text.startswith("Channel 'partners' is broken and sends nothing: ")
    assert "401" in text and "broadcaster doctor" in text


async def test_a_webhook_to_the_teams_own_tools_can_take_the_nudges(
    make_broadcaster: MakeBroadcaster, receiver: WebhookReceiver
) -> None:
    b: Broadcaster = await make_broadcaster(
        {"status-page": BANNER, "ops": webhook_channel(receiver, ["oncall-bot"])},
        components=COMPONENTS,
        default_channels=["status-page"],
        cadence={"notify": ["ops"]},
    )
    due = soon()
    opened = await b.publish(outage(due))
    await b.scheduler.fire_due(due - timedelta(minutes=5))
    (nudge,) = receiver.received
    assert nudge.body["type"] == "team.message" and nudge.body["kind"] == "reminder"
    assert nudge.body["text"].startswith(f"Update due by {due:%H:%M} UTC")
    assert f"broadcaster update {opened.incident.id}" in nudge.body["text"]


# -- scheduled maintenance ---------------------------------------------------------------


def window(start: datetime, hours: int = 2) -> dict[str, str]:
    return {
        "starts_at": start.isoformat(),
        "ends_at": (start + timedelta(hours=hours)).isoformat(),
        "summary": "Payments may be unavailable for a few minutes",
    }


def maintenance(fields: dict[str, str], template: str | None = None) -> UpdateRequest:
    return UpdateRequest(
        status=IncidentStatus.SCHEDULED if template is None else IncidentStatus.COMPLETED,
        template=template,
        title="Database upgrade",
        impact=Impact.MINOR,
        components={"app": ComponentState.UNDER_MAINTENANCE},
        fields=fields,
        actor="comms",
    )


async def test_a_maintenance_is_announced_again_then_starts_and_ends_by_itself(
    make_broadcaster: MakeBroadcaster, slack: SlackWebApi
) -> None:
    b = await open_broadcaster(make_broadcaster, slack)
    start = (datetime.now(UTC) + timedelta(days=5)).replace(minute=0, second=0, microsecond=0)
    end = start + timedelta(hours=2)
    planned = await b.publish(maintenance(window(start)))
    incident = planned.incident.id
    assert await reminders(b, incident) == [
        (ReminderKind.NOTICE, start - timedelta(hours=72), "pending"),
        (ReminderKind.NOTICE, start - timedelta(hours=24), "pending"),
        (ReminderKind.START, start, "pending"),
    ]

    for moment in (start - timedelta(hours=72), start - timedelta(hours=24), start):
        (fired,) = await b.scheduler.fire_due(moment)
        assert fired.state is ReminderState.DONE
    (ending,) = await b.scheduler.fire_due(end + timedelta(seconds=30))
    assert ending.outcome is not None and ending.outcome.startswith("end message #")

    updates = (await b.incident(incident)).updates
    assert [(u.status.value, u.template, u.actor) for u in updates] == [
        ("scheduled", "maintenance_scheduled", "comms"),
        ("scheduled", "maintenance_scheduled", "scheduler"),
        ("scheduled", "maintenance_scheduled", "scheduler"),
        ("in_progress", "maintenance_started", "scheduler"),
        ("completed", "maintenance_completed", "scheduler"),
    ]
    assert updates[3].fields["ends_at"] == end.isoformat()
    assert updates[-1].components == {"app": ComponentState.OPERATIONAL}
    final = await b.incident(incident)
    assert final.status is IncidentStatus.COMPLETED
    assert await b.schedule() == []
    (render,) = (await b.store.renders(updates[1].id)).values()
    assert "Scheduled maintenance" in render.variant("en").text


async def test_a_reschedule_replaces_the_notices_and_a_cancellation_ends_them(
    make_broadcaster: MakeBroadcaster, slack: SlackWebApi
) -> None:
    b = await open_broadcaster(make_broadcaster, slack)
    start = (datetime.now(UTC) + timedelta(days=5)).replace(minute=0, second=0, microsecond=0)
    planned = await b.publish(maintenance(window(start)))
    incident = planned.incident.id
    later = start + timedelta(days=2)
    await b.publish(maintenance(window(later)), incident)
    assert [r for r in await reminders(b, incident) if r[2] == "pending"] == [
        (ReminderKind.NOTICE, later - timedelta(hours=72), "pending"),
        (ReminderKind.NOTICE, later - timedelta(hours=24), "pending"),
        (ReminderKind.START, later, "pending"),
    ]
    # The old window's first notice is gone.
    assert await b.scheduler.fire_due(start - timedelta(hours=71)) == []

    cancelled = await b.publish(
        maintenance(window(later), template="maintenance_cancelled"), incident
    )
    assert await b.schedule() == []
    (render,) = (await b.store.renders(cancelled.update.id)).values()
    assert render.variant("en").subject == "Maintenance cancelled: Database upgrade"
    assert "will not take place" in render.variant("en").text


@pytest.mark.parametrize(
    ("start", "notices"),
    [
        pytest.param(
            # Monday 29 March 2027, 10:00 in Paris (CEST); clocks went forward on Sunday.
            datetime(2027, 3, 29, 8, 0, tzinfo=UTC),
            [datetime(2027, 3, 26, 9, 0, tzinfo=UTC), datetime(2027, 3, 28, 8, 0, tzinfo=UTC)],
            id="spring-forward",
        ),
        pytest.param(
            # Monday 1 November 2027, 10:00 in Paris (CET); clocks went back on Sunday.
            datetime(2027, 11, 1, 9, 0, tzinfo=UTC),
            [datetime(2027, 10, 29, 8, 0, tzinfo=UTC), datetime(2027, 10, 31, 9, 0, tzinfo=UTC)],
            id="fall-back",
        ),
    ],
)
async def test_notices_keep_the_local_time_of_day_across_a_daylight_saving_change(
    make_broadcaster: MakeBroadcaster,
    slack: SlackWebApi,
    start: datetime,
    notices: list[datetime],
) -> None:
    b = await make_broadcaster(
        {"status-page": BANNER}, components=COMPONENTS, timezone="Europe/Paris"
    )
    # Written as people write it: local time, no offset.
    local = start.astimezone(ZoneInfo("Europe/Paris")).replace(tzinfo=None)
    fields = {"starts_at": local.isoformat(), "ends_at": (local + timedelta(hours=2)).isoformat()}
    planned = await b.publish(maintenance(fields))
    assert await reminders(b, planned.incident.id) == [
        (ReminderKind.NOTICE, notices[0], "pending"),  # 10:00 local, three days before
        (ReminderKind.NOTICE, notices[1], "pending"),  # 10:00 local, the day before
        (ReminderKind.START, start, "pending"),
    ]


# -- what review found: races, poison pills, restored promises ----------------------------


async def test_a_resolution_that_comes_first_wins_over_the_holding_update(
    make_broadcaster: MakeBroadcaster, slack: SlackWebApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    b = await open_broadcaster(make_broadcaster, slack)
    due = soon()
    opened = await b.publish(outage(due))
    incident = opened.incident.id
    store_publish = Store.publish

    async def person_first(self: Store, plan: Any) -> Any:
        if plan.keeps_reminder is not None:  # the scheduler's holding update, prepared...
            # ... when a person's resolution commits just before it is stored.
            await b.publish(outage(None, status=IncidentStatus.RESOLVED), incident)
        return await store_publish(self, plan)

    monkeypatch.setattr(Store, "publish", person_first)
    fired = await b.scheduler.fire_due(due)
    monkeypatch.undo()
    assert [r.kind for r in fired] == [ReminderKind.NUDGE]  # the holding update: not stored
    current = await b.incident(incident)
    assert [u.template for u in current.updates] == ["investigating", "resolved"]
    assert current.status is IncidentStatus.RESOLVED and await b.schedule() == []


async def test_a_reminder_that_cannot_fire_is_reported_and_never_blocks_the_others(
    make_broadcaster: MakeBroadcaster, slack: SlackWebApi, receiver: WebhookReceiver
) -> None:
    partners = webhook_channel(receiver, ["partner"])
    channels = {"status-page": BANNER, "partners": partners, "team": team_channel(slack)}
    first = await make_broadcaster(
        channels,
        components=COMPONENTS,
        default_channels=["status-page"],
        cadence={"notify": ["team"]},
    )
    due = soon()
    broken = await first.publish(outage(due).model_copy(update={"channels": ["partners"]}))
    fine = await first.publish(outage(due + timedelta(minutes=1)))
    await first.close()
    # The partners channel is removed from the config before the promised time.
    b = await make_broadcaster(
        {"status-page": BANNER, "team": team_channel(slack)},
        components=COMPONENTS,
        default_channels=["status-page"],
        cadence={"notify": ["team"]},
    )
    fired = await b.scheduler.fire_due(due + timedelta(minutes=2))
    holding = {r.incident_id: r for r in fired if r.kind is ReminderKind.HOLDING}
    assert holding[broken.incident.id].state is ReminderState.MISSED
    assert "could not fire: unknown channel 'partners'" in str(holding[broken.incident.id].outcome)
    assert holding[fine.incident.id].state is ReminderState.DONE  # not held up
    assert "could not post the holding" in told(slack)[-1]
    assert await b.scheduler.fire_due(due + timedelta(minutes=3)) == []  # not again


async def test_firing_stops_when_the_lease_is_lost(
    make_broadcaster: MakeBroadcaster, slack: SlackWebApi
) -> None:
    b = await open_broadcaster(make_broadcaster, slack)
    due = soon()
    await b.publish(outage(due))
    await b.publish(outage(due))
    answers = iter([True, False])

    async def still_mine() -> bool:
        return next(answers)

    assert len(await b.scheduler.fire_due(due, still_mine=still_mine)) == 1
    assert len([r for r in await b.schedule() if r.due_at <= due]) == 3  # left for the holder


async def test_retracting_the_latest_update_restores_the_promise_before_it(
    make_broadcaster: MakeBroadcaster, slack: SlackWebApi
) -> None:
    b = await open_broadcaster(make_broadcaster, slack, escalate_after="4h")
    first, later = soon(), soon() + timedelta(hours=1)
    opened = await b.publish(outage(first))
    wrong = await b.publish(outage(later), opened.incident.id)
    await b.retract(wrong.update.id, actor="comms")
    pending = [(r.kind, r.due_at) for r in await b.schedule()]
    assert (ReminderKind.HOLDING, first) in pending and (
        ReminderKind.NUDGE,
        first - timedelta(minutes=5),
    ) in pending
    assert all(due != later for _, due in pending)
    assert ReminderKind.ESCALATE in {kind for kind, _ in pending}
    # The kill switch on the first one too: nothing public is left, nothing promised.
    await b.cancel(opened.update.id, actor="comms")
    assert await b.schedule() == []


async def test_a_correction_keeps_the_promise_of_what_it_corrects(
    make_broadcaster: MakeBroadcaster, slack: SlackWebApi
) -> None:
    b = await open_broadcaster(make_broadcaster, slack)
    due = soon()
    opened = await b.publish(outage(due))
    fixed = outage(None).model_copy(update={"corrects": opened.update.id})
    corrected = await b.publish(fixed, opened.incident.id)
    assert corrected.update.next_update_at == due
    assert [(r.kind, r.due_at) for r in await b.schedule()] == [
        (ReminderKind.NUDGE, due - timedelta(minutes=5)),
        (ReminderKind.HOLDING, due),
    ]


async def test_a_holding_draft_nobody_approved_is_obsolete_once_someone_posts(
    make_broadcaster: MakeBroadcaster, slack: SlackWebApi
) -> None:
    b = await open_broadcaster(make_broadcaster, slack)
    due = soon()
    opened = await b.publish(outage(due, impact=Impact.MINOR))
    await b.scheduler.fire_due(due)
    (draft,) = await b.drafts()
    await b.publish(outage(None, status=IncidentStatus.MONITORING), opened.incident.id)
    assert await b.drafts() == []
    assert (await b.draft(draft.id)).state is DraftState.OBSOLETE


async def test_an_escalation_is_sent_even_late_and_only_once(
    make_broadcaster: MakeBroadcaster, slack: SlackWebApi
) -> None:
    b = await open_broadcaster(make_broadcaster, slack, escalate_after="1h")
    opened = await b.publish(outage(None))
    (escalation,) = await b.schedule()
    (fired,) = await b.scheduler.fire_due(escalation.due_at + timedelta(hours=2))
    assert fired.state is ReminderState.DONE  # past the grace: still unresolved, so told
    await b.publish(outage(None, status=IncidentStatus.IDENTIFIED), opened.incident.id)
    assert await b.schedule() == []  # escalated once: a later update makes no new one
    assert len(told(slack)) == 1


def test_a_notice_less_than_a_day_ahead_counts_real_minutes_across_the_change() -> None:
    from broadcaster.scheduler import before

    # 04:00 in Paris on the night clocks go forward (02:00 -> 03:00), 02:00 UTC.
    start = datetime(2027, 3, 28, 2, 0, tzinfo=UTC)
    assert start - before(start, timedelta(minutes=90), "Europe/Paris") == timedelta(minutes=90)
    # A day and an hour: the day on the local clock (04:00 the day before), then an hour.
    assert before(start, timedelta(hours=25), "Europe/Paris") == datetime(
        2027, 3, 27, 2, 0, tzinfo=UTC
    )
