"""`broadcaster demo`: a whole incident rehearsed on local simulators, in a few seconds.

It writes a real broadcaster.toml into a folder, starts provider simulators on
127.0.0.1 — a webhook receiver (some of whose targets answer 429, 503, drop the
connection or refuse for good), Slack's Web API, Telegram's Bot API, a Bluesky PDS and a
Mastodon instance (each driven by the provider's real SDK), a Discord webhook and a Teams
Workflows webhook — and publishes investigating -> identified -> a correction of it ->
resolved through every channel, with live progress: follow-ups thread under the first
post on Slack, Telegram, Bluesky and Mastodon, and the correction edits the identified
post in place where the channel can edit. Subscribers imported from a CSV get each update
by SMS (a fake Twilio, whose signed delivery receipts come back to the demo's own app) and
email (a local SMTP server), in their language (`demo_audience`).
"""

from __future__ import annotations

import time
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import tomli_w
from rich.console import Console
from rich.rule import Rule

from broadcaster import demo_audience as audience
from broadcaster.config import load_settings
from broadcaster.core import Broadcaster
from broadcaster.models import ComponentState, IncidentStatus, ReminderKind, UpdateRequest
from broadcaster.sandbox import (
    Behaviour,
    FakeChat,
    FakeDiscord,
    FakeMastodon,
    FakePds,
    FakeSmtp,
    FakeTeamsWorkflow,
    FakeTelegram,
    FakeTwilio,
    SlackWebApi,
    WebhookReceiver,
)
from broadcaster.sandbox.stand_ins import SecretFiles, SmsStandIn, StandIn, stand_in_for
from broadcaster.views import failures_table, preview_view, progress_table, watch_deliveries

PARTNERS = 24
SLACK_CHANNEL = "C0VOLTSTATUS"
COMMS_CHANNEL = "C0VOLTCOMMS"  # the comms team's own channel: nudges land there
TELEGRAM_CHAT = FakeChat(id=-1001234567890, title="VoltCharge status", username="voltcharge")
BLUESKY_HANDLE = "status.voltcharge.example"
CORRECTED = -1  # stands for "the update before this one" in the steps below
FAST_RETRIES = {"backoff_seconds": 0.3, "backoff_max_seconds": 2.0, "deadline_seconds": 20}


def _channels() -> dict[str, dict[str, Any]]:
    """The demo's channels as a person writes them for the real providers (secrets from
    the environment); `_on_simulators` points each at its simulator."""
    fast = FAST_RETRIES
    return {
        "status-page": {"type": "banner", "languages": ["en", "fr"], "output": "public"},
        "partners": {
            "type": "webhook",
            "languages": ["en", "fr"],
            "targets": [
                {"name": f"partner-{i:02d}", "url": f"https://partner-{i:02d}.example/incidents"}
                for i in range(1, PARTNERS + 1)
            ],
            "secret": {"env": "PARTNERS_WEBHOOK_SECRET"},
            **fast,
        },
        "slack": {
            "type": "slack",
            "token": {"env": "SLACK_BOT_TOKEN"},
            "channels": [SLACK_CHANNEL],
            **fast,
        },
        "telegram": {
            "type": "telegram",
            "token": {"env": "TELEGRAM_BOT_TOKEN"},
            "chats": [TELEGRAM_CHAT.id],
            "languages": ["en", "fr"],
            **fast,
        },
        "bluesky": {
            "type": "bluesky",
            "handle": BLUESKY_HANDLE,
            "app_password": {"env": "BLUESKY_APP_PASSWORD"},
            **fast,
        },
        "mastodon": {
            "type": "mastodon",
            "base_url": "https://mastodon.example",
            "access_token": {"env": "MASTODON_TOKEN"},
            **fast,
        },
        "discord": {
            "type": "discord",
            "webhook_url": {"env": "DISCORD_WEBHOOK_URL"},
            "username": "VoltCharge status",
            **fast,
        },
        "teams": {"type": "teams", "webhook_url": {"env": "TEAMS_WEBHOOK_URL"}, **fast},
        # Not among default_channels: the team's own, told by the scheduler.
        "comms": {
            "type": "slack",
            "token": {"env": "SLACK_BOT_TOKEN"},
            "channels": [COMMS_CHANNEL],
            **fast,
        },
        **audience.channels(fast),
    }


@dataclass
class Simulators:
    """The providers the demo publishes to, all on 127.0.0.1."""

    receiver: WebhookReceiver
    slack: SlackWebApi
    telegram: FakeTelegram
    bluesky: FakePds
    mastodon: FakeMastodon
    discord: FakeDiscord
    teams: FakeTeamsWorkflow
    twilio: FakeTwilio
    smtp: FakeSmtp
    app_port: int  # the demo's own app, where Twilio's receipts come back


async def _on_simulators(
    running: AsyncExitStack, folder: Path, channels: dict[str, dict[str, Any]]
) -> tuple[Simulators, dict[str, dict[str, Any]]]:
    """One simulator per provider (both Slack channels in one workspace), started, and
    the channels' configs pointed at them, with their secrets in owner-only files."""
    # Twilio's signed receipts come back to the demo's own app.
    stand_ins: dict[str, StandIn[Any]] = {"sms": SmsStandIn(receipts=True)}
    for name, config in channels.items():
        kind = str(config["type"])
        stand_in = stand_ins.get(kind) or stand_ins.setdefault(kind, _stand_in(kind))
        stand_in.expect(name, config)
    simulator = {kind: await s.start(running) for kind, s in stand_ins.items()}
    files = SecretFiles(folder)
    pointed = {name: stand_ins[str(c["type"])].point(name, files) for name, c in channels.items()}
    sims = Simulators(
        receiver=simulator["webhook"],
        slack=simulator["slack"],
        telegram=simulator["telegram"],
        bluesky=simulator["bluesky"],
        mastodon=simulator["mastodon"],
        discord=simulator["discord"],
        teams=simulator["teams"],
        twilio=simulator["sms"],
        smtp=simulator["email"],
        app_port=audience.free_port(),
    )
    return sims, pointed


def _stand_in(kind: str) -> StandIn[Any]:
    stand_in = stand_in_for(kind)
    assert stand_in is not None, kind  # the demo uses built-in channel types only
    return stand_in


def _write_config(folder: Path, channels: dict[str, dict[str, Any]], app_port: int) -> Path:
    config = {
        "store": "sqlite:///broadcaster.db",
        "page_title": "VoltCharge status",
        "timezone": "Europe/Paris",
        "status_page_url": "https://status.voltcharge.example/",
        "default_channels": [
            "status-page",
            "partners",
            "slack",
            "telegram",
            "bluesky",
            "mastodon",
            "discord",
            "teams",
            "sms",
            "email",
        ],
        "components": {"app": "Mobile app", "api": "Charging API", "website": "Website"},
        "channels": channels,
        "cadence": {"notify": ["comms"]},
        "serve": {"public_url": f"http://127.0.0.1:{app_port}"},
    }
    path = folder / "broadcaster.toml"
    path.write_text(
        "# Written by `broadcaster demo`: a real config, pointing at local simulators.\n"
        + tomli_w.dumps(config)
    )
    return path


def _fresh_folder(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("broadcaster.db", "broadcaster.db-wal", "broadcaster.db-shm"):
        (folder / name).unlink(missing_ok=True)


async def run_demo(folder: Path, console: Console) -> None:
    """Rehearse investigating -> identified -> resolved, end to end, on simulators."""
    started = time.monotonic()
    _fresh_folder(folder)
    async with AsyncExitStack() as running:
        sims, channels = await _on_simulators(running, folder, _channels())
        receiver = sims.receiver
        # A realistic bad day at the receivers' end: the core retries what can be.
        receiver.script("partner-03", Behaviour(status=429, retry_after=1.0, times=1))
        receiver.script("partner-07", Behaviour(status=503, times=2))
        receiver.script("partner-11", Behaviour(drop=True, times=1))
        receiver.script("partner-13", Behaviour(status=410))
        config = _write_config(folder, channels, sims.app_port)
        settings = load_settings(config)
        console.print(f"[bold]incident-broadcaster demo[/] — config {config}")
        console.print(
            f"simulated receivers at {receiver.url}: partner-03 answers 429 once, partner-07 "
            "503 twice, partner-11 drops the connection once, partner-13 is gone (410); "
            f"Slack at {sims.slack.url}, Telegram at {sims.telegram.url}, Bluesky at "
            f"{sims.bluesky.url}, Mastodon at {sims.mastodon.url}, Discord at "
            f"{sims.discord.url}, Teams at {sims.teams.url}, Twilio at {sims.twilio.url}, "
            f"SMTP at 127.0.0.1:{sims.smtp.port}\n"
        )
        async with (
            await Broadcaster.open(settings=settings) as broadcaster,
            audience.inbound_app(broadcaster, sims.app_port),
        ):
            await audience.import_subscribers(broadcaster, console)
            now = datetime.now(UTC)
            identified = UpdateRequest(
                status=IncidentStatus.IDENTIFIED,
                fields={
                    "summary": "A faulty release of our payment service blocks new "
                    "charging sessions.",
                    "summary.fr": "Une version défectueuse de notre service de "
                    "paiement bloque les nouvelles recharges.",
                    "eta": "within the hour",
                    "eta.fr": "d'ici une heure",
                    "workaround": "Use the RFID card at the charger.",
                    "workaround.fr": "Utilisez le badge RFID à la borne.",
                },
                next_update_at=now + timedelta(minutes=30),
                actor="demo",
            )
            steps = [
                (
                    "1. Investigating",
                    False,
                    UpdateRequest(
                        status=IncidentStatus.INVESTIGATING,
                        title="Charging sessions cannot be started from the app",
                        components={
                            "app": ComponentState.MAJOR_OUTAGE,
                            "api": ComponentState.PARTIAL_OUTAGE,
                        },
                        fields={
                            "summary": "Starting a charge from the app fails for most users.",
                            "summary.fr": "Le démarrage d'une recharge depuis l'application "
                            "échoue pour la plupart des utilisateurs.",
                        },
                        next_update_at=now + timedelta(minutes=15),
                        actor="demo",
                    ),
                ),
                ("2. Identified", True, identified),
                (
                    "3. Correction of the identified update (the ETA was wrong)",
                    True,
                    identified.model_copy(
                        update={
                            "fields": {
                                **identified.fields,
                                "eta": "within two hours",
                                "eta.fr": "d'ici deux heures",
                            },
                            "corrects": CORRECTED,
                        }
                    ),
                ),
                ("4. The promised update comes due", True, PROMISE_DUE),
                (
                    "5. Resolved",
                    True,
                    UpdateRequest(
                        status=IncidentStatus.RESOLVED,
                        fields={
                            "summary": "The release was rolled back; charging works again.",
                            "summary.fr": "La version a été retirée ; la recharge fonctionne "
                            "de nouveau.",
                        },
                        actor="demo",
                    ),
                ),
            ]
            incident_id: int | None = None
            update_ids: list[int] = []
            receipted: set[str] = set()
            for heading, follow_up, step in steps:
                console.print(Rule(heading))
                if step is PROMISE_DUE:
                    assert incident_id is not None and identified.next_update_at is not None
                    held = await _promise_comes_due(
                        broadcaster, sims, identified.next_update_at, console
                    )
                    update_ids.append(held)
                    await watch_deliveries(broadcaster, [held], console)
                    await audience.report_receipts(broadcaster, sims.twilio, receipted)
                    continue
                request = step
                if step.corrects is CORRECTED:  # the update published just before
                    request = step.model_copy(update={"corrects": update_ids[-1]})
                target = incident_id if follow_up else None
                console.print(preview_view(await broadcaster.preview(request, target), max_lines=6))
                result = await broadcaster.publish(request, target)
                incident_id = result.incident.id
                update_ids.append(result.update.id)
                await watch_deliveries(broadcaster, [result.update.id], console)
                await audience.report_receipts(broadcaster, sims.twilio, receipted)
            assert incident_id is not None
            console.print(Rule("Result"))
            progress = await broadcaster.progress(incident_id)
            console.print(
                progress_table(progress, title=f"all deliveries of incident #{incident_id}")
            )
            failures = [d for p in progress for d in p.failures]
            if failures:
                console.print(failures_table(failures))
        signed = sum(1 for r in receiver.received if r.signature_valid)
        console.print(
            f"the simulator received {len(receiver.received)} webhooks "
            f"({signed} with a valid signature) after {len(receiver.attempts)} attempts"
        )
        console.print(_threads(sims))
        console.print(audience.summary(sims.twilio, sims.smtp))
    site = folder / "public" / "index.html"
    console.print(
        f"status page: [bold]{site}[/] (and {site.parent}/fr/index.html, banner.js, "
        "status.en.json, feed.atom)"
    )
    console.print(
        f"done in {time.monotonic() - started:.1f}s — explore with "
        f"`broadcaster --config {config} show {incident_id}`"
    )


# Stands for the step where no one posts the promised update: the scheduler acts.
PROMISE_DUE = UpdateRequest(status=IncidentStatus.IDENTIFIED, actor="scheduler")


async def _promise_comes_due(
    broadcaster: Broadcaster, sims: Simulators, promised: datetime, console: Console
) -> int:
    """Nobody posts the update the identified one promised: with the clock compressed,
    the team is nudged 5 minutes before, and a holding update goes out at the time. The
    holding update's id."""
    nudge_at = promised - broadcaster.settings.cadence.nudge_before
    console.print(
        f"[dim]clock compressed: now {nudge_at:%H:%M} UTC, the update promised for "
        f"{promised:%H:%M} UTC is not posted yet[/]"
    )
    await broadcaster.scheduler.fire_due(nudge_at)
    (nudge,) = [m for m in sims.slack.messages if m.channel == COMMS_CHANNEL]
    console.print(f"nudge to #{COMMS_CHANNEL} (the team's channel):")
    console.print(f"[dim]{nudge.text}[/]")
    console.print(f"[dim]clock compressed: now {promised:%H:%M} UTC and nothing was posted[/]")
    fired = await broadcaster.scheduler.fire_due(promised)
    outcome = next(r.outcome for r in fired if r.kind is ReminderKind.HOLDING)
    console.print(f"the scheduler published a {outcome}, promising the next one in 30 minutes")
    return int(str(outcome).rsplit("#", 1)[1])


def _threads(sims: Simulators) -> str:
    """What the social and chat simulators hold: a first post and its replies each, and
    how many posts the correction edited."""
    slack = [m for m in sims.slack.messages if m.channel == SLACK_CHANNEL]
    telegram = list(sims.telegram.posts.get(TELEGRAM_CHAT.id, {}).values())
    bluesky = sims.bluesky.posts
    mastodon = [p for p in sims.mastodon.posts if not p.deleted]
    discord = [m for m in sims.discord.messages if not m.deleted]
    return (
        f"Slack #{SLACK_CHANNEL}: {len(slack)} messages, "
        f"{sum(1 for m in slack if m.thread_ts)} in the first one's thread; "
        f"Telegram {TELEGRAM_CHAT.title}: {len(telegram)} messages, "
        f"{sum(1 for m in telegram if m.reply_to)} replies to the first, "
        f"{sum(1 for m in telegram if m.edited)} edited; "
        f"Bluesky @{BLUESKY_HANDLE}: {len(bluesky)} posts, "
        f"{sum(1 for p in bluesky if 'reply' in p.value)} replies; "
        f"Mastodon: {len(mastodon)} posts, "
        f"{sum(1 for p in mastodon if p.in_reply_to_id)} replies, "
        f"{sum(1 for p in mastodon if p.history)} edited; "
        f"Discord: {len(discord)} messages, {sum(1 for m in discord if m.edited)} edited; "
        f"Teams: {len(sims.teams.cards)} cards"
    )
