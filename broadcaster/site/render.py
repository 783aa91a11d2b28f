"""Render the public side from a `PublicState`: every file of the status page, at once.

`render_site` returns relative path -> bytes, so the same output can be written to a
folder (`write_site`) and published to any static host, or served live by the HTTP
app. Rendering is a pure function of the state: no clock, no store, no network.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup, escape

from broadcaster.models import ComponentState, IncidentKind, IncidentStatus
from broadcaster.site.state import Indicator, OverallStatus, PublicIncident, PublicState
from broadcaster.site.strings import language_name, strings_for
from broadcaster.text import find_links, truncate

__all__ = ["feed_path", "page_path", "render_site", "status_json_path", "write_site"]

BANNER_REFRESH_SECONDS = 60
BANNER_SUMMARY_GRAPHEMES = 240

_ATOM = "http://www.w3.org/2005/Atom"
_XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"
_RTL_LANGUAGES = frozenset({"ar", "fa", "he", "ur", "yi"})

# The exact words Statuspage puts in `status.description`; clients match on them.
_STATUSPAGE_DESCRIPTIONS = {
    Indicator.NONE: "All Systems Operational",
    Indicator.MINOR: "Minor Service Outage",
    Indicator.MAJOR: "Partial System Outage",
    Indicator.CRITICAL: "Major Service Outage",
}
_STATUSPAGE_MAINTENANCE = "Service Under Maintenance"

# Shapes next to the colours, so the state reads without colour vision (the text
# label is what screen readers get; the symbols are aria-hidden).
_STATE_SYMBOLS = {
    ComponentState.OPERATIONAL: "✓",
    ComponentState.DEGRADED_PERFORMANCE: "▲",
    ComponentState.PARTIAL_OUTAGE: "◆",
    ComponentState.MAJOR_OUTAGE: "✕",
    ComponentState.UNDER_MAINTENANCE: "⚙",
}


# --- Paths -------------------------------------------------------------------------


def page_path(state: PublicState, language: str) -> str:
    """Where the status page in `language` lives: the default language at the root."""
    return "index.html" if language == state.default_language else f"{language}/index.html"


def feed_path(state: PublicState, language: str) -> str:
    """The Atom feed in `language`: `feed.atom` for the default language."""
    return "feed.atom" if language == state.default_language else f"feed.{language}.atom"


def status_json_path(language: str) -> str:
    """The banner JSON in `language` (every language, the default included)."""
    return f"status.{language}.json"


def _page_url(state: PublicState, language: str) -> str | None:
    if state.status_page_url is None:
        return None
    base = state.status_page_url.rstrip("/") + "/"
    return base if language == state.default_language else f"{base}{language}/"


def _absolute(state: PublicState, path: str) -> str | None:
    if state.status_page_url is None:
        return None
    return state.status_page_url.rstrip("/") + "/" + path


def _relative(from_page: str, target: str) -> str:
    """A link from one generated file to another, so the site works from any folder."""
    depth = from_page.count("/")
    return "../" * depth + target


# --- Words and times in one language -----------------------------------------------


@dataclass(frozen=True)
class _Time:
    iso: str
    text: str


class _Localizer:
    """One language's labels and the page's time zone."""

    def __init__(self, state: PublicState, language: str) -> None:
        self.language = language
        self.strings = strings_for(language)
        self.zone = state.zone
        self.today = state.generated_at.astimezone(self.zone).date()
        self.months = self.strings["months"].split()

    def state(self, value: ComponentState) -> str:
        return self.strings[f"state_{value.value}"]

    def status(self, value: IncidentStatus) -> str:
        return self.strings[f"status_{value.value}"]

    def impact(self, value: str) -> str:
        return self.strings[f"impact_{value}"]

    def overall(self, overall: OverallStatus) -> str:
        if overall.indicator is Indicator.NONE and (
            overall.state is ComponentState.UNDER_MAINTENANCE
        ):
            return self.strings["overall_maintenance"]
        return self.strings[f"overall_{overall.indicator.value}"]

    def clock(self, moment: datetime) -> str:
        """`09:40 CET`: the time of day in the page's zone."""
        local = moment.astimezone(self.zone)
        return f"{local:%H:%M} {local.tzname()}"

    def date_time(self, moment: datetime) -> str:
        """`26 Nov 2025, 09:40 CET`, with the month named in this language."""
        local = moment.astimezone(self.zone)
        return self.strings["date_format"].format(
            day=local.day,
            month=self.months[local.month - 1],
            year=local.year,
            time=self.clock(moment),
        )

    def when(self, moment: datetime) -> _Time:
        """The full date, for the record (update times)."""
        return _Time(iso=moment.astimezone(self.zone).isoformat(), text=self.date_time(moment))

    def soon(self, moment: datetime) -> _Time:
        """Only the time when it is today, the full date otherwise (promised updates)."""
        local = moment.astimezone(self.zone)
        text = self.clock(moment) if local.date() == self.today else self.date_time(moment)
        return _Time(iso=local.isoformat(), text=text)


def _iso_utc(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- Incident text to HTML ---------------------------------------------------------

_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")


def _linkify(line: str) -> Markup:
    """Escape a line of text and make its http(s) links clickable."""
    parts: list[Markup] = []
    cursor = 0
    for link in find_links(line):
        at = line.find(link, cursor)
        if at < 0:
            continue
        parts.append(escape(line[cursor:at]))
        parts.append(Markup('<a href="{0}">{0}</a>').format(link))
        cursor = at + len(link)
    parts.append(escape(line[cursor:]))
    return Markup("").join(parts)


def text_to_html(text: str) -> Markup:
    """Plain update text as HTML: blank lines make paragraphs, newlines line breaks."""
    paragraphs = [p for p in _PARAGRAPH_BREAK.split(text.strip()) if p.strip()]
    html = [
        Markup("<p>") + Markup("<br>\n").join(_linkify(line) for line in p.splitlines())
        for p in paragraphs
    ]
    return Markup("</p>\n").join(html) + Markup("</p>") if html else Markup("")


def _one_line(text: str) -> str:
    return " ".join(text.split())


# --- The HTML page -----------------------------------------------------------------


@dataclass(frozen=True)
class _ComponentView:
    name: str
    display_name: str
    state: str
    label: str
    symbol: str


@dataclass(frozen=True)
class _UpdateView:
    id: int
    status: str
    status_label: str
    at: _Time
    html: Markup


@dataclass(frozen=True)
class _IncidentView:
    id: int
    kind: str
    title: str
    status: str
    status_label: str
    impact: str
    impact_label: str
    components: list[_ComponentView]
    started: _Time
    resolved: _Time | None
    window: tuple[_Time, _Time | None] | None
    next_update: _Time | None
    updates: list[_UpdateView]


@dataclass(frozen=True)
class _LanguageLink:
    code: str
    name: str
    href: str
    current: bool


@cache
def site_environment() -> Environment:
    """The Jinja2 environment of the public side's templates (pages, forms, scripts)."""
    return Environment(
        loader=PackageLoader("broadcaster.site", "templates"),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def _component_view(
    loc: _Localizer, name: str, display_name: str, state: ComponentState
) -> _ComponentView:
    return _ComponentView(
        name=name,
        display_name=display_name,
        state=state.value,
        label=loc.state(state),
        symbol=_STATE_SYMBOLS[state],
    )


def _incident_view(state: PublicState, loc: _Localizer, incident: PublicIncident) -> _IncidentView:
    display_names = {c.name: c.display_name for c in state.components}
    updates = []
    for update in incident.thread:
        rendered = update.text_for(loc.language, fallback=state.default_language)
        updates.append(
            _UpdateView(
                id=update.id,
                status=update.status.value,
                status_label=loc.status(update.status),
                at=loc.when(update.created_at),
                html=text_to_html(rendered.text) if rendered else Markup(""),
            )
        )
    latest = incident.latest
    promised = latest.next_update_at if latest is not None and incident.is_open else None
    window = None
    if incident.scheduled_for is not None:
        until = incident.scheduled_until
        window = (loc.when(incident.scheduled_for), loc.when(until) if until else None)
    return _IncidentView(
        id=incident.id,
        kind=incident.kind.value,
        title=incident.title,
        status=incident.status.value,
        status_label=loc.status(incident.status),
        impact=incident.impact.value,
        impact_label=loc.impact(incident.impact.value),
        components=[
            _component_view(loc, name, display_names.get(name, name), component_state)
            for name, component_state in incident.components.items()
        ],
        started=loc.when(incident.created_at),
        resolved=loc.when(incident.resolved_at) if incident.resolved_at else None,
        window=window,
        next_update=loc.soon(promised) if promised is not None else None,
        updates=updates,
    )


def _render_page(state: PublicState, language: str) -> bytes:
    loc = _Localizer(state, language)
    here = page_path(state, language)
    overall = state.overall()
    context = {
        "lang": language,
        "dir": "rtl" if language.split("-")[0].lower() in _RTL_LANGUAGES else "ltr",
        "t": loc.strings,
        "title": state.page_title,
        "languages": [
            _LanguageLink(
                code=code,
                name=language_name(code),
                href=_relative(here, page_path(state, code)),
                current=code == language,
            )
            for code in state.languages
        ],
        "overall": {
            "state": overall.state.value,
            "indicator": overall.indicator.value,
            "label": loc.overall(overall),
            "symbol": _STATE_SYMBOLS[overall.state],
        },
        "components": [
            _component_view(loc, c.name, c.display_name, c.state) for c in state.components
        ],
        "active": [_incident_view(state, loc, i) for i in state.open_incidents()],
        "maintenance": [_incident_view(state, loc, i) for i in state.maintenances()],
        "resolved": [_incident_view(state, loc, i) for i in state.resolved_incidents()],
        "generated": loc.when(state.generated_at),
        "feed_href": _relative(here, feed_path(state, language)),
        "json_href": _relative(here, status_json_path(language)),
        "subscribe_href": f"{state.subscribe_url}?lang={language}" if state.subscribe_url else None,
    }
    html = site_environment().get_template("page.html").render(context)
    return html.encode("utf-8")


# --- Banner JSON and script --------------------------------------------------------


def _banner_incident(
    state: PublicState, loc: _Localizer, incident: PublicIncident
) -> dict[str, Any]:
    latest = incident.latest
    rendered = latest.text_for(loc.language, fallback=state.default_language) if latest else None
    text = rendered.text if rendered else ""
    anchor = f"#incident-{incident.id}"
    page_url = _page_url(state, loc.language)
    promised = latest.next_update_at if latest is not None and incident.is_open else None
    return {
        "id": incident.id,
        "kind": incident.kind.value,
        "title": incident.title,
        "status": incident.status.value,
        "status_label": loc.status(incident.status),
        "impact": incident.impact.value,
        "components": {name: s.value for name, s in incident.components.items()},
        "created_at": _iso_utc(incident.created_at),
        "updated_at": _iso_utc(incident.updated_at),
        "scheduled_for": _iso_utc(incident.scheduled_for),
        "scheduled_until": _iso_utc(incident.scheduled_until),
        "update_id": latest.id if latest else None,
        "subject": rendered.subject if rendered else None,
        "text": text,
        "summary": truncate(_one_line(text), BANNER_SUMMARY_GRAPHEMES),
        "next_update_at": _iso_utc(promised),
        "next_update_by": loc.soon(promised).text if promised is not None else None,
        "path": page_path(state, loc.language) + anchor,
        "url": page_url + anchor if page_url else None,
    }


def _status_json(state: PublicState, language: str) -> dict[str, Any]:
    loc = _Localizer(state, language)
    overall = state.overall()
    scheduled = [i for i in state.maintenances() if i.status is IncidentStatus.SCHEDULED]
    return {
        "generated_at": _iso_utc(state.generated_at),
        "language": language,
        "page": {
            "title": state.page_title,
            "url": _page_url(state, language),
            "path": page_path(state, language),
            "time_zone": state.timezone,
        },
        "overall": {
            "state": overall.state.value,
            "state_label": loc.state(overall.state),
            "indicator": overall.indicator.value,
            "description": loc.overall(overall),
        },
        "components": [
            {
                "name": c.name,
                "display_name": c.display_name,
                "state": c.state.value,
                "label": loc.state(c.state),
            }
            for c in state.components
        ],
        # What affects users now: open incidents and maintenance in progress.
        "incidents": [_banner_incident(state, loc, i) for i in state.active_incidents()],
        "scheduled_maintenances": [_banner_incident(state, loc, i) for i in scheduled],
        "labels": {
            key: loc.strings[key]
            for key in ("details", "dismiss", "next_update_by", "more_incidents")
        },
    }


def _banner_js(state: PublicState) -> bytes:
    config = {
        "languages": state.languages,
        "default": state.default_language,
        "refresh": BANNER_REFRESH_SECONDS,
    }
    return site_environment().get_template("banner.js").render(config=config).encode("utf-8")


# --- Atom --------------------------------------------------------------------------


def _atom_id(state: PublicState, *parts: object) -> str:
    # Stable without a public URL: the same page and update always get the same id.
    name = ":".join(["incident-broadcaster", state.page_title, *map(str, parts)])
    return f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, name)}"


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    element = ET.SubElement(parent, tag, attrs)
    if text is not None:
        element.text = text
    return element


def _atom_feed(state: PublicState, language: str) -> bytes:
    """An Atom 1.0 feed (RFC 4287) of every update on the page, newest first."""
    loc = _Localizer(state, language)
    page_url = _page_url(state, language)
    feed_url = _absolute(state, feed_path(state, language))
    entries = sorted(
        ((incident, update) for incident in state.incidents for update in incident.updates),
        key=lambda pair: (pair[1].created_at, pair[1].id),
        reverse=True,
    )
    # A literal xmlns attribute keeps the Atom namespace the default one without
    # ET.register_namespace, which would change serialisation process-wide.
    feed = ET.Element("feed", {"xmlns": _ATOM, _XML_LANG: language})
    _sub(feed, "id", feed_url or _atom_id(state, "feed", language))
    _sub(feed, "title", state.page_title)
    updated = entries[0][1].created_at if entries else state.generated_at
    _sub(feed, "updated", _iso_utc(updated))
    author = _sub(feed, "author")
    _sub(author, "name", state.page_title)
    if page_url:
        _sub(author, "uri", page_url)
        _sub(feed, "link", rel="alternate", type="text/html", href=page_url)
    if feed_url:
        _sub(feed, "link", rel="self", type="application/atom+xml", href=feed_url)
    _sub(feed, "generator", "incident-broadcaster")
    for incident, update in entries:
        rendered = update.text_for(language, fallback=state.default_language)
        entry = _sub(feed, "entry")
        anchor = f"#update-{update.id}"
        _sub(entry, "id", page_url + anchor if page_url else _atom_id(state, update.id, language))
        _sub(entry, "title", f"{incident.title} — {loc.status(update.status)}")
        _sub(entry, "updated", _iso_utc(update.created_at))
        _sub(entry, "published", _iso_utc(update.created_at))
        if page_url:
            _sub(entry, "link", rel="alternate", type="text/html", href=page_url + anchor)
        _sub(entry, "category", term=incident.kind.value)
        _sub(entry, "content", rendered.text if rendered else "", type="text")
    ET.indent(feed)
    xml: bytes = ET.tostring(feed, encoding="utf-8", xml_declaration=True)
    return xml


# --- Statuspage-compatible API -----------------------------------------------------


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "status"


def _statuspage_description(overall: OverallStatus) -> str:
    if overall.indicator is Indicator.NONE and overall.state is ComponentState.UNDER_MAINTENANCE:
        return _STATUSPAGE_MAINTENANCE
    return _STATUSPAGE_DESCRIPTIONS[overall.indicator]


def _statuspage_components(
    state: PublicState, page_id: str, states: Iterable[tuple[str, str, ComponentState]]
) -> list[dict[str, Any]]:
    generated = _iso_utc(state.generated_at)
    return [
        {
            "id": name,
            "name": display_name,
            "status": component_state.value,
            "created_at": generated,
            "updated_at": generated,
            "position": position,
            "description": None,
            "showcase": True,
            "start_date": None,
            "group_id": None,
            "page_id": page_id,
            "group": False,
            "only_show_if_degraded": False,
        }
        for position, (name, display_name, component_state) in enumerate(states, start=1)
    ]


def _statuspage_incident(
    state: PublicState, page_id: str, incident: PublicIncident
) -> dict[str, Any]:
    display_names = {c.name: c.display_name for c in state.components}
    language = state.default_language
    thread = incident.thread
    monitoring = [u for u in thread if u.status is IncidentStatus.MONITORING]
    page_url = _page_url(state, language)
    body: dict[str, Any] = {
        "id": str(incident.id),
        "name": incident.title,
        "status": incident.status.value,
        "created_at": _iso_utc(incident.created_at),
        "updated_at": _iso_utc(incident.updated_at),
        "monitoring_at": _iso_utc(monitoring[-1].created_at) if monitoring else None,
        "resolved_at": _iso_utc(incident.resolved_at),
        "impact": incident.impact.value,
        "shortlink": f"{page_url}#incident-{incident.id}" if page_url else None,
        "started_at": _iso_utc(incident.created_at),
        "page_id": page_id,
        "incident_updates": [],
        "components": _statuspage_components(
            state,
            page_id,
            ((n, display_names.get(n, n), s) for n, s in incident.components.items()),
        ),
    }
    for update in thread:
        rendered = update.text_for(language)
        body["incident_updates"].append(
            {
                "id": str(update.id),
                "status": update.status.value,
                "body": rendered.text if rendered else "",
                "incident_id": str(incident.id),
                "created_at": _iso_utc(update.created_at),
                "updated_at": _iso_utc(update.created_at),
                "display_at": _iso_utc(update.created_at),
                "affected_components": None,
                "deliver_notifications": True,
                "custom_tweet": None,
                "tweet_id": None,
            }
        )
    if incident.kind is IncidentKind.MAINTENANCE:
        body["scheduled_for"] = _iso_utc(incident.scheduled_for)
        body["scheduled_until"] = _iso_utc(incident.scheduled_until)
    return body


def _statuspage_page(state: PublicState) -> dict[str, Any]:
    return {
        "id": _slug(state.page_title),
        "name": state.page_title,
        "url": _page_url(state, state.default_language),
        "time_zone": state.timezone,
        "updated_at": _iso_utc(state.generated_at),
    }


def _statuspage_summary(state: PublicState) -> dict[str, Any]:
    """Statuspage's `/api/v2/summary.json`: unresolved incidents, upcoming maintenance."""
    page = _statuspage_page(state)
    overall = state.overall()
    return {
        "page": page,
        "components": _statuspage_components(
            state, page["id"], ((c.name, c.display_name, c.state) for c in state.components)
        ),
        "incidents": [_statuspage_incident(state, page["id"], i) for i in state.open_incidents()],
        "scheduled_maintenances": [
            _statuspage_incident(state, page["id"], i) for i in state.maintenances()
        ],
        "status": {
            "indicator": overall.indicator.value,
            "description": _statuspage_description(overall),
        },
    }


def _json_bytes(data: Any) -> bytes:
    return json.dumps(data, ensure_ascii=False, indent=2).encode("utf-8") + b"\n"


# --- The whole site ----------------------------------------------------------------


def render_site(state: PublicState) -> dict[str, bytes]:
    """Every file of the public side, as relative path -> content.

    - `index.html` (default language) and `<lang>/index.html`: the status page;
    - `status.<lang>.json` and `banner.js`: the in-app banner's data and script;
    - `feed.atom` and `feed.<lang>.atom`: Atom feeds of the updates;
    - `api/v2/summary.json` and `api/v2/status.json`: for Statuspage clients.
    """
    files: dict[str, bytes] = {}
    for language in state.languages:
        files[page_path(state, language)] = _render_page(state, language)
    for language in state.languages:
        files[status_json_path(language)] = _json_bytes(_status_json(state, language))
        files[feed_path(state, language)] = _atom_feed(state, language)
    files["banner.js"] = _banner_js(state)
    summary = _statuspage_summary(state)
    files["api/v2/summary.json"] = _json_bytes(summary)
    files["api/v2/status.json"] = _json_bytes(
        {"page": summary["page"], "status": summary["status"]}
    )
    return files


def _safe_relative(path: str) -> PurePosixPath:
    relative = PurePosixPath(path)
    if relative.is_absolute() or not relative.parts or ".." in relative.parts:
        raise ValueError(f"site file path must be relative and inside the site: {path!r}")
    return relative


def write_site(files: dict[str, bytes], out_dir: Path) -> list[Path]:
    """Write rendered files under out_dir, each atomically; return the paths written.

    Each file is written to a temporary file next to it and moved into place with
    os.replace, so a web server publishing the folder never serves half a page.
    Files the site no longer has are left alone.
    """
    written: list[Path] = []
    for name, content in files.items():
        target = out_dir.joinpath(*_safe_relative(name).parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, temp_name = tempfile.mkstemp(
            dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"
        )
        try:
            with os.fdopen(fd, "wb") as temp:
                temp.write(content)
                temp.flush()
                os.fsync(temp.fileno())
            # mkstemp makes the file private; a published page must be readable.
            os.chmod(temp_name, 0o644)
            os.replace(temp_name, target)
        except BaseException:
            Path(temp_name).unlink(missing_ok=True)
            raise
        written.append(target)
    return written
