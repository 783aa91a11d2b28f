"""Settings: broadcaster.toml + environment (BROADCASTER_*), validated with pydantic-settings.

Secrets are never read from the file itself: a channel names an environment variable
or a file that holds each secret (`SecretRef`), resolved only when a channel starts.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from datetime import datetime, time, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from broadcaster.errors import ConfigError
from broadcaster.models import ComponentState, Impact, IncidentStatus, TimeZoneName, UpdateRequest
from broadcaster.secrets import SecretRef

CONFIG_FILE_NAME = "broadcaster.toml"
_DURATION = re.compile(
    r"^\s*(?:(\d+)\s*d)?\s*(?:(\d+)\s*h)?\s*(?:(\d+)\s*m(?:in)?)?\s*(?:(\d+)\s*s)?\s*$"
)


def parse_duration(text: str) -> timedelta:
    """'30m', '1h30m', '2d', '45s' -> timedelta; a clear error otherwise."""
    match = _DURATION.match(text)
    if not text.strip() or match is None or not any(match.groups()):
        raise ValueError(f"'{text}' is not a duration — write it like 30m, 1h30m, 2d or 45s")
    days, hours, minutes, seconds = (int(g) if g else 0 for g in match.groups())
    return timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)


_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|min|minute|h|hour)\s*$")
_RATE_PERIODS = {"s": 1, "sec": 1, "second": 1, "min": 60, "minute": 60, "h": 3600, "hour": 3600}


def parse_rate(value: object) -> object:
    """'20/s', '600/min', '1000/h' -> requests per second; 'off' -> None (no limit)."""
    if isinstance(value, int | float) and value <= 0:
        raise ValueError(f"{value} is not a rate — it must be above 0, or 'off'")
    if not isinstance(value, str):
        return value
    if value.strip().lower() == "off":
        return None
    match = _RATE.match(value)
    if match is None or float(match[1]) <= 0:
        raise ValueError(f"'{value}' is not a rate — write it like 20/s, 600/min or off")
    return float(match[1]) / _RATE_PERIODS[match[2]]


RequestRate = Annotated[float | None, BeforeValidator(parse_rate)]


class DispatchSettings(BaseModel):
    """How the embedded dispatcher behaves."""

    model_config = ConfigDict(extra="forbid")

    lease_seconds: float = Field(default=15.0, gt=1, description="dispatcher lease, renewed at 1/3")
    sending_lease_seconds: float = Field(
        default=600.0,
        gt=1,
        description="a delivery left 'sending' this long (rate-limit waits included) is sent again",
    )
    poll_seconds: float = Field(
        default=0.25, gt=0, description="idle wait between looks at the queue"
    )
    flush_batch: int = Field(default=500, gt=0)


class WorkerSettings(BaseModel):
    """The procrastinate backend's workers (`broadcaster worker`, one per node)."""

    model_config = ConfigDict(extra="forbid")

    concurrency: int = Field(
        default=2, gt=0, le=64, description="deliver jobs of one channel run at once per worker"
    )
    batch: int = Field(default=50, gt=0, le=1000, description="deliveries one deliver job carries")
    poll_seconds: float = Field(
        default=0.5, gt=0, description="how often a channel's queue is looked at when idle"
    )
    heartbeat_seconds: float = Field(default=5.0, gt=0, description="a worker says it lives")
    stalled_seconds: float = Field(
        default=30.0,
        gt=0,
        description="a worker silent this long is dead: its jobs (and deliveries) run again",
    )
    retry_stalled_every: int = Field(
        default=10, gt=0, le=59, description="seconds between looks for a dead worker's jobs"
    )
    keep_jobs_hours: int = Field(default=72, gt=0, description="finished jobs kept this long")

    @model_validator(mode="after")
    def _heartbeat_inside_stall(self) -> WorkerSettings:
        if self.heartbeat_seconds * 2 > self.stalled_seconds:
            raise ValueError(
                "workers.stalled_seconds must be at least twice workers.heartbeat_seconds, "
                "or a live worker is taken for dead"
            )
        return self


class ApiToken(BaseModel):
    """A bearer token of the admin API (`/v1/`) and the remote CLI, with its scope:
    read < publish (preview, publish, approve, reject, retry, cancel) < admin (doctor)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, description="who holds it; the audit trail records it")
    scope: Literal["read", "publish", "admin"] = "read"
    secret: SecretRef = Field(description="where the token is: {env = ...} or {file = ...}")


class RateLimit(BaseModel):
    """A token bucket per client address: `burst` requests at once, then `rate`."""

    model_config = ConfigDict(extra="forbid")

    rate: RequestRate = Field(description="'20/s', '600/min', '1000/h', or 'off' for no limit")
    burst: int | None = Field(
        default=None, gt=0, description="requests a client may send at once (default: rate x 1 s)"
    )


class PerIpRateLimits(BaseModel):
    """Requests per client address (the real one: see `serve.trusted_proxies`), answered
    429 with Retry-After past the limit. Health probes and /metrics are never limited."""

    model_config = ConfigDict(extra="forbid")

    inbound: RateLimit = Field(
        default_factory=lambda: RateLimit(rate=1.0, burst=30),
        description="refused /hooks/* requests (wrong or missing credential, malformed "
        "body) and refused /v1/ tokens: past it, every request from that address gets "
        "429 — a sender with valid credentials spends nothing, so a big outage's burst of "
        "alerts and the comms team are never held up",
    )
    site: RateLimit = Field(
        default_factory=lambda: RateLimit(rate=50.0, burst=200),
        description="the public side: the status page, status JSON, feeds, banner.js "
        "(cached, so cheap; many readers may share one address behind a NAT)",
    )
    max_addresses: int = Field(
        default=10_000, gt=0, description="addresses tracked at once; the least recent go first"
    )


class ServeSettings(BaseModel):
    """`broadcaster serve`: where it listens and what its public side shows."""

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    public_channel: str | None = Field(
        default=None,
        description="the banner channel whose updates the live site shows "
        "(default: the first banner channel)",
    )
    ready_stall_seconds: float = Field(
        default=120.0, gt=0, description="/readyz fails when a due delivery waits this long"
    )
    site_cache_seconds: float = Field(
        default=2.0, ge=0, description="the live site is rendered at most this often"
    )
    metrics_token: SecretRef | None = Field(
        default=None, description="bearer token Prometheus sends to scrape /metrics"
    )
    api_tokens: list[ApiToken] = Field(
        default_factory=list, description="tokens of the admin API; none: the API answers 404"
    )
    public_url: str | None = Field(
        default=None,
        description="where users and monitoring reach this server (https://status.example.com):"
        " the base of the webhook URLs to give Alertmanager, Grafana and PagerDuty, and of the "
        "live site's absolute links when status_page_url is not set",
    )
    trusted_proxies: list[str] = Field(
        default_factory=lambda: ["127.0.0.1", "::1"],
        description="addresses or networks (10.0.0.0/8) of the load balancers in front: only "
        "a request from one of them has its X-Forwarded-For / X-Forwarded-Proto believed",
    )
    rate_limit_per_ip: PerIpRateLimits = Field(default_factory=PerIpRateLimits)
    heartbeat_url: SecretRef | None = Field(
        default=None,
        description="a dead man's switch (healthchecks.io, Cronitor, Better Stack): fetched "
        "every heartbeat_interval_seconds while /readyz would answer ready; a secret, since "
        "the URL is the credential",
    )
    heartbeat_fail_url: SecretRef | None = Field(
        default=None,
        description="fetched instead while not ready (healthchecks.io: the URL + /fail)",
    )
    heartbeat_interval_seconds: float = Field(default=60.0, gt=0)
    log_format: Literal["auto", "json", "text"] = Field(
        default="auto", description="auto: text on a terminal, JSON lines otherwise"
    )
    access_log: bool = Field(
        default=False,
        description="one line per request (the path without its query string); off by "
        "default: the load balancer logs requests too, and an outage's crowd would flood it",
    )

    @field_validator("public_url")
    @classmethod
    def _absolute_http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        scheme, _, rest = value.partition("://")
        if scheme not in ("http", "https") or not rest.strip("/") or any(c in rest for c in "?#"):
            raise ValueError(
                f"'{value}' is not a base URL — write it like https://status.example.com"
            )
        return value.rstrip("/")

    @field_validator("trusted_proxies")
    @classmethod
    def _addresses_or_networks(cls, value: list[str]) -> list[str]:
        for entry in value:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(
                    f"'{entry}' is not an IP address or network — write it like 10.0.0.5 or "
                    "10.0.0.0/8 (a host name or * would trust anyone who can fake it)"
                ) from None
        return value


class HookSettings(BaseModel):
    """Monitoring webhooks: each source is enabled by naming its secret(s).

    A source with two credentials configured (a bearer token and an HMAC secret) needs
    both on every request."""

    model_config = ConfigDict(extra="forbid")

    alertmanager_token: SecretRef | None = Field(
        default=None, description="bearer token Alertmanager sends (http_config.authorization)"
    )
    grafana_token: SecretRef | None = Field(
        default=None, description="bearer token Grafana sends (Authorization header credentials)"
    )
    grafana_hmac_secret: SecretRef | None = Field(
        default=None, description="the contact point's HMAC signature secret"
    )
    grafana_hmac_header: str = Field(
        default="X-Grafana-Alerting-Signature",
        min_length=1,
        description="the contact point's HMAC signature header; set it in Grafana too: left "
        "empty there, Grafana sends X-Grafana-Alert-Signature",
    )
    grafana_hmac_timestamp_header: str = Field(
        default="X-Grafana-Alerting-Signature-Timestamp",
        min_length=1,
        description="the contact point's HMAC timestamp header (Grafana has no default); "
        "when a request carries it, the signature covers 'timestamp:body'",
    )
    grafana_hmac_timestamp_tolerance_seconds: float = Field(
        default=300.0, gt=0, description="a signed timestamp further from now is refused"
    )
    pagerduty_secret: SecretRef | None = Field(
        default=None, description="the V3 webhook subscription's signing secret"
    )
    generic_token: SecretRef | None = Field(
        default=None, description="bearer token for POST /hooks/generic"
    )
    generic_hmac_secret: SecretRef | None = Field(
        default=None,
        description="HMAC-SHA256 key for X-Broadcaster-Signature: sha256=<hex> of the body",
    )
    max_body_bytes: int = Field(default=1_048_576, gt=0)


class Route(BaseModel):
    """Which alerts become which public update: matchers -> template, components, channels.

    Public text never comes from the alert unless mapped here: `fields` are literal,
    `alert_fields` names the only labels/annotations a template may see.
    """

    model_config = ConfigDict(extra="forbid")

    name: str
    source: str = Field(default="*", description="alertmanager, … or * for any")
    match: dict[str, str] = Field(
        default_factory=dict, description="label = value; all must equal the alert's"
    )
    playbook: str | None = Field(
        default=None,
        description="an emergency protocol (playbooks.NAME) giving the title, template, "
        "impact, components, channels, fields and promise this route does not set itself",
    )
    title: str | None = Field(default=None, description="the public title of the incident")
    template: str | None = None
    impact: Impact | None = None
    components: dict[str, ComponentState] = Field(default_factory=dict)
    channels: list[str] | None = None
    next_update_in: Duration | None = Field(
        default=None, description="the promise of the next update its updates make"
    )
    action: Literal["draft", "publish"] = Field(
        default="draft", description="draft: held for a human to approve (alert text is internal)"
    )
    fields: dict[str, str] = Field(default_factory=dict)
    alert_fields: dict[str, str] = Field(
        default_factory=dict,
        description="template field = 'labels.NAME' or 'annotations.NAME'",
    )
    min_update_interval_seconds: float = Field(
        default=300.0,
        ge=0,
        description="flapping damping (publish routes): an alert's update coming sooner "
        "than this after the incident's previous update is held until then, and dropped if "
        "the alert fires again meanwhile; 0 publishes at once",
    )

    @field_validator("alert_fields")
    @classmethod
    def _known_places(cls, value: dict[str, str]) -> dict[str, str]:
        for field, place in value.items():
            kind, _, name = place.partition(".")
            if kind not in ("labels", "annotations") or not name:
                raise ValueError(f"{field} = '{place}': write 'labels.NAME' or 'annotations.NAME'")
        return value


_TIME_OF_DAY = re.compile(r"^\s*([01]?\d|2[0-3]):([0-5]\d)\s*$")


def parse_time_of_day(value: object) -> object:
    """'22:00' (or a TOML local time, 22:00:00) -> a time of day; a clear error otherwise."""
    if isinstance(value, time):
        return value
    match = _TIME_OF_DAY.match(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"'{value}' is not a time of day — write it like 22:00 or 07:30")
    return time(int(match[1]), int(match[2]))


TimeOfDay = Annotated[time, BeforeValidator(parse_time_of_day)]


class QuietHours(BaseModel):
    """A nightly window, in each subscriber's own time zone, when only `critical` updates
    reach subscribers; the others wait until `end`. `start` after `end` crosses midnight."""

    model_config = ConfigDict(extra="forbid")

    start: TimeOfDay = Field(description="local time the window opens, like 22:00")
    end: TimeOfDay = Field(description="local time held updates go out, like 08:00")

    @model_validator(mode="after")
    def _not_empty(self) -> QuietHours:
        if self.start == self.end:
            raise ValueError(
                f"start and end are both {self.start:%H:%M} — give a window (22:00 to 08:00), "
                "or remove quiet_hours"
            )
        return self


class SubscriberSettings(BaseModel):
    """How subscribers are read and kept."""

    model_config = ConfigDict(extra="forbid")

    default_region: str | None = Field(
        default=None,
        min_length=2,
        max_length=2,
        description="ISO country (FR, US…) for phone numbers written without +country code",
    )
    retention_days: PositiveInt | None = Field(
        default=None, description="delete subscriber delivery records older than this"
    )
    quiet_hours: QuietHours | None = Field(
        default=None,
        description='{start = "22:00", end = "08:00"}: updates below critical impact wait '
        "until `end` for a subscriber whose local time (their time zone, else `timezone`) "
        "is inside the window; unset: always sent at once",
    )
    # Self-service: the public subscribe form and manage pages of `serve`.
    self_service: bool = Field(
        default=False,
        description="serve /subscribe (email double opt-in, SMS opt-in by code) and the "
        "/manage/… page every email links to; needs secret and serve.public_url",
    )
    secret: SecretRef | None = Field(
        default=None,
        description="the key that signs confirmation, manage and form tokens (a long random "
        "string), from env or file; changing it voids every link already sent",
    )
    sms_countries: list[str] = Field(
        default_factory=list,
        description="ISO countries (FR, US…) whose mobile numbers may sign up for SMS; "
        "empty: no SMS sign-up (SMS-pumping fraud sends codes to numbers abroad)",
    )
    sms_codes_per_day: PositiveInt = Field(
        default=200, description="SMS confirmation codes sent per UTC day, all numbers together"
    )
    confirm_hours: PositiveInt = Field(
        default=48, description="how long an email confirmation link works"
    )
    sms_code_minutes: PositiveInt = Field(
        default=10, description="how long an SMS confirmation code works"
    )
    pending_limit_per_address_per_day: PositiveInt = Field(
        default=3, description="confirmation messages one address may get per UTC day"
    )
    proof_of_work_bits: int = Field(
        default=18,
        ge=0,
        le=28,
        description="the subscribe form's proof of work: leading zero bits of a SHA-256 the "
        "browser must find (18: about 0.1-1 s; each bit doubles it); 0: none",
    )
    support_contact: str | None = Field(
        default=None,
        description="who subscribers reach for help (an email, phone number or URL): "
        "part of the answer to an SMS saying HELP",
    )
    replies_to: str | None = Field(
        default=None,
        description="the team's channel (Slack…) that SMS replies other than STOP, START, "
        "STATUS and HELP are forwarded to; unset: they are only recorded",
    )

    @field_validator("sms_countries")
    @classmethod
    def _iso_countries(cls, value: list[str]) -> list[str]:
        codes = [code.strip().upper() for code in value]
        for code in codes:
            if not re.fullmatch(r"[A-Z]{2}", code):
                raise ValueError(f"'{code}' is not an ISO country code — write it like FR or US")
        return codes

    @model_validator(mode="after")
    def _self_service_needs_a_secret(self) -> SubscriberSettings:
        if self.self_service and self.secret is None:
            raise ValueError(
                "self_service needs secret = {env = ...} or {file = ...}: the key that signs "
                "its links (a long random string)"
            )
        return self


def _duration(value: object) -> object:
    """'5m' -> timedelta (numbers are seconds, as pydantic reads them)."""
    return parse_duration(value) if isinstance(value, str) else value


Duration = Annotated[timedelta, BeforeValidator(_duration)]
HoldingPolicy = Literal["publish", "draft", "off"]
DEFAULT_HOLDING: dict[Impact, HoldingPolicy] = {
    Impact.CRITICAL: "publish",
    Impact.MAJOR: "publish",
    Impact.MINOR: "draft",
    Impact.NONE: "draft",
}


class CadenceSettings(BaseModel):
    """Promised updates (an update's `next_update_at`): the team is nudged before one is
    due, and when it passes with nothing posted a holding update goes out (or waits for
    approval), per the incident's impact."""

    model_config = ConfigDict(extra="forbid")

    notify: list[str] = Field(
        default_factory=list,
        description="the team's own chat channels (Slack, Telegram group…): nudges, "
        "holding drafts to approve, missed promises",
    )
    nudge_before: Duration = Field(
        default=timedelta(minutes=5), description="how long before a promised update is due"
    )
    holding: dict[Impact, HoldingPolicy] = Field(
        default_factory=lambda: dict(DEFAULT_HOLDING),
        description="per impact, when a promised update is due and nothing was posted: "
        "publish the `holding` template, draft it for approval (and tell the team), or "
        "only tell the team",
    )
    holding_next_update_in: Duration = Field(
        default=timedelta(minutes=30), description="the fresh promise a holding update makes"
    )
    maintenance_notices: list[Duration] = Field(
        default_factory=lambda: [timedelta(hours=72), timedelta(hours=24)],
        description="before a scheduled maintenance starts, its notice goes out again this "
        "long ahead (counted on the clock of `timezone`: 24h before 02:00 is 02:00 the day "
        "before, across a daylight-saving change too); its start and end messages go out "
        "by themselves",
    )
    escalate_after: Duration | None = Field(
        default=None,
        description="an incident still unresolved this long after it opened is escalated",
    )
    escalate_to: list[str] = Field(
        default_factory=list,
        description="chat channels told of an escalation (default: notify)",
    )
    grace: Duration = Field(
        default=timedelta(minutes=15),
        description="a due time found this late (the scheduler was down) is reported as "
        "missed instead of fired",
    )


class Playbook(BaseModel):
    """An emergency protocol: a pre-approved first update (template, components, impact,
    channels, text) and its promise of the next one, fired in one command
    (`broadcaster playbook run NAME`) or by a monitoring route (`playbook = NAME`)."""

    model_config = ConfigDict(extra="forbid")

    description: str = ""
    title: str = Field(description="the public title of the incident it opens")
    status: Literal["investigating", "identified", "monitoring"] = "investigating"
    template: str | None = Field(default=None, description="default: the status's")
    impact: Impact = Impact.CRITICAL
    components: dict[str, ComponentState] = Field(default_factory=dict)
    fields: dict[str, str] = Field(default_factory=dict, description="the pre-approved text")
    channels: list[str] | None = Field(default=None, description="default: default_channels")
    next_update_in: Duration | None = Field(
        default=timedelta(minutes=30),
        description="the promise of the first update; the cadence policy keeps it",
    )

    def request(
        self, *, actor: str, now: datetime, fields: Mapping[str, str] | None = None
    ) -> UpdateRequest:
        """The update this playbook publishes now (`fields` add to or replace its own)."""
        return UpdateRequest(
            status=IncidentStatus(self.status),
            template=self.template,
            title=self.title,
            impact=self.impact,
            components=dict(self.components),
            fields={**self.fields, **(fields or {})},
            next_update_at=now + self.next_update_in if self.next_update_in else None,
            channels=self.channels,
            actor=actor,
        )


class Settings(BaseSettings):
    """Everything broadcaster.toml can say; BROADCASTER_* environment variables override it."""

    model_config = SettingsConfigDict(
        env_prefix="BROADCASTER_", extra="forbid", env_nested_delimiter="__"
    )

    store: str = Field(default="sqlite:///broadcaster.db", description="SQLAlchemy URL")
    backend: Literal["embedded", "procrastinate"] = Field(
        default="embedded",
        description="embedded: this process sends; procrastinate: `broadcaster worker`s do, "
        "on PostgreSQL",
    )
    workers: WorkerSettings = Field(default_factory=WorkerSettings)
    templates_dir: Path | None = Field(default=None, description="your templates; override ours")
    data_dir: Path = Field(default=Path(".broadcaster"), description="sessions, caches")
    page_title: str = "Service status"
    status_page_url: str | None = None
    timezone: TimeZoneName = "UTC"
    languages: list[str] = Field(default_factory=lambda: ["en"])
    default_channels: list[str] = Field(default_factory=list)
    components: dict[str, str] = Field(
        default_factory=dict, description="component name -> name shown to users"
    )
    channels: dict[str, dict[str, Any]] = Field(default_factory=dict)
    dispatch: DispatchSettings = Field(default_factory=DispatchSettings)
    serve: ServeSettings = Field(default_factory=ServeSettings)
    hooks: HookSettings = Field(default_factory=HookSettings)
    subscribers: SubscriberSettings = Field(default_factory=SubscriberSettings)
    cadence: CadenceSettings = Field(default_factory=CadenceSettings)
    playbooks: dict[str, Playbook] = Field(default_factory=dict)
    routes: list[Route] = Field(default_factory=list)
    config_path: Path | None = Field(default=None, exclude=True)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file is passed as init values; the environment must win over it.
        return (env_settings, init_settings)

    @model_validator(mode="after")
    def _routes_take_their_playbook(self) -> Settings:
        """A route naming a playbook takes from it what the route does not set."""
        for index, route in enumerate(self.routes):
            if route.playbook is None:
                if route.title is None:
                    raise ValueError(f"routes[{index}] ({route.name}): title is required")
                continue
            playbook = self.playbooks.get(route.playbook)
            if playbook is None:
                raise ValueError(
                    f"routes[{index}] ({route.name}): unknown playbook '{route.playbook}' — "
                    f"configured: {', '.join(self.playbooks) or 'none'}"
                )
            given = route.model_fields_set
            taken: dict[str, Any] = {
                name: getattr(playbook, name)
                for name in ("title", "template", "impact", "components", "channels")
                if name not in given
            }
            taken["fields"] = {**playbook.fields, **route.fields}
            if "next_update_in" not in given:
                taken["next_update_in"] = playbook.next_update_in
            self.routes[index] = route.model_copy(update=taken)
        return self

    def _check_names(self, where: str, components: Iterable[str], channels: Iterable[str]) -> None:
        """Refuse (naming `where`) a component or a channel the config does not have."""
        unknown = [c for c in components if self.components and c not in self.components]
        if unknown:
            raise ValueError(
                f"{where}: unknown component '{unknown[0]}' — configured: "
                f"{', '.join(self.components)}"
            )
        missing = [c for c in channels if c not in self.channels]
        if missing:
            raise ValueError(
                f"{where}: unknown channel '{missing[0]}' — configured: "
                f"{', '.join(self.channels) or 'none'}"
            )

    @model_validator(mode="after")
    def _workers_share_postgresql(self) -> Settings:
        """Jobs live in the store's database: only PostgreSQL serves several nodes."""
        if self.backend == "procrastinate" and not self.store_url.startswith("postgresql+psycopg"):
            raise ValueError(
                'backend = "procrastinate" needs store = "postgresql://…" (psycopg 3; the jobs '
                "live in the same database as incidents and deliveries)"
            )
        return self

    @model_validator(mode="after")
    def _playbooks_name_what_exists(self) -> Settings:
        for name, playbook in self.playbooks.items():
            self._check_names(f"playbooks.{name}", playbook.components, playbook.channels or [])
        return self

    @model_validator(mode="after")
    def _routes_name_what_exists(self) -> Settings:
        """A route naming an unknown component or channel would fail on every alert it
        matches, mid-outage: refuse it when the config loads instead."""
        for index, route in enumerate(self.routes):
            where = f"routes[{index}] ({route.name})"
            self._check_names(where, route.components, route.channels or [])
        return self

    @model_validator(mode="after")
    def _team_channels_exist(self) -> Settings:
        self._check_names("cadence.notify", (), self.cadence.notify)
        self._check_names("cadence.escalate_to", (), self.cadence.escalate_to)
        return self

    @model_validator(mode="after")
    def _replies_go_to_a_channel(self) -> Settings:
        target = self.subscribers.replies_to
        if target is not None and target not in self.channels:
            raise ValueError(
                f"subscribers.replies_to: unknown channel '{target}' — configured: "
                f"{', '.join(self.channels) or 'none'}"
            )
        return self

    @model_validator(mode="after")
    def _self_service_needs_a_public_url(self) -> Settings:
        """Confirmation and manage links are absolute: made from serve.public_url, never
        from a request's Host header (which a visitor chooses)."""
        if self.subscribers.self_service and self.serve.public_url is None:
            raise ValueError(
                "subscribers.self_service needs serve.public_url (https://status.example.com): "
                "the links in confirmation emails and every email's manage link start with it"
            )
        return self

    def resolve_path(self, path: Path) -> Path:
        """Paths in the file are relative to the file's folder."""
        base = self.config_path.parent if self.config_path else Path.cwd()
        return path if path.is_absolute() else base / path

    @property
    def store_url(self) -> str:
        """The store URL, with a relative SQLite path made relative to the config file."""
        for prefix in ("sqlite:///", "sqlite+aiosqlite:///"):
            if self.store.startswith(prefix):
                path = self.store[len(prefix) :]
                if path and path != ":memory:" and not path.startswith("/"):
                    path = str(self.resolve_path(Path(path)))
                return f"sqlite+aiosqlite:///{path}"
        if self.store.startswith(("postgresql://", "postgres://")):
            return "postgresql+psycopg://" + self.store.split("://", 1)[1]
        return self.store


def find_config(explicit: Path | None = None) -> Path | None:
    """--config, else $BROADCASTER_CONFIG, else ./broadcaster.toml if it exists."""
    if explicit is not None:
        return explicit
    env = os.environ.get("BROADCASTER_CONFIG")
    if env:
        return Path(env)
    here = Path.cwd() / CONFIG_FILE_NAME
    return here if here.is_file() else None


def load_settings(path: Path | None = None) -> Settings:
    """Read and validate the settings; a ConfigError names the file and the key."""
    path = find_config(path)
    values: dict[str, Any] = {}
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"{path}: no such file — run `broadcaster init` to write one")
        try:
            values = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        return Settings(**values, config_path=path.resolve() if path else None)
    except ValidationError as exc:
        raise ConfigError(
            describe_validation_error(exc, path.resolve() if path else None)
        ) from None


def describe_validation_error(exc: ValidationError, path: Path | None, prefix: str = "") -> str:
    """The first problem of a ValidationError as 'file: key.path: message'."""
    where = f"{path}: " if path else ""
    problems = []
    for error in exc.errors():
        key = ".".join(str(part) for part in (prefix, *error["loc"]) if part != "")
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        problems.append(f"{where}{key}: {message}")
    extra = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return problems[0] + extra
