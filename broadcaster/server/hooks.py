"""Monitoring webhooks: authenticate, size-limit, parse, then hand events to the intake.

Every source goes through the same steps, written once in `receive()`: 404 while the
source has no credential configured, 401 when a credential is missing from the request,
403 when one is wrong, 413 over `hooks.max_body_bytes`, 400 for malformed JSON, 422 naming
the first field that does not fit the source's payload. Only then is anything stored.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, TypeVar

from fastapi import APIRouter, HTTPException, Request
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import Headers

from broadcaster.alerts import AlertEvent, IntakeResult, take_alert
from broadcaster.core import Broadcaster
from broadcaster.secrets import SecretRef
from broadcaster.store.store import alert_group

log = logging.getLogger("broadcaster.hooks")

Results = dict[str, list[IntakeResult]]
Payload = TypeVar("Payload", bound=BaseModel)


# -- payloads -------------------------------------------------------------------------


class AlertmanagerAlert(BaseModel):
    """One alert of an Alertmanager notification (webhook payload version 4)."""

    status: Literal["firing", "resolved"]
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    startsAt: datetime
    endsAt: datetime | None = None
    fingerprint: str = ""


class AlertmanagerNotification(BaseModel):
    """Alertmanager's webhook body: one alert group."""

    model_config = ConfigDict(extra="allow")
    source: ClassVar[str] = "alertmanager"

    version: Literal["4"]
    groupKey: str = Field(min_length=1)
    status: Literal["firing", "resolved"]
    commonLabels: dict[str, str] = Field(default_factory=dict)
    commonAnnotations: dict[str, str] = Field(default_factory=dict)
    alerts: list[AlertmanagerAlert] = Field(min_length=1)

    def event(self) -> AlertEvent:
        """The group as one event; it started when its earliest alert did."""
        return AlertEvent(
            source=self.source,
            group=self.groupKey,
            status=self.status,
            started_at=min(alert.startsAt for alert in self.alerts),
            labels=self.commonLabels,
            annotations=self.commonAnnotations,
        )


class GrafanaNotification(AlertmanagerNotification):
    """Grafana unified alerting's webhook body (version "1"): Alertmanager's shape plus
    orgId, title, state and message, which Grafana's docs mark as to be deprecated."""

    source: ClassVar[str] = "grafana"

    version: Literal["1"]  # type: ignore[assignment]  # Grafana's own payload version
    orgId: int | None = None

    def event(self) -> AlertEvent:
        """As Alertmanager's, but two Grafana organisations may share a group key."""
        event = super().event()
        if self.orgId is None:
            return event
        return event.model_copy(update={"group": f"org{self.orgId}:{self.groupKey}"})


# The PagerDuty event types that open or close an episode; the others are acknowledged.
PAGERDUTY_STATUSES: dict[str, Literal["firing", "resolved"]] = {
    "incident.triggered": "firing",
    "incident.resolved": "resolved",
}


class PagerDutyService(BaseModel):
    id: str = ""
    summary: str = ""


class PagerDutyPriority(BaseModel):
    summary: str = ""


class PagerDutyIncident(BaseModel):
    """`event.data` of an incident event (PagerDuty's "incident" event data type)."""

    id: str = Field(min_length=1)
    type: Literal["incident"]
    title: str = ""
    status: str = ""
    created_at: datetime | None = None
    html_url: str = ""
    service: PagerDutyService | None = None
    priority: PagerDutyPriority | None = None
    urgency: str | None = None


class PagerDutyEvent(BaseModel):
    """The one outbound event a V3 webhook carries; `data` depends on `event_type`."""

    id: str = ""
    event_type: str = Field(min_length=1)
    resource_type: str = ""
    occurred_at: datetime
    data: dict[str, Any] = Field(default_factory=dict)


class PagerDutyWebhook(BaseModel):
    """PagerDuty's V3 webhook body."""

    event: PagerDutyEvent

    def alert_event(self) -> AlertEvent | IntakeResult:
        """The incident as an alert event (group = PagerDuty's incident id), or why not.

        Labels for routing: service, service_id, urgency, priority (when the incident
        has one), title, event_type. Annotations: summary (the title) and html_url."""
        event = self.event
        status = PAGERDUTY_STATUSES.get(event.event_type)
        if status is None:
            return IntakeResult(
                action="ignored", reason=f"event type {event.event_type} is not handled"
            )
        try:
            incident = PagerDutyIncident.model_validate(event.data)
        except ValidationError as exc:
            raise schema_error(exc, at=("event", "data")) from None
        labels = {
            "service": incident.service.summary if incident.service else "",
            "service_id": incident.service.id if incident.service else "",
            "urgency": incident.urgency or "",
            "priority": incident.priority.summary if incident.priority else "",
            "title": incident.title,
            "event_type": event.event_type,
        }
        annotations = {"summary": incident.title, "html_url": incident.html_url}
        return AlertEvent(
            source="pagerduty",
            group=incident.id,
            status=status,
            # Only a firing event's start matters (it keys the episode); a resolution
            # finds the open incident by its group. created_at is the same on every
            # re-delivery of incident.triggered, so a repeat is recognised.
            started_at=incident.created_at or event.occurred_at,
            labels={k: v for k, v in labels.items() if v},
            annotations={k: v for k, v in annotations.items() if v},
        )


class GenericAlert(BaseModel):
    """POST /hooks/generic: one alert group, for tools with no payload of their own."""

    model_config = ConfigDict(extra="forbid")

    group: str = Field(min_length=1)
    status: Literal["firing", "resolved"]
    started_at: AwareDatetime | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


# -- credentials ----------------------------------------------------------------------


class Credential(Protocol):
    """Something a request must carry; its absence is a 401, a wrong one a 403."""

    @property
    def header(self) -> str:
        """The request header that carries it."""
        ...

    @property
    def signs_body(self) -> bool:
        """Whether checking it needs the body."""
        ...

    def missing(self) -> HTTPException: ...

    def refusal(self, headers: Headers, body: bytes) -> str | None:
        """Why the request's credential is wrong, or None when it is right."""
        ...


def bearer_matches(header: str | None, expected: str) -> bool:
    """Constant-time comparison of an `Authorization: Bearer …` header."""
    scheme, _, token = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        token.strip().encode(), expected.encode()
    )


@dataclass(frozen=True)
class BearerToken:
    """`Authorization: Bearer <token>`, checked before the body is read."""

    token: str
    header: str = "Authorization"
    signs_body: bool = False

    def missing(self) -> HTTPException:
        return HTTPException(
            status_code=401,
            detail="missing Authorization: Bearer",
            headers={"WWW-Authenticate": "Bearer"},
        )

    def refusal(self, headers: Headers, body: bytes) -> str | None:
        return None if bearer_matches(headers.get(self.header), self.token) else "wrong token"


@dataclass(frozen=True)
class BodySignature:
    """Hex HMAC-SHA256 of the raw body in a header.

    The header may hold several comma-separated signatures (PagerDuty sends one per
    secret while a secret is being rotated): any match passes. With `timestamp_header`
    set and present on the request, the signed message is `timestamp:body` (Grafana's
    scheme) and the timestamp must be within `tolerance_seconds` of now."""

    secret: str
    header: str
    prefix: str = ""
    timestamp_header: str | None = None
    tolerance_seconds: float = 300.0
    signs_body: bool = True

    def missing(self) -> HTTPException:
        return HTTPException(status_code=401, detail=f"missing {self.header} signature")

    def refusal(self, headers: Headers, body: bytes) -> str | None:
        message = body
        stamp = headers.get(self.timestamp_header) if self.timestamp_header else None
        if stamp is not None:
            try:
                skew = abs(time.time() - int(stamp))
            except ValueError:
                return f"{self.timestamp_header} is not a Unix timestamp"
            if skew > self.tolerance_seconds:
                return f"{self.timestamp_header} is more than {self.tolerance_seconds:g} s from now"
            message = stamp.encode() + b":" + body
        digest = hmac.new(self.secret.encode(), message, hashlib.sha256).hexdigest()
        expected = (self.prefix + digest).encode()
        matched = False
        for candidate in headers[self.header].split(","):
            matched |= hmac.compare_digest(candidate.strip().lower().encode(), expected)
        return None if matched else "wrong signature"


# -- the shared steps -----------------------------------------------------------------


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused past `limit` bytes without reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(status_code=413, detail=f"body over {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPException(status_code=413, detail=f"body over {limit} bytes")
    return bytes(body)


def parse_json(body: bytes) -> object:
    try:
        return json.loads(body)
    except ValueError as exc:
        raise HTTPException(status_code=400, detail=f"malformed JSON: {exc}") from None


def schema_error(exc: ValidationError, *, at: tuple[str, ...] = ()) -> HTTPException:
    """A 422 naming the first failing field by its path in the body."""
    first = exc.errors()[0]
    where = ".".join(str(part) for part in (*at, *first["loc"])) or "body"
    return HTTPException(status_code=422, detail=f"{where}: {first['msg']}")


async def receive(
    request: Request, credentials: list[Credential], model: type[Payload], limit: int
) -> Payload:
    """Authenticate, read and validate one webhook request; nothing is stored before.

    Header-only credentials are checked before the body is read; body signatures after
    the size limit."""

    def refuse_wrong(signs_body: bool, body: bytes) -> None:
        for credential in credentials:
            if credential.signs_body is signs_body:
                refusal = credential.refusal(request.headers, body)
                if refusal is not None:
                    raise HTTPException(status_code=403, detail=refusal)

    for credential in credentials:
        if credential.header not in request.headers:
            raise credential.missing()
    refuse_wrong(False, b"")
    body = await read_body(request, limit)
    refuse_wrong(True, body)
    try:
        return model.model_validate(parse_json(body))
    except ValidationError as exc:
        raise schema_error(exc) from None


async def generic_event(broadcaster: Broadcaster, alert: GenericAlert) -> AlertEvent:
    """A generic alert as an event. Without `started_at`, a firing alert whose episode is
    still waiting as a pending draft keeps that episode's start, so a repeat is a
    duplicate rather than a second draft; otherwise it starts now."""
    started_at = alert.started_at
    if started_at is None:
        started_at = datetime.now(UTC)
        group = f"generic:{alert.group}"
        for draft in await broadcaster.drafts():
            if draft.alert_key is not None and alert_group(draft.alert_key) == group:
                started_at = datetime.fromisoformat(draft.alert_key.rpartition("|")[2])
                break
    return AlertEvent(
        source="generic",
        group=alert.group,
        status=alert.status,
        started_at=started_at,
        labels=alert.labels,
        annotations=alert.annotations,
    )


def hooks_router(broadcaster: Broadcaster) -> APIRouter:
    """POST /hooks/alertmanager, /hooks/grafana, /hooks/pagerduty, /hooks/generic."""
    refusals = {
        400: "malformed JSON",
        401: "a credential is missing",
        403: "a credential is wrong",
        404: "this source has no credential configured",
        413: "body over hooks.max_body_bytes",
        422: "the body does not fit the source's payload",
        429: "too many requests from this address",
    }
    router = APIRouter(
        prefix="/hooks",
        tags=["monitoring webhooks"],
        responses={code: {"description": why} for code, why in refusals.items()},
    )
    settings = broadcaster.settings.hooks
    base_dir = broadcaster.settings.resolve_path(Path("."))
    limit = settings.max_body_bytes

    def secret(source: str, key: str) -> str | None:
        """The secret `hooks.<key>` names; None when not configured. A secret that is
        configured but cannot be read closes the hook instead of weakening it."""
        ref: SecretRef | None = getattr(settings, key)
        if ref is None:
            return None
        value = ref.resolve(base_dir)
        if value is None or not value.get_secret_value():
            log.warning("hooks.%s: nothing at %s; /hooks/%s is closed", key, ref.describe(), source)
            raise not_configured(source)
        return value.get_secret_value()

    def not_configured(source: str) -> HTTPException:
        return HTTPException(status_code=404, detail=f"the {source} hook is not configured")

    def required(source: str, credentials: list[Credential | None]) -> list[Credential]:
        present = [credential for credential in credentials if credential is not None]
        if not present:
            raise not_configured(source)
        return present

    def bearer(source: str, key: str) -> BearerToken | None:
        token = secret(source, key)
        return BearerToken(token) if token is not None else None

    @router.post("/alertmanager")
    async def alertmanager(request: Request) -> Results:
        """Prometheus Alertmanager, webhook_config with a bearer token."""
        credentials = required("alertmanager", [bearer("alertmanager", "alertmanager_token")])
        notification = await receive(request, credentials, AlertmanagerNotification, limit)
        return {"results": [await take_alert(broadcaster, notification.event())]}

    @router.post("/grafana")
    async def grafana(request: Request) -> Results:
        """Grafana unified alerting's webhook contact point: bearer token, HMAC, or both."""
        key = secret("grafana", "grafana_hmac_secret")
        signature = None
        if key is not None:
            signature = BodySignature(
                key,
                header=settings.grafana_hmac_header,
                timestamp_header=settings.grafana_hmac_timestamp_header,
                tolerance_seconds=settings.grafana_hmac_timestamp_tolerance_seconds,
            )
        credentials = required("grafana", [bearer("grafana", "grafana_token"), signature])
        notification = await receive(request, credentials, GrafanaNotification, limit)
        return {"results": [await take_alert(broadcaster, notification.event())]}

    @router.post("/pagerduty")
    async def pagerduty(request: Request) -> Results:
        """PagerDuty V3 webhook subscription, signed with its secret."""
        key = secret("pagerduty", "pagerduty_secret")
        signature = None
        if key is not None:
            signature = BodySignature(key, header="X-PagerDuty-Signature", prefix="v1=")
        webhook = await receive(
            request, required("pagerduty", [signature]), PagerDutyWebhook, limit
        )
        event = webhook.alert_event()
        if isinstance(event, IntakeResult):
            return {"results": [event]}
        return {"results": [await take_alert(broadcaster, event)]}

    @router.post("/generic")
    async def generic(request: Request) -> Results:
        """Any tool: a small documented JSON body, with a bearer token, HMAC, or both."""
        key = secret("generic", "generic_hmac_secret")
        signature = None
        if key is not None:
            signature = BodySignature(key, header="X-Broadcaster-Signature", prefix="sha256=")
        credentials = required("generic", [bearer("generic", "generic_token"), signature])
        alert = await receive(request, credentials, GenericAlert, limit)
        return {"results": [await take_alert(broadcaster, await generic_event(broadcaster, alert))]}

    return router
