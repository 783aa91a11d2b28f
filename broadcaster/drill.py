"""`broadcaster playbook drill NAME`: rehearse an emergency protocol on local simulators.

The user's config is copied into a throwaway folder with each channel the playbook goes
to pointed at a simulator (`broadcaster/sandbox/stand_ins.py`, shared with the demo): the
same languages, limits, rate limits, retries and ids, but the endpoints on 127.0.0.1 and
the simulators' credentials; a fresh SQLite store there; made-up subscribers on the
subscriber channels (never the real list). The playbook's update is published through a
real `Broadcaster` on that config, and each channel's timings are read from its
deliveries (`sent_at`: when the provider accepted each one).

Nothing real can be sent, by construction: every URL and host in the rewritten channel
configs and the secrets written for them is checked to be the loopback before anything
is published, the store is the drill folder's own, and the throwaway settings ignore
BROADCASTER_* variables (a BROADCASTER_STORE must not point a drill at the real store).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from enum import Enum
from pathlib import Path
from typing import Any

import tomli_w
from pydantic import BaseModel, Field, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource
from rich.console import Console
from rich.table import Table

from broadcaster.adapters import load_adapter
from broadcaster.config import Playbook, Settings, describe_validation_error
from broadcaster.core import Broadcaster
from broadcaster.errors import BroadcasterError, CheckFailedError, ConfigError
from broadcaster.models import ChannelProgress, Delivery, DeliveryState, NewSubscriber
from broadcaster.sandbox.stand_ins import (
    SecretFiles,
    StandIn,
    local_endpoint_problems,
    stand_in_for,
)
from broadcaster.views import watch_deliveries

STORE_FILE = "broadcaster.db"
HEADER = "# Written by `broadcaster playbook drill`"
LOOPBACK_PROMISE = (
    "nothing real is sent: every provider endpoint in the drill's config is 127.0.0.1 "
    "(checked before publishing)"
)
ACCEPTED = (DeliveryState.SENT, DeliveryState.DELIVERED)
SUBSCRIBER_BATCH = 2_000


class ChannelDrill(BaseModel):
    """How one channel did in a drill; seconds are counted from the publish."""

    channel: str
    type: str
    simulator: str = Field(description="where its simulator listened")
    deliveries: int
    accepted: int = Field(description="deliveries the provider accepted (sent or delivered)")
    first_accepted_seconds: float | None
    last_settled_seconds: float | None = Field(
        description="when its last delivery was accepted or failed for good"
    )
    failures: dict[str, int] = Field(
        default_factory=dict, description="why deliveries did not go out -> how many"
    )
    passed: bool


class SkippedChannel(BaseModel):
    channel: str
    type: str
    reason: str


class DrillReport(BaseModel):
    """What `broadcaster playbook drill` found."""

    playbook: str
    passed: bool
    verdict: str
    channels: list[ChannelDrill] = Field(default_factory=list)
    skipped: list[SkippedChannel] = Field(default_factory=list)
    check_failures: list[str] = Field(
        default_factory=list, description="the update failed its checks: nothing was sent"
    )
    subscribers_per_channel: int
    timed_out: bool = False
    seconds: float = Field(description="from the publish until every delivery settled")
    folder: str | None = Field(description="the drill's config, store and site (None: removed)")
    nothing_real: str = LOOPBACK_PROMISE


class _DrillSettings(Settings):
    """Settings read from the drill's own values only: no BROADCASTER_* variable may
    steer a drill to the real store or a real endpoint."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


def drilled_channel_names(settings: Settings, playbook: Playbook) -> list[str]:
    """The channels the playbook goes to: its own, else default_channels, else all."""
    names = playbook.channels or settings.default_channels or list(settings.channels)
    unknown = [n for n in names if n not in settings.channels]
    if unknown:
        raise ConfigError(
            f"{settings.config_path or 'settings'}: default_channels: unknown channel "
            f"'{unknown[0]}' — configured: {', '.join(settings.channels) or 'none'}"
        )
    return names


async def run_drill(
    settings: Settings,
    name: str,
    playbook: Playbook,
    *,
    folder: Path | None = None,
    subscribers: int = 20,
    timeout: float = 300.0,
    console: Console | None = None,
) -> DrillReport:
    """Rehearse playbook `name` on simulators in `folder` (default: a temporary folder,
    removed afterwards); `console` shows what happens as it happens."""
    if folder is None:
        with tempfile.TemporaryDirectory(prefix="broadcaster-drill-") as temporary:
            report = await _drill(
                settings, name, playbook, Path(temporary), subscribers, timeout, console, False
            )
        return report.model_copy(update={"folder": None})
    _check_folder(settings, folder)
    return await _drill(settings, name, playbook, folder, subscribers, timeout, console, True)


def _check_folder(settings: Settings, folder: Path) -> None:
    """The drill writes a config, a store, secret files and a status page into `folder`:
    only into a folder of its own — missing, empty, or made by an earlier drill — so it
    never writes over the user's config, store, secrets, session files or live site."""
    folder = folder.resolve()
    config = folder / "broadcaster.toml"
    mine = settings.config_path.resolve() if settings.config_path else None
    if config == mine or folder / STORE_FILE == _store_path(settings):
        raise BroadcasterError(
            f"--dir {folder} holds your own config or store — give the drill a folder of its own"
        )
    if not folder.exists() or not any(folder.iterdir()):
        return
    if not (config.is_file() and config.read_text().startswith(HEADER)):
        raise BroadcasterError(
            f"--dir {folder} is not empty and no drill made it — give the drill an empty "
            "folder of its own (or one an earlier drill made)"
        )


def _store_path(settings: Settings) -> Path | None:
    url = settings.store_url
    prefix = "sqlite+aiosqlite:///"
    return Path(url[len(prefix) :]).resolve() if url.startswith(prefix) else None


async def _drill(
    settings: Settings,
    name: str,
    playbook: Playbook,
    folder: Path,
    subscribers: int,
    timeout: float,
    console: Console | None,
    keep: bool,
) -> DrillReport:
    folder.mkdir(parents=True, exist_ok=True)
    # The simulators are on the loopback: never through a proxy of the environment (the
    # SDKs that honour HTTP_PROXY would send the drill's requests off this machine).
    for variable in ("NO_PROXY", "no_proxy"):
        present = [h.strip() for h in os.environ.get(variable, "").split(",") if h.strip()]
        missing = [h for h in ("127.0.0.1", "localhost") if h not in present]
        if missing:
            os.environ[variable] = ",".join([*present, *missing])
    for suffix in ("", "-wal", "-shm"):  # a fresh store on every run
        (folder / (STORE_FILE + suffix)).unlink(missing_ok=True)
    skipped: list[SkippedChannel] = []
    stand_ins: dict[str, StandIn[Any]] = {}
    for channel in drilled_channel_names(settings, playbook):
        written = settings.channels[channel]
        kind = str(written.get("type", ""))
        stand_in = stand_in_for(kind)
        if stand_in is None:
            reason = f"no simulator for its type '{kind}'"
            skipped.append(SkippedChannel(channel=channel, type=kind, reason=reason))
            continue
        try:  # the user's config as the channel will read it: its errors name their file
            load_adapter(kind).config_model.model_validate(written)
        except ValidationError as exc:
            where = f"channels.{channel}"
            raise ConfigError(describe_validation_error(exc, settings.config_path, where)) from None
        stand_in.expect(channel, written)
        stand_ins[channel] = stand_in
    if not stand_ins:
        raise BroadcasterError(
            f"nothing to drill: no channel of playbook '{name}' has a simulator "
            f"({', '.join(f'{s.channel} ({s.type})' for s in skipped) or 'no channels'})"
        )

    async with AsyncExitStack() as running:
        for stand_in in stand_ins.values():
            await stand_in.start(running)
        files = SecretFiles(folder)
        channels = {c: stand_in.point(c, files) for c, stand_in in stand_ins.items()}
        for config in channels.values():  # a fallback to a channel not drilled: none
            if config.get("fallback") not in (None, *channels):
                del config["fallback"]
        problems = local_endpoint_problems(channels, files)
        if problems:
            raise BroadcasterError(
                "drill refused, it would reach beyond this machine: " + "; ".join(problems)
            )
        drill_settings = _write_settings(settings, name, playbook, folder, channels)
        if console is not None:
            console.print(
                f"[bold]drill of playbook '{name}'[/] — {len(channels)} channel(s) on local "
                f"simulators, config {drill_settings.config_path}"
                + ("" if keep else " (removed afterwards; --dir keeps it)"),
                soft_wrap=True,
            )
            console.print(LOOPBACK_PROMISE, soft_wrap=True)
        return await _publish_and_measure(
            drill_settings,
            name,
            playbook,
            stand_ins,
            subscribers=subscribers,
            timeout=timeout,
            console=console,
            skipped=skipped,
            folder=folder,
        )


def _write_settings(
    settings: Settings,
    name: str,
    playbook: Playbook,
    folder: Path,
    channels: dict[str, dict[str, Any]],
) -> Settings:
    """The drill's broadcaster.toml (to look at afterwards) and its settings."""
    drilled = list(channels)
    cadence = settings.cadence.model_copy(
        update={
            "notify": [c for c in settings.cadence.notify if c in channels],
            "escalate_to": [c for c in settings.cadence.escalate_to if c in channels],
        }
    )
    values: dict[str, Any] = {
        "store": f"sqlite:///{STORE_FILE}",
        "data_dir": ".broadcaster",
        "page_title": settings.page_title,
        "timezone": settings.timezone,
        "languages": settings.languages,
        "default_channels": drilled,
        "components": settings.components,
        "channels": channels,
        "dispatch": settings.dispatch.model_dump(),
        "cadence": cadence.model_dump(),
        "playbooks": {name: playbook.model_copy(update={"channels": drilled}).model_dump()},
    }
    if settings.status_page_url is not None:
        values["status_page_url"] = settings.status_page_url
    if settings.templates_dir is not None:
        values["templates_dir"] = settings.resolve_path(settings.templates_dir).resolve()
    if settings.subscribers.default_region is not None:
        values["subscribers"] = {"default_region": settings.subscribers.default_region}
    values = _plain(values)
    path = folder / "broadcaster.toml"
    path.write_text(
        f"{HEADER} {name}: your config's channels on local simulators "
        "(nothing here reaches a real provider).\n" + tomli_w.dumps(values)
    )
    try:
        drill_settings = _DrillSettings(**values, config_path=path.resolve())
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, path)) from None
    if _store_path(drill_settings) != (folder / STORE_FILE).resolve():
        raise BroadcasterError(f"drill refused: its store is not in {folder}")  # a guard
    return drill_settings


def _plain(value: Any) -> Any:
    """Settings as TOML can hold them: durations in seconds, enums and paths as text."""
    if isinstance(value, Mapping):
        return {str(_plain(k)): _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    return value


async def _publish_and_measure(
    settings: Settings,
    name: str,
    playbook: Playbook,
    stand_ins: Mapping[str, StandIn[Any]],
    *,
    subscribers: int,
    timeout: float,
    console: Console | None,
    skipped: list[SkippedChannel],
    folder: Path,
) -> DrillReport:
    drilled = list(stand_ins)
    report = DrillReport(
        playbook=name,
        passed=False,
        verdict="",
        skipped=skipped,
        subscribers_per_channel=subscribers,
        seconds=0.0,
        folder=str(folder),
    )
    async with await Broadcaster.open(settings=settings) as broadcaster:
        await _add_made_up_subscribers(broadcaster, stand_ins, subscribers)
        if console is not None and broadcaster.audience.kinds:
            console.print(
                f"{subscribers} made-up subscribers on each of "
                f"{', '.join(broadcaster.audience.kinds)} (never your real list)",
                soft_wrap=True,
            )
        request = playbook.request(actor="drill", now=datetime.now(UTC))
        request = request.model_copy(update={"channels": drilled})
        published_at = datetime.now(UTC)
        started = time.monotonic()
        try:
            result = await broadcaster.publish(request)
        except CheckFailedError as exc:
            failures = [str(f) for f in exc.failures]
            return report.model_copy(
                update={
                    "check_failures": failures,
                    "verdict": "drill failed: the update did not pass its checks — "
                    "nothing was sent",
                }
            )
        update_id = result.update.id
        timed_out = False
        try:
            async with asyncio.timeout(timeout):
                if console is not None and console.is_terminal:
                    await watch_deliveries(broadcaster, [update_id], console)
                else:
                    await broadcaster.wait([update_id])
        except TimeoutError:
            timed_out = True
        seconds = time.monotonic() - started
        deliveries = await broadcaster.store.deliveries(update_id=update_id)
        progress = await broadcaster.store.progress(update_ids=[update_id])
    results = [
        _channel_result(
            channel,
            str(settings.channels[channel]["type"]),
            stand_ins[channel].where,
            [d for d in deliveries if d.channel == channel],
            published_at,
            broken=_broken(progress, channel),
            timeout=timeout if timed_out else None,
        )
        for channel in drilled
    ]
    passed = all(r.passed for r in results)
    return report.model_copy(
        update={
            "channels": results,
            "passed": passed,
            "verdict": _verdict(results, passed),
            "timed_out": timed_out,
            "seconds": round(seconds, 3),
        }
    )


async def _add_made_up_subscribers(
    broadcaster: Broadcaster, stand_ins: Mapping[str, StandIn[Any]], count: int
) -> None:
    """`count` subscribers on each subscriber channel, at addresses its simulator accepts,
    their languages spread over the channel's, following every component."""
    from broadcaster.subscribers import normalise

    number = 0
    for channel, kind in broadcaster.audience.kinds.items():
        languages = broadcaster.channels[channel].config.languages
        rows = []
        for index in range(count):
            number += 1
            new = NewSubscriber.model_validate(
                {
                    kind.field: stand_ins[channel].subscriber_address(channel, number),
                    "language": languages[index % len(languages)],
                    "channels": [channel],
                }
            )
            rows.append((new, normalise(new, None), [channel]))
        for start in range(0, len(rows), SUBSCRIBER_BATCH):
            results = await broadcaster.audience.rows.add_many(
                rows[start : start + SUBSCRIBER_BATCH], source="drill"
            )
            refused = next((r for r in results if isinstance(r, str)), None)
            if refused is not None:  # the stand-in made up an address its channel refuses
                raise BroadcasterError(f"drill: a made-up subscriber of {channel}: {refused}")


def _broken(progress: Sequence[ChannelProgress], channel: str) -> str | None:
    return next((p.broken for p in progress if p.channel == channel and p.broken), None)


def _channel_result(
    channel: str,
    kind: str,
    simulator: str,
    deliveries: Sequence[Delivery],
    published_at: datetime,
    *,
    broken: str | None,
    timeout: float | None,
) -> ChannelDrill:
    def since(at: datetime) -> float:
        return round((at - published_at).total_seconds(), 3)

    accepted = {d.id: d.sent_at for d in deliveries if d.state in ACCEPTED and d.sent_at}
    settled = [accepted.get(d.id) or d.updated_at for d in deliveries if not d.state.is_pending]
    failures: Counter[str] = Counter()
    for delivery in deliveries:
        if delivery.id in accepted:
            continue
        if delivery.state.is_pending:
            if broken is not None:
                failures[f"channel broken: {broken}"] += 1
            else:
                failures[f"still {delivery.state.value} after {timeout or 0:g} s"] += 1
        else:
            failures[delivery.last_error or delivery.state.value] += 1
    if not deliveries:
        failures["no deliveries"] += 1
    return ChannelDrill(
        channel=channel,
        type=kind,
        simulator=simulator,
        deliveries=len(deliveries),
        accepted=len(accepted),
        first_accepted_seconds=min(map(since, accepted.values()), default=None),
        last_settled_seconds=max((since(at) for at in settled), default=None),
        failures=dict(failures),
        passed=bool(deliveries) and len(accepted) == len(deliveries),
    )


def _verdict(results: Sequence[ChannelDrill], passed: bool) -> str:
    if passed:
        slowest = max((r.last_settled_seconds or 0.0) for r in results)
        return f"drill passed: every channel delivered within {slowest:.1f} s"
    failed = [
        f"{r.channel} ({r.deliveries - r.accepted} of {r.deliveries} not delivered)"
        if r.deliveries
        else f"{r.channel} (no deliveries)"
        for r in results
        if not r.passed
    ]
    return "drill failed: " + ", ".join(failed)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def print_report(report: DrillReport, console: Console) -> None:
    """The per-channel table and the verdict."""
    if report.check_failures:
        console.print("[bold red]the update failed its checks:[/]")
        for failure in report.check_failures:
            console.print(f"  {failure}", soft_wrap=True)
    if report.channels:
        table = Table(title=f"drill of playbook '{report.playbook}'")
        table.add_column("channel", no_wrap=True)
        for column in ("type", "delivered", "first accepted", "last settled", "failures"):
            table.add_column(column)
        for r in report.channels:
            table.add_row(
                r.channel,
                r.type,
                f"{r.accepted}/{r.deliveries}",
                _seconds(r.first_accepted_seconds),
                _seconds(r.last_settled_seconds),
                "; ".join(f"{reason} ({n})" for reason, n in r.failures.items()) or "-",
            )
        console.print(table)
    for skip in report.skipped:
        console.print(f"not drilled: {skip.channel} — {skip.reason}", soft_wrap=True)
    kept = f" — config, store and site kept in {report.folder}" if report.folder else ""
    colour = "green" if report.passed else "red"
    console.print(f"[bold {colour}]{report.verdict}[/]{kept}", soft_wrap=True)
