"""The `broadcaster` command: parse, call the core, print with rich.

Only typer is imported at start-up; the core, the store and the settings machinery are
imported by the command that needs them, so `broadcaster --help` stays fast.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import sys
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

import typer

if TYPE_CHECKING:
    from rich.console import Console

    from broadcaster.config import Playbook
    from broadcaster.core import Broadcaster, PublishResult
    from broadcaster.drill import DrillReport
    from broadcaster.models import ChannelProgress, Draft, Subscriber, UpdateRequest
    from broadcaster.operations import Operations

T = TypeVar("T")

app = typer.Typer(
    help="Tell your users, on every channel at once, that your service is down — "
    "and keep telling them until it is back.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
templates_app = typer.Typer(help="List, preview and check templates.", no_args_is_help=True)
db_app = typer.Typer(help="The store: migrations and backups.", no_args_is_help=True)
app.add_typer(templates_app, name="templates")
app.add_typer(db_app, name="db")
subscribers_app = typer.Typer(
    help="Add, import, list, export and erase subscribers (people told by SMS, email…).",
    no_args_is_help=True,
)
app.add_typer(subscribers_app, name="subscribers")
playbook_app = typer.Typer(
    help="Emergency protocols: a pre-approved update fired in one command, or rehearsed.",
    no_args_is_help=True,
)
app.add_typer(playbook_app, name="playbook")

_state: dict[str, Any] = {"config": None, "server": None}

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="broadcaster.toml to use (default: ./broadcaster.toml)"),
]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Show what would go out; send nothing.")]
Yes = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
Channels = Annotated[
    list[str] | None,
    typer.Option("--channel", metavar="NAME", help="Channel to publish to (repeatable)."),
]
Fields = Annotated[
    list[str] | None,
    typer.Option("--set", metavar="KEY=VALUE", help="Template field (repeatable)."),
]
Components = Annotated[
    list[str] | None,
    typer.Option(
        "--component",
        metavar="NAME=STATE",
        help="Affected component and its state, name=state (operational, degraded_performance, "
        "partial_outage, major_outage, under_maintenance). Repeatable.",
    ),
]
NextUpdate = Annotated[
    str | None,
    typer.Option("--next-update", metavar="DURATION", help="Promise the next update in 30m, 1h…"),
]
ImpactOption = Annotated[
    str | None, typer.Option("--impact", metavar="IMPACT", help="none, minor, major or critical")
]
Template = Annotated[
    str | None, typer.Option("--template", metavar="NAME", help="Template (default: the status)")
]
PublishKey = Annotated[
    str | None,
    typer.Option(
        "--publish-key", metavar="KEY", help="Publishing the same key twice sends nothing."
    ),
]
NoWait = Annotated[
    bool, typer.Option("--no-wait", help="Store and return; leave dispatch to `serve`/`dispatch`.")
]


def console(stderr: bool = False) -> Console:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def fail(message: str, code: int = 1) -> typer.Exit:
    console(stderr=True).print(f"[bold red]error:[/] {message}", soft_wrap=True)
    return typer.Exit(code)


def actor() -> str:
    return os.environ.get("BROADCASTER_ACTOR") or f"cli:{getpass.getuser()}"


def run(work: Callable[[Operations], Awaitable[T]]) -> T:
    """Run one command on the local store, or on the server of `--server`/BROADCASTER_URL."""
    if _state["server"] is None:
        return run_local(work)
    from broadcaster.errors import BroadcasterError

    token = os.environ.get("BROADCASTER_TOKEN", "").strip()
    if not token:
        raise fail(
            f"BROADCASTER_TOKEN is not set — the server {_state['server']} needs one of "
            "its serve.api_tokens"
        )

    async def main() -> T:
        from broadcaster.remote import RemoteBroadcaster

        async with RemoteBroadcaster(_state["server"], token, actor=actor()) as remote:
            return await work(remote)

    return run_async(main(), BroadcasterError)


def run_local(work: Callable[[Broadcaster], Awaitable[T]]) -> T:
    """Open the broadcaster, run one command, close; one clear line for any known error."""
    from broadcaster.errors import BroadcasterError

    if _state["server"] is not None:
        raise fail(
            "this command works on the store itself: run it where broadcaster.toml is, "
            "without --server or BROADCASTER_URL"
        )

    async def main() -> T:
        from broadcaster.core import Broadcaster

        async with await Broadcaster.open(_state["config"]) as broadcaster:
            return await work(broadcaster)

    return run_async(main(), BroadcasterError)


def run_async(coroutine: Coroutine[Any, Any, T], known: type[Exception]) -> T:
    import logging

    from rich.logging import RichHandler

    # Warnings (a channel found broken, deliveries resumed) above the live table.
    logging.basicConfig(
        level=logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=console(stderr=True), show_path=False, show_time=False)],
    )
    from broadcaster.runtime import run as run_loop

    try:
        return run_loop(coroutine)
    except known as exc:
        raise fail(str(exc)) from None
    except KeyboardInterrupt:
        raise fail(
            "interrupted — what was not sent stays queued and is resumed by the next "
            "`broadcaster dispatch` (or any publishing command, or `serve`)",
            130,
        ) from None


@app.callback()
def main_options(
    config: ConfigOption = None,
    server: Annotated[
        str | None,
        typer.Option(
            "--server",
            envvar="BROADCASTER_URL",
            metavar="URL",
            help="Act through this `broadcaster serve` (its /v1 API, with BROADCASTER_TOKEN) "
            "instead of a local store.",
        ),
    ] = None,
) -> None:
    """Global options."""
    _state["config"] = config
    _state["server"] = server


# -- publishing ------------------------------------------------------------------------


def _pairs(values: list[str] | None, what: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for value in values or []:
        key, sep, val = value.partition("=")
        if not sep or not key.strip():
            raise fail(f"{what} '{value}' is not key=value")
        pairs[key.strip()] = val
    return pairs


def _request(
    *,
    status: str,
    title: str | None,
    template: str | None,
    impact: str | None,
    components: list[str] | None,
    fields: list[str] | None,
    next_update: str | None,
    channels: list[str] | None,
    publish_key: str | None,
) -> UpdateRequest:
    from pydantic import ValidationError

    from broadcaster.config import parse_duration
    from broadcaster.models import UpdateRequest

    next_update_at = None
    if next_update:
        try:
            next_update_at = datetime.now(UTC) + parse_duration(next_update)
        except ValueError as exc:
            raise fail(f"--next-update: {exc}") from None
    try:
        return UpdateRequest(
            status=status,
            title=title,
            template=template,
            impact=impact,
            components=_pairs(components, "--component"),
            fields=_pairs(fields, "--set"),
            next_update_at=next_update_at,
            channels=channels or None,
            publish_key=publish_key,
            actor=actor(),
        )
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"])
        raise fail(f"{where}: {error['msg']}") from None


async def _publish_flow(
    broadcaster: Operations,
    request: UpdateRequest,
    incident_id: int | None,
    *,
    dry_run: bool,
    yes: bool,
    wait: bool,
    as_json: bool,
) -> None:
    from broadcaster.views import preview_view

    out = console()
    preview = await broadcaster.preview(request, incident_id)
    if not as_json or dry_run:
        if as_json:
            out.print_json(preview.model_dump_json())
        else:
            out.print(preview_view(preview))
    if not preview.ok:
        if as_json and not dry_run:  # the checks were not printed: say them here
            failed = "; ".join(str(f) for f in preview.failures)
            raise fail(f"nothing was sent, {len(preview.failures)} check(s) failed: {failed}")
        raise fail("nothing was sent: fix the checks above")
    # With --json, stdout is JSON only; the words for people go to stderr.
    notes = console(stderr=as_json)
    if dry_run:
        notes.print("[dim]dry run: nothing stored, nothing sent[/]")
        return
    names = ", ".join(r.channel for r in preview.renders)
    _confirm(yes, f"Publish to {names}?")
    result = await broadcaster.publish(request, incident_id)
    if not result.new:
        notes.print(
            f"[yellow]publish key seen before: update #{result.update.id} of incident "
            f"#{result.incident.id} was already published — nothing new sent[/]"
        )
    elif not as_json:
        out.print(
            f"[green]published[/] update #{result.update.id} of incident "
            f"#{result.incident.id} ({result.update.status.value})"
        )
    final = await _watch(broadcaster, [result.update.id], quiet=as_json) if wait else []
    if as_json:
        _print_json(_result_json(result, final))
    _fail_if_broken(final, result.incident.id)


def _confirm(yes: bool, question: str) -> None:
    """Ask before anything goes out; scripts say --yes."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise fail("refusing to go on without confirmation — pass --yes in scripts")
    if not typer.confirm(question, default=False):
        raise fail("stopped: nothing was done")


def _fail_if_broken(progress: list[ChannelProgress], incident_id: int | None) -> None:
    broken = [p for p in progress if p.broken]
    if broken:
        again = f"broadcaster retry {incident_id}" if incident_id else "broadcaster dispatch"
        raise fail(
            f"channel {broken[0].channel} is broken ({broken[0].broken}); its "
            f"{broken[0].pending} deliveries stay queued — fix it, then run `{again}`",
            2,
        )


def _result_json(result: PublishResult, progress: list[ChannelProgress]) -> dict[str, Any]:
    from broadcaster.views import progress_json

    return {
        "incident_id": result.incident.id,
        "update_id": result.update.id,
        "new": result.new,
        "deliveries": progress_json(progress),
    }


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


async def _watch(
    broadcaster: Operations, update_ids: list[int] | None, *, quiet: bool = False
) -> list[ChannelProgress]:
    from broadcaster.views import watch_deliveries

    if quiet:
        return await broadcaster.wait(update_ids)
    return await watch_deliveries(broadcaster, update_ids, console())


@app.command("open")
def open_incident(
    title: Annotated[
        str, typer.Option("--title", metavar="TEXT", help="What is broken, for everyone to read.")
    ],
    status: Annotated[str, typer.Option(help="investigating, identified or monitoring")] = (
        "investigating"
    ),
    template: Template = None,
    impact: ImpactOption = None,
    component: Components = None,
    set_: Fields = None,
    next_update: NextUpdate = None,
    channel: Channels = None,
    publish_key: PublishKey = None,
    dry_run: DryRun = False,
    yes: Yes = False,
    no_wait: NoWait = False,
    as_json: AsJson = False,
) -> None:
    """Open an incident and publish its first update."""
    request = _request(
        status=status,
        title=title,
        template=template,
        impact=impact,
        components=component,
        fields=set_,
        next_update=next_update,
        channels=channel,
        publish_key=publish_key,
    )
    run(
        lambda b: _publish_flow(
            b, request, None, dry_run=dry_run, yes=yes, wait=not no_wait, as_json=as_json
        )
    )


@app.command("update")
def update_incident(
    incident_id: Annotated[int, typer.Argument(help="Incident number")],
    status: Annotated[str, typer.Option(help="investigating, identified or monitoring")],
    title: Annotated[str | None, typer.Option(help="A corrected title")] = None,
    template: Template = None,
    impact: ImpactOption = None,
    component: Components = None,
    set_: Fields = None,
    next_update: NextUpdate = None,
    channel: Channels = None,
    publish_key: PublishKey = None,
    correct: Annotated[
        bool,
        typer.Option(
            "--correct",
            help="Correct the latest update: channels that can edit change its posts in "
            "place, the others post this one as a follow-up.",
        ),
    ] = False,
    dry_run: DryRun = False,
    yes: Yes = False,
    no_wait: NoWait = False,
    as_json: AsJson = False,
) -> None:
    """Publish a follow-up update of an incident (threaded under its first post)."""
    request = _request(
        status=status,
        title=title,
        template=template,
        impact=impact,
        components=component,
        fields=set_,
        next_update=next_update,
        channels=channel,
        publish_key=publish_key,
    )

    async def work(b: Operations) -> None:
        corrected = request
        if correct:
            latest = (await b.incident(incident_id)).last_update
            if latest is None:
                raise fail(f"incident #{incident_id} has no update to correct")
            corrected = request.model_copy(update={"corrects": latest.id})
        await _publish_flow(
            b, corrected, incident_id, dry_run=dry_run, yes=yes, wait=not no_wait, as_json=as_json
        )

    run(work)


@app.command("resolve")
def resolve_incident(
    incident_id: Annotated[int, typer.Argument(help="Incident number")],
    template: Template = None,
    component: Components = None,
    set_: Fields = None,
    channel: Channels = None,
    publish_key: PublishKey = None,
    dry_run: DryRun = False,
    yes: Yes = False,
    no_wait: NoWait = False,
    as_json: AsJson = False,
) -> None:
    """Resolve an incident: every affected component back to operational unless told."""
    request = _request(
        status="resolved",
        title=None,
        template=template,
        impact=None,
        components=component,
        fields=set_,
        next_update=None,
        channels=channel,
        publish_key=publish_key,
    )
    run(
        lambda b: _publish_flow(
            b, request, incident_id, dry_run=dry_run, yes=yes, wait=not no_wait, as_json=as_json
        )
    )


@app.command("drafts")
def list_drafts(as_json: AsJson = False) -> None:
    """Updates held for approval (from monitoring alerts), oldest first, then updates
    held by flapping damping, with when they go out by themselves."""
    from rich.table import Table

    from broadcaster.models import DraftState

    async def waiting(b: Operations) -> list[Draft]:
        return [*await b.drafts(), *await b.drafts(state=DraftState.HELD)]

    drafts = run(waiting)
    if as_json:
        _print_json([d.model_dump(mode="json") for d in drafts])
        return
    table = Table()
    for column in ("draft", "received", "from", "incident", "status", "title", "goes out"):
        table.add_column(column)
    for d in drafts:
        table.add_row(
            f"#{d.id}",
            f"{d.created_at:%Y-%m-%d %H:%M}",
            f"{d.source}/{d.route}",
            f"#{d.incident_id}" if d.incident_id else "new",
            d.request.status.value,
            d.request.title or "",
            f"{d.not_before:%Y-%m-%d %H:%M:%S} UTC, unless it fires again"
            if d.not_before
            else "when approved",
        )
    console().print(table if drafts else "no drafts waiting")


PlaybookName = Annotated[str, typer.Argument(metavar="NAME", help="A playbook of the config")]


async def _playbook(b: Operations, name: str) -> Playbook:
    return _find_playbook(await b.playbooks(), name)


def _find_playbook(playbooks: dict[str, Playbook], name: str) -> Playbook:
    from broadcaster.errors import NotFoundError

    if name not in playbooks:
        known = ", ".join(playbooks) or "none — add [playbooks.NAME] to the config"
        raise NotFoundError(f"no playbook '{name}' — configured: {known}")
    return playbooks[name]


@playbook_app.command("list")
def playbook_list(as_json: AsJson = False) -> None:
    """The configured emergency protocols."""
    from rich.table import Table

    playbooks = run(lambda b: b.playbooks())
    if as_json:
        _print_json({n: p.model_dump(mode="json") for n, p in playbooks.items()})
        return
    table = Table()
    for column in ("playbook", "what for", "title", "impact", "channels", "next update"):
        table.add_column(column)
    for name, p in playbooks.items():
        promise = p.next_update_in
        table.add_row(
            name,
            p.description,
            p.title,
            p.impact.value,
            ", ".join(p.channels) if p.channels else "default channels",
            f"in {int(promise.total_seconds() // 60)} min" if promise else "-",
        )
    console().print(table if playbooks else "no playbooks: add [playbooks.NAME] to the config")


@playbook_app.command("run")
def playbook_run(
    name: PlaybookName,
    set_: Fields = None,
    dry_run: DryRun = False,
    yes: Yes = False,
    no_wait: NoWait = False,
    as_json: AsJson = False,
) -> None:
    """Open an incident with the playbook's pre-approved update, on all its channels at
    once, after one confirmation (--dry-run shows it first)."""
    fields = _pairs(set_, "--set")

    async def work(b: Operations) -> None:
        playbook = await _playbook(b, name)
        request = playbook.request(actor=actor(), now=datetime.now(UTC), fields=fields)
        await _publish_flow(
            b, request, None, dry_run=dry_run, yes=yes, wait=not no_wait, as_json=as_json
        )

    run(work)


@playbook_app.command("drill")
def playbook_drill(
    name: PlaybookName,
    folder: Annotated[
        Path | None,
        typer.Option(
            "--dir",
            help="Keep the drill's config, store and site here (default: a temporary "
            "folder, removed).",
        ),
    ] = None,
    subscribers: Annotated[
        int,
        typer.Option(
            "--subscribers",
            min=1,
            max=100_000,
            metavar="N",
            help="Made-up subscribers per subscriber channel (never your real list).",
        ),
    ] = 20,
    timeout: Annotated[
        float,
        typer.Option("--timeout", min=1, metavar="SECONDS", help="Give up waiting after this."),
    ] = 300.0,
    as_json: AsJson = False,
) -> None:
    """Rehearse the playbook with every channel redirected to local simulators: nothing
    real is sent. Prints how long each channel took; exits 1 if one did not deliver."""
    if _state["server"] is not None:
        raise fail(
            "playbook drill works on the local config: run it where broadcaster.toml is, "
            "without --server or BROADCASTER_URL"
        )
    from broadcaster.errors import BroadcasterError

    async def work() -> DrillReport:
        from broadcaster.config import load_settings
        from broadcaster.drill import run_drill

        settings = load_settings(_state["config"])
        playbook = _find_playbook(settings.playbooks, name)
        return await run_drill(
            settings,
            name,
            playbook,
            folder=folder.resolve() if folder else None,
            subscribers=subscribers,
            timeout=timeout,
            console=None if as_json else console(),
        )

    report = run_async(work(), BroadcasterError)
    if as_json:
        _print_json(report.model_dump(mode="json"))
    else:
        from broadcaster.drill import print_report

        print_report(report, console())
    raise typer.Exit(0 if report.passed else 1)


@app.command("schedule")
def show_schedule(as_json: AsJson = False) -> None:
    """What the scheduler fires next: nudges before promised updates, holding updates when
    they are due (see [cadence] in the README)."""
    from rich.table import Table

    from broadcaster.models import ReminderKind

    reminders = run(lambda b: b.schedule())
    if as_json:
        _print_json([r.model_dump(mode="json") for r in reminders])
        return
    table = Table()
    for column in ("when (UTC)", "incident", "what", "about (UTC)"):
        table.add_column(column)
    for r in reminders:
        table.add_row(
            f"{r.due_at:%Y-%m-%d %H:%M:%S}",
            f"#{r.incident_id}",
            {
                ReminderKind.NUDGE: "nudge the team",
                ReminderKind.HOLDING: "holding update, unless one is posted",
                ReminderKind.NOTICE: "maintenance notice again",
                ReminderKind.START: "maintenance started",
                ReminderKind.END: "maintenance completed",
                ReminderKind.ESCALATE: "escalate, unless resolved",
            }[r.kind],
            f"{r.promised_at:%Y-%m-%d %H:%M}",
        )
    console().print(
        table if reminders else "nothing scheduled: no open incident promised an update"
    )


@app.command("approve")
def approve(
    draft_id: Annotated[int, typer.Argument(help="Draft number (`broadcaster drafts`)")],
    dry_run: DryRun = False,
    yes: Yes = False,
    no_wait: NoWait = False,
) -> None:
    """Publish a draft as it was drafted, after showing what will go out."""
    from broadcaster.views import preview_view

    async def work(b: Operations) -> None:
        draft = await b.draft(draft_id)
        out = console()
        preview = await b.preview(draft.request, draft.incident_id)
        out.print(preview_view(preview))
        if not preview.ok:
            raise fail("this draft fails its checks — reject it and publish by hand")
        if dry_run:
            out.print("[dim]dry run: nothing stored, nothing sent[/]")
            return
        _confirm(yes, f"Publish draft #{draft_id}?")
        result = await b.approve(draft_id, actor=actor())
        out.print(
            f"[green]published[/] draft #{draft_id} as update #{result.update.id} of "
            f"incident #{result.incident.id}"
        )
        if not no_wait:
            _fail_if_broken(await _watch(b, [result.update.id]), result.incident.id)

    run(work)


@app.command("reject")
def reject(draft_id: Annotated[int, typer.Argument(help="Draft number")]) -> None:
    """Drop a draft: nothing is sent; the audit trail records who rejected it."""
    run(lambda b: b.reject(draft_id, actor=actor()))
    console().print(f"rejected draft #{draft_id}")


@app.command("dispatch")
def dispatch() -> None:
    """Send everything still queued (after a crash or an interrupted run), until settled."""

    async def work(b: Broadcaster) -> None:
        _fail_if_broken(await _watch(b, None), None)

    run_local(work)


# -- reading -----------------------------------------------------------------------------


@app.command("incidents")
def list_incidents(
    open_only: Annotated[bool, typer.Option("--open", help="Only unresolved incidents.")] = False,
    as_json: AsJson = False,
) -> None:
    """List incidents, newest first."""
    from broadcaster.views import incidents_table

    incidents = run(lambda b: b.incidents(open_only=open_only))
    if as_json:
        _print_json([i.model_dump(mode="json") for i in incidents])
    else:
        console().print(incidents_table(incidents))


@app.command("show")
def show_incident(
    incident_id: Annotated[int, typer.Argument(help="Incident number")], as_json: AsJson = False
) -> None:
    """One incident with its updates and its audit trail."""
    from broadcaster.views import incident_view

    async def work(b: Operations) -> tuple[Any, Any]:
        return await b.incident(incident_id), await b.audit(incident_id)

    incident, audit = run(work)
    if as_json:
        _print_json(
            {
                **incident.model_dump(mode="json"),
                "audit": [a.model_dump(mode="json") for a in audit],
            }
        )
    else:
        console().print(incident_view(incident, audit))


@app.command("status")
def delivery_status(
    incident_id: Annotated[int, typer.Argument(help="Incident number")],
    channel: Annotated[str | None, typer.Option(help="Only this channel.")] = None,
    failed: Annotated[bool, typer.Option("--failed", help="List every failed delivery.")] = False,
    as_json: AsJson = False,
) -> None:
    """Deliveries of an incident per channel: counts by state, failures with their error."""
    from broadcaster.models import FAILED_STATES
    from broadcaster.views import failures_table, progress_json, progress_table

    async def work(b: Operations) -> tuple[Any, Any]:
        progress = await b.progress(incident_id, channel=channel)
        failures = (
            await b.deliveries(incident_id, channel=channel, states=FAILED_STATES)
            if failed
            else None
        )
        return progress, failures

    progress, failures = run(work)
    if as_json:
        data: dict[str, Any] = {"incident_id": incident_id, "channels": progress_json(progress)}
        if failures is not None:
            data["failed"] = [d.model_dump(mode="json") for d in failures]
        _print_json(data)
        return
    out = console()
    out.print(progress_table(progress, title=f"deliveries of incident #{incident_id}"))
    shown = failures if failures is not None else [d for p in progress for d in p.failures]
    if shown:
        out.print(failures_table(shown))


@app.command("report")
def incident_report(
    incident_id: Annotated[int, typer.Argument(help="Incident number")],
    out: Annotated[
        Path, typer.Option("--out", metavar="DIR", help="Folder to write into (default: here).")
    ] = Path("."),
    fmt: Annotated[
        str, typer.Option("--format", metavar="FORMAT", help="md, html or both.")
    ] = "both",
    timezone: Annotated[
        str | None,
        typer.Option(metavar="ZONE", help="Show times in this zone (default: `timezone`)."),
    ] = None,
    as_json: AsJson = False,
) -> None:
    """The post-incident communication report: timeline, time to first message per
    channel, deliveries and failures, promises kept or missed, and a timeline chart."""
    formats: dict[str, Literal["md", "html", "both"]] = {"md": "md", "html": "html", "both": "both"}
    if fmt not in formats:
        raise fail(f"--format {fmt}: use md, html or both")
    from broadcaster.report import IncidentReport, build_report, write_report

    async def work(b: Operations) -> IncidentReport:
        # The configured zone when the store is local; a remote server's is not known here.
        settings = getattr(b, "settings", None)
        zone = timezone or getattr(settings, "timezone", None) or "UTC"
        return await build_report(b, incident_id, timezone=zone)

    report = run(work)
    if as_json:
        _print_json(report.model_dump(mode="json"))
        return
    try:
        paths = write_report(report, out, formats[fmt])
    except OSError as exc:
        raise fail(f"cannot write the report to {out}: {exc.strerror or exc}") from None
    for path in paths:
        console().print(str(path), soft_wrap=True)


@app.command("retry")
def retry(
    incident_id: Annotated[int, typer.Argument(help="Incident number")],
    channel: Annotated[str | None, typer.Option(help="Only this channel.")] = None,
    no_wait: NoWait = False,
) -> None:
    """Queue the failed deliveries of an incident's latest update again, and send them."""

    async def work(b: Operations) -> None:
        requeued, skipped = await b.retry(incident_id, channel=channel, actor=actor())
        out = console()
        out.print(f"requeued {requeued} failed deliveries")
        if skipped:
            out.print(
                f"[dim]skipped {skipped} of older updates (the latest update supersedes them)[/]"
            )
        if not no_wait:  # also sends what a broken channel had left queued
            _fail_if_broken(await _watch(b, None), incident_id)

    run(work)


@app.command("cancel")
def cancel(
    incident_id: Annotated[int, typer.Argument(help="Incident number")],
    update_id: Annotated[
        int | None, typer.Option("--update", help="Update number (default: the latest)")
    ] = None,
    yes: Yes = False,
) -> None:
    """The kill switch: stop a published update that is still going out."""

    async def work(b: Operations) -> None:
        incident = await b.incident(incident_id)
        target = update_id or (incident.updates[-1].id if incident.updates else None)
        if target is None or target not in {u.id for u in incident.updates}:
            raise fail(f"incident #{incident_id} has no update #{target}")
        _confirm(yes, f"Cancel update #{target}?")
        cancelled = await b.cancel(target, actor=actor())
        console().print(
            f"cancelled update #{target}: {cancelled} queued deliveries stopped "
            "(already sent ones stay sent)"
        )

    run(work)


@app.command("retract")
def retract(
    incident_id: Annotated[int, typer.Argument(help="Incident number")],
    update_id: Annotated[
        int | None, typer.Option("--update", help="Update number (default: the latest)")
    ] = None,
    dry_run: DryRun = False,
    yes: Yes = False,
    no_wait: NoWait = False,
) -> None:
    """Take a wrong update back: stop what is queued, delete its posts where the channel
    can, and drop it from the status page."""
    from broadcaster.views import retraction_table

    async def work(b: Operations) -> None:
        incident = await b.incident(incident_id)
        latest = incident.last_update
        target = update_id or (latest.id if latest else None)
        if target is None or target not in {u.id for u in incident.updates}:
            raise fail(f"incident #{incident_id} has no update #{target}")
        out = console()
        plan = await b.retract(target, actor=actor(), dry_run=True)
        out.print(retraction_table(plan, title=f"retracting update #{target}"))
        if dry_run:
            out.print("[dim]dry run: nothing was changed[/]")
            return
        _confirm(yes, f"Retract update #{target}?")
        await b.retract(target, actor=actor())
        out.print(f"retracted update #{target}")
        if not no_wait:
            _fail_if_broken(await _watch(b, [target]), incident_id)

    run(work)


# -- subscribers -------------------------------------------------------------------------

Full = Annotated[
    bool, typer.Option("--full", help="Show phone numbers and emails whole (masked by default).")
]
SubscriberId = Annotated[int, typer.Argument(metavar="ID", help="Subscriber number")]


def _addresses(subscriber: Subscriber) -> str:
    """A subscriber's addresses as a person may see them in passing: masked."""
    from broadcaster.models import AddressKind
    from broadcaster.subscribers import mask

    given = (subscriber.address(kind) for kind in AddressKind)
    return ", ".join(mask(a) for a in given if a)


@subscribers_app.command("add")
def subscribers_add(
    phone: Annotated[
        str | None,
        typer.Option(
            metavar="NUMBER",
            help="Phone number with +country code (or as subscribers.default_region writes it).",
        ),
    ] = None,
    email: Annotated[str | None, typer.Option(metavar="ADDRESS", help="Email address.")] = None,
    webhook_url: Annotated[
        str | None,
        typer.Option(
            metavar="URL",
            help="https URL that receives each update, signed (a public address, unless "
            "the webhook channel's allow_networks allows it).",
        ),
    ] = None,
    language: Annotated[
        str, typer.Option(metavar="LANG", help="Language they are told in (en, fr…).")
    ] = "en",
    component: Annotated[
        list[str] | None,
        typer.Option(
            "--component", metavar="NAME", help="Component they follow (repeatable; default: all)."
        ),
    ] = None,
    channel: Annotated[
        list[str] | None,
        typer.Option(
            "--channel",
            metavar="NAME",
            help="Subscriber channel they agreed to (repeatable; default: every one their "
            "addresses reach).",
        ),
    ] = None,
    timezone: Annotated[
        str | None, typer.Option(metavar="ZONE", help="Their time zone (Europe/Paris).")
    ] = None,
    full: Full = False,
    as_json: AsJson = False,
) -> None:
    """Add a subscriber who asked to be told; they are subscribed to their channels."""
    from pydantic import ValidationError

    from broadcaster.models import NewSubscriber
    from broadcaster.views import subscriber_json

    try:
        new = NewSubscriber(
            phone=phone,
            email=email,
            webhook_url=webhook_url,
            language=language,
            components=component or None,
            channels=channel or None,
            timezone=timezone,
        )
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"])
        raise fail(f"--{where}: {error['msg']}") from None
    subscriber = run(lambda b: b.add_subscriber(new, actor=actor()))
    if as_json:
        _print_json(subscriber_json(subscriber, full=full))
        return
    console().print(
        f"added subscriber #{subscriber.id} ({_addresses(subscriber)}) to "
        f"{', '.join(subscriber.channels)}"
    )
    for name, secret in (subscriber.webhook_secrets or {}).items():
        # Theirs alone: it verifies only their updates (see `subscribers export`).
        console().print(
            f"signing secret for {name} — give it to the subscriber, who verifies each "
            f"update with it: {secret}",
            soft_wrap=True,
        )


@subscribers_app.command("import")
def subscribers_import(
    file: Annotated[
        Path,
        typer.Argument(
            metavar="FILE.csv",
            help="CSV, UTF-8, with a header row naming columns among phone, email, language, "
            "components, timezone, channels ('-': standard input).",
        ),
    ],
    as_json: AsJson = False,
) -> None:
    """Add or update a subscriber per row. Refused rows are listed with their line and
    reason and the others are stored: fix those lines and import the file again (an
    import run twice changes nothing, and an opt-out stands)."""
    from broadcaster.views import rejected_table

    try:
        data = sys.stdin.buffer.read() if str(file) == "-" else file.read_bytes()
    except OSError as exc:
        raise fail(f"cannot read {file}: {exc.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise fail(f"{file} is not UTF-8 text — save it as CSV UTF-8") from None
    report = run(lambda b: b.import_subscribers(text, actor=actor()))
    if as_json:
        _print_json(report.model_dump(mode="json"))
        return
    out = console()
    out.print(f"added {report.added}, updated {report.updated}, rejected {len(report.rejected)}")
    if report.rejected:
        out.print(rejected_table(report.rejected))


@subscribers_app.command("list")
def subscribers_list(
    channel: Annotated[
        str | None, typer.Option(metavar="NAME", help="Only those subscribed to this channel.")
    ] = None,
    after: Annotated[
        int, typer.Option(metavar="ID", min=0, help="Start after this subscriber (next page).")
    ] = 0,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="At most this many.")] = 100,
    full: Full = False,
    as_json: AsJson = False,
) -> None:
    """Subscribers by number, with the channels they are subscribed to or opted out of."""
    from broadcaster.views import subscriber_json, subscribers_table

    subscribers = run(lambda b: b.subscribers(channel=channel, after=after, limit=limit))
    if as_json:
        _print_json([subscriber_json(s, full=full) for s in subscribers])
        return
    out = console()
    if not subscribers:
        out.print("no subscribers" + (f" on {channel}" if channel else ""))
        return
    out.print(subscribers_table(subscribers, full=full))
    if len(subscribers) == limit:
        out.print(f"[dim]more: --after {subscribers[-1].id}[/]")


@subscribers_app.command("export")
def subscribers_export(subscriber_id: SubscriberId) -> None:
    """Everything kept about one subscriber, as JSON (for a data-access request)."""
    _print_json(run(lambda b: b.export_subscriber(subscriber_id)))


@subscribers_app.command("erase")
def subscribers_erase(subscriber_id: SubscriberId, yes: Yes = False) -> None:
    """Forget a subscriber for good: addresses, consents, and error texts that may quote
    them (delivery counts stay)."""

    async def work(b: Operations) -> None:
        subscriber = await b.subscriber(subscriber_id)
        _confirm(yes, f"Erase subscriber #{subscriber_id} ({_addresses(subscriber)}) for good?")
        await b.erase_subscriber(subscriber_id, actor=actor())

    run(work)
    console().print(f"erased subscriber #{subscriber_id}")


def _set_subscription(subscriber_id: int, channel: str, *, subscribed: bool) -> None:
    run(lambda b: b.set_subscription(subscriber_id, channel, subscribed=subscribed, actor=actor()))
    done = "opted in to" if subscribed else "opted out of"
    console().print(f"subscriber #{subscriber_id} {done} {channel}")


@subscribers_app.command("opt-out")
def subscribers_opt_out(
    subscriber_id: SubscriberId,
    channel: Annotated[str, typer.Argument(metavar="CHANNEL", help="Subscriber channel")],
) -> None:
    """Stop telling a subscriber on one channel; an import does not undo it."""
    _set_subscription(subscriber_id, channel, subscribed=False)


@subscribers_app.command("opt-in")
def subscribers_opt_in(
    subscriber_id: SubscriberId,
    channel: Annotated[str, typer.Argument(metavar="CHANNEL", help="Subscriber channel")],
) -> None:
    """Tell a subscriber on one channel again (they asked)."""
    _set_subscription(subscriber_id, channel, subscribed=True)


# -- templates, channels, health ---------------------------------------------------------


@templates_app.command("list")
def templates_list() -> None:
    """Every template (yours override ours) with its fields."""
    from rich.table import Table

    async def work(b: Operations) -> Table:
        table = Table()
        for column in ("template", "required fields", "optional fields", "description"):
            table.add_column(column)
        for spec in await b.templates():
            table.add_row(
                spec.name, ", ".join(spec.required), ", ".join(spec.optional), spec.description
            )
        return table

    console().print(run(work))


@templates_app.command("preview")
def templates_preview(
    name: Annotated[str, typer.Argument(help="Template name")],
    channel: Channels = None,
    set_: Fields = None,
    title: Annotated[str, typer.Option(help="Incident title")] = "Example incident",
) -> None:
    """Render a template for each channel with its example fields (or yours)."""
    from broadcaster.models import IncidentStatus, UpdateRequest
    from broadcaster.views import preview_view

    async def work(b: Operations) -> None:
        spec = await b.template(name)
        statuses = {s.value: s for s in IncidentStatus}
        request = UpdateRequest(
            status=statuses.get(name, IncidentStatus.INVESTIGATING),
            template=name,
            title=title,
            fields={**spec.example, **_pairs(set_, "--set")},
            channels=channel or [c.name for c in await b.channel_infos()],
            actor=actor(),
        )
        console().print(preview_view(await b.preview(request)))

    run(work)


@templates_app.command("check")
def templates_check() -> None:
    """Check every template against every configured channel."""

    failures = run(lambda b: b.check_templates())
    out = console()
    for failure in failures:
        out.print(f"[red]✗[/] {failure}")
    if failures:
        raise fail(f"{len(failures)} template problem(s)")
    out.print("[green]✓[/] every template fits every channel")


@app.command("channels")
def list_channels() -> None:
    """Configured channels: type, family, languages, limits."""
    from rich.table import Table

    async def work(b: Operations) -> Table:
        table = Table()
        for column in ("channel", "type", "family", "languages", "limits", "default"):
            table.add_column(column)
        for info in await b.channel_infos():
            table.add_row(
                info.name,
                info.type,
                info.family.value,
                ", ".join(info.languages),
                ", ".join(f"{k}={v}" for k, v in info.limits.items()) or "-",
                "yes" if info.default else "",
            )
        return table

    console().print(run(work))


@app.command("doctor")
def doctor() -> None:
    """Config valid, store reachable, secrets present, each channel's own checks."""
    checks = run(lambda b: b.doctor())
    out = console()
    for check in checks:
        mark = "[green]✓[/]" if check.ok else "[red]✗[/]"
        out.print(f"{mark} {check.subject}: {check.detail}")
    if not all(c.ok for c in checks):
        raise typer.Exit(1)


@app.command("init")
def init(
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Write a commented broadcaster.toml into the current folder (or at --config)."""
    from broadcaster.starter import STARTER_CONFIG

    target = _state["config"] or Path.cwd() / "broadcaster.toml"
    if target.exists() and not force:
        raise fail(f"{target} exists — pass --force to overwrite it")
    try:
        target.write_text(STARTER_CONFIG)
    except OSError as exc:
        raise fail(f"cannot write {target}: {exc.strerror}") from None
    command = f"broadcaster --config {target}" if _state["config"] else "broadcaster"
    console().print(
        f"wrote {target}\nnext: `{command} doctor`, then `{command} open --title ... --dry-run`"
    )


@app.command("demo")
def demo(
    folder: Annotated[
        Path, typer.Option("--dir", help="Where the demo's config, store and site go.")
    ] = Path("broadcaster-demo"),
) -> None:
    """Rehearse a whole incident on local simulators: no credentials, nothing real sent."""
    from broadcaster.demo import run_demo
    from broadcaster.errors import BroadcasterError

    run_async(run_demo(folder.resolve(), console()), BroadcasterError)


@app.command("export-site")
def export_site(
    target: Annotated[
        str,
        typer.Argument(
            metavar="DIR|s3://BUCKET/PREFIX",
            help="Folder, or S3-compatible bucket (reached with the channel's endpoint_url, "
            "region and keys, else AWS_* settings), to write the public side into",
        ),
    ],
    channel: Annotated[
        str | None, typer.Option(help="Banner channel to export (default: serve's)")
    ] = None,
) -> None:
    """Write the status page, banner JSON and script, and feeds as static files."""

    async def work(b: Broadcaster) -> int:
        from broadcaster.server.live_site import public_channel
        from channels.banner import BannerChannel

        name = channel or public_channel(b)
        banner = b.channels.get(name)
        if not isinstance(banner, BannerChannel):
            raise fail(f"'{name}' is not a banner channel")
        return await banner.export(target)

    count = run_local(work)
    console().print(f"wrote {count} files to {target} — serve it from any static host")


@app.command("serve")
def serve(
    host: Annotated[str | None, typer.Option(help="Address to listen on (serve.host).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (serve.port).")] = None,
    log_format: Annotated[
        Literal["auto", "json", "text"] | None,
        typer.Option(help="Log lines on stderr (serve.log_format; auto: text on a terminal)."),
    ] = None,
) -> None:
    """Run the HTTP app: the live status page and banner, health probes, and dispatch."""

    async def work(b: Broadcaster) -> None:
        import logging

        from broadcaster.logs import configure_logging, configured_secrets
        from broadcaster.server import GracefulServer, create_app, server_config

        settings = b.settings.serve
        configure_logging(log_format or settings.log_format, configured_secrets(b))
        config = server_config(create_app(b), settings, host=host, port=port)
        public = settings.public_url or f"http://{config.host}:{config.port}"
        logging.getLogger("broadcaster.serve").info(
            "serving on http://%s:%d, reached at %s — status page at /, webhooks at "
            "/hooks/<source>, health at /healthz and /readyz; Ctrl-C stops after in-flight sends",
            config.host,
            config.port,
            public,
        )
        await GracefulServer(config).serve()

    run_local(work)


@app.command("telegram-bot")
def telegram_bot(
    channel: Annotated[
        str | None,
        typer.Option(help="Telegram channel whose bot answers (default: the support_bot one)."),
    ] = None,
) -> None:
    """Answer /status in private chats with a Telegram channel's bot, by long polling."""

    async def work(b: Broadcaster) -> None:
        from broadcaster.support import run_telegram_bot

        await run_telegram_bot(b, channel)

    run_local(work)


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply the store's migrations, and the job tables of the procrastinate backend (done
    automatically on first use)."""

    async def work(b: Broadcaster) -> bool:
        from broadcaster.dispatch.distributed import ProcrastinateBackend

        if isinstance(b.backend, ProcrastinateBackend):
            return await b.backend.upgrade()
        return False

    if run_local(work):
        console().print("created the procrastinate job tables")
    console().print("store is at the newest schema")


@app.command()
def worker(
    concurrency: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=64,
            help="Deliver jobs of one channel at once (default: workers.concurrency).",
        ),
    ] = None,
) -> None:
    """Send deliveries and fire reminders for every node (backend = "procrastinate"); run
    one per node. Stops on Ctrl-C or SIGTERM once its running jobs are done."""

    async def work(b: Broadcaster) -> None:
        import contextlib
        import signal

        from broadcaster.store.engine import safe_url

        loop = asyncio.get_running_loop()
        running = asyncio.ensure_future(b.work(concurrency=concurrency))
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, running.cancel)
        console(stderr=True).print(
            f"worker: {len(b.channels)} channel(s) on {safe_url(b.settings.store_url)}; "
            "Ctrl-C stops it once its running jobs are done"
        )
        with contextlib.suppress(asyncio.CancelledError):
            await running

    run_local(work)


@db_app.command("backup")
def db_backup(target: Annotated[Path, typer.Argument(help="New file for the copy")]) -> None:
    """A consistent online copy of the SQLite store (safe while others write)."""
    run_local(lambda b: b.store.backup(target))
    console().print(f"backed up to {target}")


def main() -> None:
    """Console-script entry point."""
    app()
