"""How the CLI shows things: rich tables and panels, and their --json twins."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from broadcaster.models import (
    AuditEntry,
    ChannelProgress,
    ChannelRender,
    Delivery,
    DeliveryState,
    Incident,
    Preview,
    Reach,
    RejectedRow,
    Retraction,
    Subscriber,
)

if TYPE_CHECKING:
    from broadcaster.operations import Operations

_STATE_STYLE = {
    DeliveryState.QUEUED: "yellow",
    DeliveryState.SENDING: "cyan",
    DeliveryState.SENT: "green",
    DeliveryState.DELIVERED: "bold green",
    DeliveryState.FAILED: "bold red",
    DeliveryState.UNDELIVERED: "red",
    DeliveryState.REROUTED: "blue",
    DeliveryState.CANCELLED: "magenta",
    DeliveryState.SUPERSEDED: "dim",
}


_ALWAYS_SHOWN = (DeliveryState.QUEUED, DeliveryState.SENDING, DeliveryState.FAILED)


def progress_table(progress: Sequence[ChannelProgress], *, title: str | None = None) -> Table:
    """Deliveries per channel, counted by state (states nobody is in are left out)."""
    states = [
        s for s in DeliveryState if s in _ALWAYS_SHOWN or any(p.counts.get(s) for p in progress)
    ]
    table = Table(title=title, title_justify="left")
    table.add_column("channel", style="bold", no_wrap=True)
    for state in states:
        table.add_column(state.value, justify="right", style=_STATE_STYLE[state])
    table.add_column("note")
    for item in progress:
        note = Text(f"broken: {item.broken}", style="bold red") if item.broken else Text("")
        if not item.broken and item.pending:
            note = Text("in progress", style="cyan")
        if item.held and item.held_until is not None:
            held = f"{item.held} held for quiet hours until {item.held_until:%Y-%m-%d %H:%M} UTC"
            note = Text.assemble(note, "; " if note.plain else "", Text(held, style="yellow"))
        table.add_row(item.label, *[str(item.counts.get(state, 0) or "") for state in states], note)
    if not progress:
        table.add_row("(no deliveries)", *[""] * (len(states) + 1))
    return table


def failures_table(deliveries: Sequence[Delivery]) -> Table:
    table = Table(title="failed deliveries", title_justify="left")
    for column in ("id", "channel", "recipient", "attempts", "last error"):
        table.add_column(column)
    for d in deliveries:
        table.add_row(
            str(d.id), d.channel, d.recipient or "(audience)", str(d.attempts), d.last_error or ""
        )
    return table


def preview_view(preview: Preview, *, max_lines: int | None = None) -> RenderableType:
    """Each channel's text exactly as it will go out, its measures, and failed checks.

    `max_lines` shortens long texts (the demo); a real preview shows everything."""
    parts: list[RenderableType] = []
    reach = {r.channel: r for r in preview.reach}
    for render in preview.renders:
        measures = " | ".join(f"{m.language}: {m.describe()}" for m in render.measures)
        if render.channel in reach:
            measures += f" — {reach_line(reach[render.channel])}"
        parts.append(
            Panel(
                _preview_body(render, max_lines),
                title=f"{render.channel} ({render.family.value}, template {render.template})",
                subtitle=measures,
                title_align="left",
                subtitle_align="left",
            )
        )
    for render in preview.fallbacks:
        parts.append(
            Panel(
                _preview_body(render, max_lines),
                title=f"{render.channel} ({render.family.value}, template {render.template})"
                " — fallback only: for subscribers re-routed here",
                subtitle=" | ".join(f"{m.language}: {m.describe()}" for m in render.measures),
                title_align="left",
                subtitle_align="left",
                border_style="dim",
            )
        )
    if preview.failures:
        failed = Text("Checks failed:\n", style="bold red")
        for failure in preview.failures:
            failed.append(f"  ✗ {failure}\n", style="red")
        parts.append(failed)
    else:
        parts.append(Text("✓ all checks passed", style="green"))
    return Group(*parts)


def _preview_body(render: ChannelRender, max_lines: int | None) -> Text:
    """A render's subject and text as a preview panel shows them."""
    text = (
        render.text()
        if render.joined
        else "\n\n".join(f"[{v.language}] {v.text}" for v in render.variants)
    )
    if max_lines is not None and text.count("\n") >= max_lines:
        text = "\n".join(text.splitlines()[:max_lines]) + "\n…"
    body = Text(text)
    subject = render.subject()
    if subject:
        body = Text.assemble(Text(f"Subject: {subject}\n\n", style="bold"), body)
    return body


def reach_line(reach: Reach) -> str:
    """ "to 1,204 subscribers (en 1,000, fr 204), 2,408 SMS segments" """
    languages = ", ".join(f"{lang} {n:,}" for lang, n in sorted(reach.recipients.items()))
    line = f"to {reach.total:,} subscribers" + (f" ({languages})" if languages else "")
    if reach.sms_segments is not None:
        line += f", {reach.sms_segments:,} SMS segments"
    return line


def incidents_table(incidents: Sequence[Incident]) -> Table:
    table = Table()
    for column in ("id", "title", "status", "impact", "opened", "resolved"):
        table.add_column(column)
    for i in incidents:
        table.add_row(
            f"#{i.id}",
            i.title,
            i.status.value,
            i.impact.value,
            f"{i.created_at:%Y-%m-%d %H:%M}",
            f"{i.resolved_at:%Y-%m-%d %H:%M}" if i.resolved_at else "",
        )
    return table


def incident_view(incident: Incident, audit: Sequence[AuditEntry]) -> RenderableType:
    head = Text.assemble(
        (f"#{incident.id} {incident.title}\n", "bold"),
        f"{incident.kind.value}, {incident.status.value}, impact {incident.impact.value}, "
        f"opened {incident.created_at:%Y-%m-%d %H:%M} UTC",
    )
    if incident.components:
        head.append(
            "\ncomponents: "
            + ", ".join(f"{name}={state.value}" for name, state in incident.components.items())
        )
    updates = Table(title="updates", title_justify="left")
    for column in ("update", "at", "status", "template", "next update", "by", "note"):
        updates.add_column(column)
    for u in incident.updates:
        updates.add_row(
            f"#{u.id}",
            f"{u.created_at:%H:%M:%S}",
            u.status.value,
            u.template,
            f"{u.next_update_at:%H:%M}" if u.next_update_at else "",
            u.actor,
            "cancelled" if u.cancelled_at else "",
        )
    trail = Table(title="audit trail", title_justify="left")
    for column in ("at", "actor", "action", "update", "detail"):
        trail.add_column(column)
    for entry in audit:
        detail = ", ".join(f"{k}={v}" for k, v in entry.detail.items() if v is not None)
        trail.add_row(
            f"{entry.at:%Y-%m-%d %H:%M:%S}",
            entry.actor,
            entry.action,
            f"#{entry.update_id}" if entry.update_id else "",
            detail,
        )
    return Group(head, updates, trail)


def retraction_table(report: Mapping[str, Retraction], *, title: str) -> Table:
    """Per channel: queued deliveries stopped, posts deleted, posts the channel keeps."""
    table = Table(title=title)
    for column in ("channel", "stopped", "deleting", "cannot delete"):
        table.add_column(column, justify="left" if column == "channel" else "right")
    for name, what in sorted(report.items()):
        kept = f"[yellow]{what.kept}[/]" if what.kept else ""
        table.add_row(name, str(what.cancelled or ""), str(what.deleting or ""), kept)
    return table


def subscribers_table(subscribers: Sequence[Subscriber], *, full: bool = False) -> Table:
    """Subscribers with their consents; addresses masked unless `full`."""
    from broadcaster.subscribers import mask

    table = Table()
    for column in ("id", "phone", "email", "other", "language", "components", "channels", "since"):
        table.add_column(column, no_wrap=column in ("phone", "email"))
    for s in subscribers:
        channels = Text()
        for name, subscribed in s.channels.items():
            if channels:
                channels.append(", ")
            if subscribed:
                channels.append(name, style="green")
            else:
                channels.append(f"{name} (opted out)", style="dim")
        table.add_row(
            f"#{s.id}",
            (s.phone or "-") if full else mask(s.phone),
            (s.email or "-") if full else mask(s.email),
            _other_addresses(s, full=full),
            s.language,
            ", ".join(s.components) if s.components is not None else "all",
            channels,
            f"{s.created_at:%Y-%m-%d}",
        )
    return table


def _other_addresses(subscriber: Subscriber, *, full: bool) -> str:
    """Their Telegram id and webhook URL, if any (masked unless `full`)."""
    from broadcaster.subscribers import mask

    shown = []
    if subscriber.telegram:
        shown.append(f"telegram {subscriber.telegram if full else mask(subscriber.telegram)}")
    if subscriber.webhook_url:
        url = subscriber.webhook_url
        shown.append(f"webhook {url if full else mask(url)}")
    return ", ".join(shown) or "-"


def subscriber_json(subscriber: Subscriber, *, full: bool = False) -> dict[str, Any]:
    """A subscriber for --json; addresses masked unless `full`."""
    from broadcaster.subscribers import mask

    data = subscriber.model_dump(mode="json")
    if not full:
        data["phone"] = mask(subscriber.phone) if subscriber.phone else None
        data["email"] = mask(subscriber.email) if subscriber.email else None
        data["webhook_url"] = mask(subscriber.webhook_url) if subscriber.webhook_url else None
        data["telegram"] = mask(subscriber.telegram) if subscriber.telegram else None
    return data


def rejected_table(rejected: Sequence[RejectedRow]) -> Table:
    """The rows an import refused, by line, with the reason."""
    table = Table(title="rejected rows", title_justify="left")
    table.add_column("line", justify="right")
    table.add_column("reason", style="red")
    for row in rejected:
        table.add_row(str(row.line), row.reason)
    return table


def progress_json(progress: Sequence[ChannelProgress]) -> list[dict[str, Any]]:
    return [
        {
            "channel": p.channel,
            "action": p.action.value,
            "counts": {s.value: n for s, n in p.counts.items()},
            "broken": p.broken,
            "held": p.held,
            "held_until": p.held_until.isoformat() if p.held_until else None,
            "failures": [
                {
                    "id": d.id,
                    "recipient": d.recipient,
                    "attempts": d.attempts,
                    "last_error": d.last_error,
                    "state": d.state.value,
                }
                for d in p.failures
            ],
        }
        for p in progress
    ]


async def watch_deliveries(
    broadcaster: Operations, update_ids: Sequence[int] | None, console: Console
) -> list[ChannelProgress]:
    """Drive (or watch) deliveries with a live per-channel table until they settle."""
    ids = list(update_ids) if update_ids is not None else None
    with Live(progress_table([]), console=console, refresh_per_second=8) as live:

        async def show(progress: list[ChannelProgress], dispatching: bool) -> None:
            who = "dispatching" if dispatching else "watching (another process dispatches)"
            live.update(progress_table(progress, title=f"deliveries — {who}"))

        final = await broadcaster.wait(ids, show)
        live.update(progress_table(final, title="deliveries"))
    if not console.is_terminal:
        # Live ends the line itself only on a terminal; in a pipe or a log the next
        # output would start right after the table's last border.
        console.line()
    return final
