"""The post-incident communication report: a real broadcaster on the embedded store, the
status page and a webhook channel whose `pager` target refuses every post (and `mirror`
the first one), an incident with a kept, a missed and a held promise, then the report
as its reader sees it — the timeline, time to first message per channel, the failures
and their reasons, the chart — and `broadcaster report` writing the files."""

from __future__ import annotations

import asyncio
import json
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from broadcaster.alerts import AlertEvent, take_alert
from broadcaster.config import Settings
from broadcaster.core import Broadcaster
from broadcaster.errors import BroadcasterError, NotFoundError
from broadcaster.models import (
    SUCCESS_STATES,
    ComponentState,
    Delivery,
    DeliveryAction,
    DeliveryState,
    Impact,
    IncidentStatus,
    UpdateRequest,
)
from broadcaster.report import (
    EventKind,
    IncidentReport,
    PromiseOutcome,
    build_report,
    render_html,
    render_markdown,
    render_svg,
)
from broadcaster.sandbox import Behaviour, WebhookReceiver
from tests.conftest import MakeBroadcaster, webhook_channel
from tests.test_cli import SECRET, SECRET_ENV, Cli, assert_one_line_error, write_config

SVG = "{http://www.w3.org/2000/svg}"
PARTNERS = ["ops-bridge", "pager", "mirror"]
STATUS_PAGE = {"type": "banner", "languages": ["en"], "output": "public"}
COMPONENTS = {"api": "Public API"}
PAGER_GONE = "HTTP 410"
MIRROR_REFUSED = "HTTP 400"


def broadcaster_settings(receiver: WebhookReceiver) -> dict[str, Any]:
    return {
        "channels": {"status-page": STATUS_PAGE, "partners": webhook_channel(receiver, PARTNERS)},
        "components": COMPONENTS,
        "default_channels": ["status-page", "partners"],
    }


async def open_broadcaster(
    make_broadcaster: MakeBroadcaster, receiver: WebhookReceiver, **settings: Any
) -> Broadcaster:
    wanted = broadcaster_settings(receiver)
    b: Broadcaster = await make_broadcaster(wanted.pop("channels"), **wanted, **settings)
    return b


def request(
    status: IncidentStatus,
    summary: str,
    promised: datetime | None = None,
    *,
    title: str = "Payments fail at checkout",
) -> UpdateRequest:
    return UpdateRequest(
        status=status,
        title=title,
        impact=Impact.CRITICAL,  # a due promise gets a holding update published
        components={"api": ComponentState.MAJOR_OUTAGE},
        fields={"summary": summary},
        next_update_at=promised,
        actor="comms",
    )


def moments_ahead() -> datetime:
    """A promise that falls due within the test (the story's incident lasts a second)."""
    return datetime.now(UTC) + timedelta(milliseconds=50)


async def until(moment: datetime | None) -> None:
    assert moment is not None
    await asyncio.sleep(max(0.0, (moment - datetime.now(UTC)).total_seconds()) + 0.01)


def kinds(report: IncidentReport) -> list[EventKind]:
    return [e.kind for e in report.timeline]


@dataclass
class Story:
    """The story's report, and each channel's successful deliveries as the store has them."""

    report: IncidentReport
    succeeded: dict[str, list[Delivery]]


@pytest.fixture(scope="module")
def story(tmp_path_factory: pytest.TempPathFactory) -> Story:
    """Opened (a promise, kept by the next update), identified (a promise due within
    moments, so the next update comes late: missed), monitoring (a promise the scheduler
    finds due and covers with a holding update: held), resolved (keeps the holding
    update's fresh promise). `pager` refuses every post; `mirror` refuses the first.

    Told once for the module (the tests only read its report), on its own event loop."""
    folder = tmp_path_factory.mktemp("story")

    async def tell() -> Story:
        async with WebhookReceiver() as receiver:
            receiver.script("pager", Behaviour(status=410))
            receiver.script("mirror", Behaviour(status=400, times=1))
            settings = Settings(
                store=f"sqlite:///{folder}/broadcaster.db",
                dispatch={"poll_seconds": 0.05, "lease_seconds": 5},
                config_path=folder / "broadcaster.toml",
                **broadcaster_settings(receiver),
            )
            async with await Broadcaster.open(settings=settings) as b:
                incident = await tell_the_story(b)
                report = await build_report(b, incident)
                succeeded = {
                    c.channel: await b.deliveries(
                        incident, channel=c.channel, states=SUCCESS_STATES
                    )
                    for c in report.channels
                }
                return Story(report, succeeded)

    return asyncio.run(tell())


async def tell_the_story(b: Broadcaster) -> int:
    opened = await b.publish(
        request(
            IncidentStatus.INVESTIGATING,
            "Card payments fail for most users.",
            datetime.now(UTC) + timedelta(minutes=30),
        )
    )
    incident = opened.incident.id
    await b.wait()
    identified = request(IncidentStatus.IDENTIFIED, "A faulty release.", moments_ahead())
    await b.publish(identified, incident)
    await b.wait()
    await until(identified.next_update_at)
    monitoring = request(IncidentStatus.MONITORING, "Rolled back; watching.", moments_ahead())
    await b.publish(monitoring, incident)
    await b.wait()
    await until(monitoring.next_update_at)
    # The scheduler's clock, injected: the monitoring update's promise is just due.
    assert monitoring.next_update_at is not None
    fired = await b.scheduler.fire_due(monitoring.next_update_at + timedelta(seconds=1))
    assert [r.outcome for r in fired][-1].startswith("holding update #")
    await b.wait()
    await b.publish(request(IncidentStatus.RESOLVED, "Payments work again."), incident)
    await b.wait()
    return incident


def test_timeline_runs_from_opening_through_each_update_and_promise_to_resolution(
    story: Story,
) -> None:
    report = story.report
    updates = report.incident.updates
    assert [u.status for u in updates] == [
        IncidentStatus.INVESTIGATING,
        IncidentStatus.IDENTIFIED,
        IncidentStatus.MONITORING,
        IncidentStatus.MONITORING,  # the scheduler's holding update
        IncidentStatus.RESOLVED,
    ]
    assert report.started_from == "opened" and report.started_at == updates[0].created_at
    # One event per update, in the order they went out, each of its own kind.
    per_update = [e for e in report.timeline if e.kind in _UPDATE_KINDS]
    assert [(e.kind, e.update_id) for e in per_update] == [
        (EventKind.OPENED, updates[0].id),
        (EventKind.UPDATE, updates[1].id),
        (EventKind.UPDATE, updates[2].id),
        (EventKind.HOLDING, updates[3].id),
        (EventKind.RESOLVED, updates[4].id),
    ]
    assert per_update[0].detail == "Card payments fail for most users."
    assert "by comms to status-page, partners" in per_update[0].text
    assert "by scheduler" in per_update[3].text
    # The reader's story, in time order.
    story_kinds = [k for k in kinds(report) if k in _UPDATE_KINDS or k in _PROMISE_KINDS]
    assert story_kinds == [
        EventKind.OPENED,
        EventKind.UPDATE,  # identified, in time ...
        EventKind.PROMISE_KEPT,  # ... so the opening's promise was kept
        EventKind.PROMISE_MISSED,  # identified promised "by now"; nothing came by then
        EventKind.UPDATE,  # monitoring, late
        EventKind.PROMISE_HELD,  # its promise passed: the scheduler covered it ...
        EventKind.HOLDING,  # ... with a holding update
        EventKind.RESOLVED,
        EventKind.PROMISE_KEPT,  # the resolution came before the holding update's promise
    ]
    assert [e.at for e in report.timeline] == sorted(e.at for e in report.timeline)
    # The first public message: after the opening, before the next update.
    (first,) = [e for e in report.timeline if e.kind is EventKind.FIRST_MESSAGE]
    assert kinds(report).index(EventKind.FIRST_MESSAGE) == 1
    assert updates[0].created_at <= first.at <= updates[1].created_at
    assert report.first_public_message_at == first.at
    assert report.resolved_at == report.incident.resolved_at == updates[4].created_at
    assert report.duration_seconds == pytest.approx(
        (updates[4].created_at - updates[0].created_at).total_seconds()
    )


_UPDATE_KINDS = {
    EventKind.OPENED,
    EventKind.UPDATE,
    EventKind.HOLDING,
    EventKind.CORRECTION,
    EventKind.RESOLVED,
}
_PROMISE_KINDS = {EventKind.PROMISE_KEPT, EventKind.PROMISE_MISSED, EventKind.PROMISE_HELD}


def test_promises_are_reported_kept_missed_and_held_with_their_times(
    story: Story,
) -> None:
    report = story.report
    updates = report.incident.updates
    promised = [(p.made_by, p.promised_at, p.outcome) for p in report.promises]
    assert promised == [
        (updates[0].id, updates[0].next_update_at, PromiseOutcome.KEPT),
        (updates[1].id, updates[1].next_update_at, PromiseOutcome.MISSED),
        (updates[2].id, updates[2].next_update_at, PromiseOutcome.HELD),
        (updates[3].id, updates[3].next_update_at, PromiseOutcome.KEPT),
    ]
    kept, missed, held, _ = report.promises
    assert kept.settled_at == updates[1].created_at  # kept by the identified update
    assert missed.note == f"update #{updates[2].id} posted late"
    assert held.holding_update == updates[3].id
    assert [len(report.promises_with(o)) for o in PromiseOutcome] == [2, 1, 1, 0, 0]


def test_time_to_first_message_is_per_channel_from_the_start(
    story: Story,
) -> None:
    report = story.report
    first_update = report.incident.updates[0]
    channels = {c.channel: c for c in report.channels}
    assert list(channels) == ["status-page", "partners"]
    for name, channel in channels.items():
        # The channel's first successful post: of the first update, as the store has it.
        posted = [
            d.updated_at
            for d in story.succeeded[name]
            if d.update_id == first_update.id and d.action is DeliveryAction.POST
        ]
        assert channel.first_message_at == min(posted)
        assert channel.time_to_first_message_seconds == pytest.approx(
            (min(posted) - first_update.created_at).total_seconds()
        )
        assert 0 <= channel.time_to_first_message_seconds < 10
    earliest = min(channels.values(), key=lambda c: c.first_message_at or datetime.max)
    assert report.first_public_message_channel == earliest.channel


def test_failures_are_counted_per_channel_and_grouped_by_reason(
    story: Story,
) -> None:
    report = story.report
    channels = {c.channel: c for c in report.channels}
    partners = channels["partners"]
    # 5 updates to 3 targets each: pager refused all 5, mirror the first.
    assert partners.total == 15 and partners.failed == 6 and partners.succeeded == 9
    assert [(f.reason, f.state, f.count, f.recipients) for f in partners.failures] == [
        (PAGER_GONE, DeliveryState.FAILED, 5, ["pager"]),
        (MIRROR_REFUSED, DeliveryState.FAILED, 1, ["mirror"]),
    ]
    assert channels["status-page"].failures == [] and channels["status-page"].failed == 0

    markdown = render_markdown(report)
    assert "| partners | HTTP 410 | failed | 5 | pager |" in markdown
    assert "| partners | HTTP 400 | failed | 1 | mirror |" in markdown
    html = render_html(report)
    assert "HTTP 410" in html and "No delivery failed" not in html


def test_markdown_and_html_tell_the_same_story(
    story: Story,
) -> None:
    report = story.report
    markdown = render_markdown(report, svg_name="incident-1.svg")
    html = render_html(report)
    for text in (markdown, html):
        assert "Payments fail at checkout" in text
        assert "2 kept" in text and "1 missed" in text and "1 held" in text
        assert "Promise missed: no update by" in text
        assert "posted late" in text
    assert "![Communication timeline of incident #1](incident-1.svg)" in markdown
    # Timeline rows in the Markdown, in the report's order.
    rows = [line for line in markdown.splitlines() if line.startswith("| ") and " UTC | " in line]
    assert len(rows) >= len(report.timeline)
    assert "Opened: investigating" in rows[0]
    # The HTML carries the chart inline: one page to send around.
    assert html.count("<svg") == 1 and "<script" not in html


def test_svg_is_xml_with_a_mark_per_update_promise_and_channel(
    story: Story,
) -> None:
    report = story.report
    root = ET.fromstring(render_svg(report))
    assert root.tag == f"{SVG}svg"
    groups = [g.get("class", "") for g in root.iter(f"{SVG}g")]
    assert groups.count("update") == len(report.incident.updates) == 5
    assert groups.count("promise kept") == 2
    assert groups.count("promise missed") == 1
    assert groups.count("promise held") == 1
    assert groups.count("first-message") == 2
    assert "resolution" in groups
    # Each update mark says which update it is, for a reader hovering over it.
    titles = [g.findtext(f"{SVG}title") for g in root.iter(f"{SVG}g") if g.get("class") == "update"]
    assert [t.split(":")[0] if t else "" for t in titles] == [
        f"update #{u.id}" for u in report.incident.updates
    ]
    # Kept green, missed red.
    kept = next(g for g in root.iter(f"{SVG}g") if g.get("class") == "promise kept")
    missed = next(g for g in root.iter(f"{SVG}g") if g.get("class") == "promise missed")
    assert kept.find(f"{SVG}rect").get("fill") == "#2f9e44"  # type: ignore[union-attr]
    assert missed.find(f"{SVG}rect").get("fill") == "#e03131"  # type: ignore[union-attr]
    # Self-contained: nothing fetched from elsewhere, nothing run.
    text = render_svg(report)
    assert "href" not in text and "<script" not in text and "@import" not in text


async def test_untrusted_titles_and_summaries_are_escaped_everywhere(
    make_broadcaster: MakeBroadcaster, receiver: WebhookReceiver
) -> None:
    b = await open_broadcaster(make_broadcaster, receiver)
    title = "<script>alert('x')</script> & co"
    summary = "<img src=x onerror=alert(1)> | [click](https://evil.example)"
    opened = await b.publish(request(IncidentStatus.INVESTIGATING, summary, title=title))
    await b.wait()
    report = await build_report(b, opened.incident.id)

    html = render_html(report)
    assert "<script>" not in html and "<img" not in html
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; co" in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html

    root = ET.fromstring(render_svg(report))  # escaped: still well-formed XML
    assert title in [t.text for t in root.iter(f"{SVG}text")]

    markdown = render_markdown(report)
    assert re.search(r"(?<!\\)[<>]", markdown) is None  # every angle bracket escaped
    assert r"\[click\](https://evil.example)" in markdown  # no live link from a summary
    assert r"\<script\>alert('x')\</script\> \& co" in markdown
    # A "|" in a summary does not break the table row it sits in.
    (row,) = [line for line in markdown.splitlines() if "onerror" in line]
    assert row.count(" | ") == 1 and r"\|" in row

    # Control characters (a terminal escape, a vertical tab) are dropped everywhere.
    odd = await b.publish(request(IncidentStatus.INVESTIGATING, "x", title="Pay\x0bments \x1b[31m"))
    await b.wait()
    shown = await build_report(b, odd.incident.id)
    ET.fromstring(render_svg(shown))  # still well-formed XML
    for text in (render_markdown(shown), render_html(shown)):
        assert "\x1b" not in text and "\x0b" not in text and "31m" in text


async def test_an_incident_from_monitoring_starts_at_its_first_alert(
    make_broadcaster: MakeBroadcaster, receiver: WebhookReceiver
) -> None:
    routes = [{"name": "api", "match": {"service": "api"}, "title": "API errors",
               "fields": {"summary": "Some requests fail."}}]  # fmt: skip
    b = await open_broadcaster(make_broadcaster, receiver, routes=routes)
    fired = (datetime.now(UTC) - timedelta(minutes=3)).replace(microsecond=0)
    event = AlertEvent(source="alertmanager", group="g1", status="firing",
                       started_at=fired, labels={"service": "api"})  # fmt: skip
    drafted = await take_alert(b, event)
    assert drafted.action == "drafted" and drafted.draft_id is not None
    published = await b.approve(drafted.draft_id, actor="comms")
    await b.wait()
    report = await build_report(b, published.incident.id, timezone="Europe/Paris")

    assert report.started_from == "alert" and report.started_at == fired
    assert kinds(report)[:2] == [EventKind.ALERT, EventKind.ALERT_DRAFTED]
    assert "alertmanager" in report.timeline[0].text
    assert kinds(report).index(EventKind.OPENED) < kinds(report).index(EventKind.FIRST_MESSAGE)
    assert EventKind.APPROVED in kinds(report)
    # Three minutes of monitoring's lead, then the time it took to approve and send.
    for channel in report.channels:
        assert channel.time_to_first_message_seconds is not None
        assert 180 <= channel.time_to_first_message_seconds < 190
    # Times in the configured zone, with its abbreviation.
    markdown = render_markdown(report)
    local = fired.astimezone(ZoneInfo("Europe/Paris"))
    assert local.strftime("%Z") in ("CET", "CEST")
    assert f"**First alert:** {local:%Y-%m-%d %H:%M:%S %Z}" in markdown
    assert report.resolved_at is None and "not yet" in markdown


async def test_a_promise_the_scheduler_found_too_late_is_missed_with_its_reason(
    make_broadcaster: MakeBroadcaster, receiver: WebhookReceiver
) -> None:
    b = await open_broadcaster(make_broadcaster, receiver, cadence={"grace": "15m"})
    due = (datetime.now(UTC) + timedelta(minutes=30)).replace(microsecond=0)
    opened = await b.publish(request(IncidentStatus.INVESTIGATING, "Slow.", due))
    await b.wait()
    await b.scheduler.fire_due(due + timedelta(minutes=20))  # nothing was running
    report = await build_report(b, opened.incident.id)
    (promise,) = report.promises
    assert (promise.promised_at, promise.outcome) == (due, PromiseOutcome.MISSED)
    assert promise.note == "found 20 min late: nothing was running"
    assert len(report.incident.updates) == 1  # nothing went out for it


async def test_an_unknown_incident_or_zone_is_a_clear_error(
    make_broadcaster: MakeBroadcaster, receiver: WebhookReceiver
) -> None:
    b = await open_broadcaster(make_broadcaster, receiver)
    with pytest.raises(NotFoundError, match="no incident #42"):
        await build_report(b, 42)
    with pytest.raises(BroadcasterError, match="unknown time zone 'Mars/Olympus'"):
        await build_report(b, 1, timezone="Mars/Olympus")


# -- the command ---------------------------------------------------------------------------


@pytest.fixture
def cli(tmp_path: Path, thread_receiver: WebhookReceiver, monkeypatch: pytest.MonkeyPatch) -> Cli:
    for name in list(os.environ):
        if name.startswith("BROADCASTER_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv(SECRET_ENV, SECRET)
    monkeypatch.setenv("COLUMNS", "200")
    thread_receiver.script("pager", Behaviour(status=410))
    return Cli(write_config(tmp_path, thread_receiver, timezone="Asia/Tokyo"))


def test_report_command_writes_markdown_html_and_svg_and_prints_their_paths(
    cli: Cli, tmp_path: Path
) -> None:
    cli.ok("open", "--title", "Payments fail", "--set", "summary=Card payments fail.", "--yes")
    cli.ok("resolve", "1", "--set", "summary=Fixed.", "--yes")
    out = tmp_path / "reports" / "may"  # made when missing
    shown = cli.ok("report", "1", "--out", str(out)).stdout
    files = [out / f"incident-1.{ext}" for ext in ("md", "html", "svg")]
    assert [line.strip() for line in shown.splitlines()] == [str(f) for f in files]
    markdown, html, svg = (f.read_text() for f in files)
    assert "| partners | HTTP 410 | failed | 2 | pager |" in markdown
    assert " JST" in markdown  # the configured timezone
    assert "(incident-1.svg)" in markdown
    assert html.count("<svg") == 1 and "Payments fail" in html
    ET.fromstring(svg)

    only_md = tmp_path / "md-only"
    cli.ok("report", "1", "--out", str(only_md), "--format", "md")
    assert sorted(p.name for p in only_md.iterdir()) == ["incident-1.md", "incident-1.svg"]

    data = cli.json("report", "1")
    assert data["incident"]["id"] == 1 and data["resolved_at"] is not None
    (partners,) = [c for c in data["channels"] if c["channel"] == "partners"]
    assert partners["failures"][0]["reason"] == "HTTP 410"


def test_report_command_fails_cleanly(cli: Cli, tmp_path: Path) -> None:
    assert_one_line_error(cli("report", "7", "--out", str(tmp_path)), "no incident #7")
    assert not list(tmp_path.glob("incident-*"))
    cli.ok("open", "--title", "Payments fail", "--set", "summary=Card payments fail.", "--yes")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert_one_line_error(cli("report", "1", "--out", str(blocker)), "cannot write", "a-file")
    assert_one_line_error(cli("report", "1", "--format", "pdf"), "md, html or both")
    assert_one_line_error(cli("report", "1", "--timezone", "Nowhere/Land"), "unknown time zone")


def test_report_json_is_the_report_model(cli: Cli) -> None:
    cli.ok("open", "--title", "Payments fail", "--set", "summary=Card payments fail.", "--yes")
    data = cli.json("report", "1")
    report = IncidentReport.model_validate(data)
    assert report.timeline[0].kind is EventKind.OPENED
    assert report.timezone == "Asia/Tokyo"
    assert json.dumps(data)  # plain JSON


def test_report_through_a_remote_serve_is_the_same_report(
    tmp_path: Path, thread_receiver: WebhookReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.test_remote_cli import TOKENS, Remote, Server

    for name in list(os.environ):
        if name.startswith("BROADCASTER_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv(SECRET_ENV, SECRET)
    thread_receiver.script("pager", Behaviour(status=410))
    server = Server(tmp_path, thread_receiver)
    try:
        local = Cli(server.config)
        local.ok(
            "open", "--title", "Payments fail", "--set", "summary=Card payments fail.", "--yes"
        )
        reader = Remote(server.url, TOKENS["dashboard"])  # reading is enough
        remote_report = json.loads(reader.ok("report", "1", "--json"))
        local_report = local.json("report", "1")
        for report in (remote_report, local_report):
            report.pop("generated_at")
        assert remote_report == local_report
        assert remote_report["channels"][1]["failures"][0]["reason"] == PAGER_GONE
        out = tmp_path / "remote"
        reader.ok("report", "1", "--out", str(out), "--format", "html")
        assert "HTTP 410" in (out / "incident-1.html").read_text()
    finally:
        server.stop()
