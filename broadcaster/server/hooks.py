"""Monitoring webhooks: authenticate, size-limit, parse, then hand events to the intake."""

from __future__ import annotations

import hmac
import json
from datetime import datetime
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from broadcaster.alerts import AlertEvent, IntakeResult, take_alert
from broadcaster.core import Broadcaster
from broadcaster.secrets import SecretRef


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

    version: Literal["4"]
    groupKey: str = Field(min_length=1)
    status: Literal["firing", "resolved"]
    commonLabels: dict[str, str] = Field(default_factory=dict)
    commonAnnotations: dict[str, str] = Field(default_factory=dict)
    alerts: list[AlertmanagerAlert] = Field(min_length=1)

    def event(self) -> AlertEvent:
        """The group as one event; it started when its earliest alert did."""
        return AlertEvent(
            source="alertmanager",
            group=self.groupKey,
            status=self.status,
            started_at=min(alert.startsAt for alert in self.alerts),
            labels=self.commonLabels,
            annotations=self.commonAnnotations,
        )


def bearer_matches(header: str | None, expected: str) -> bool:
    """Constant-time comparison of an `Authorization: Bearer …` header."""
    scheme, _, token = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        token.strip().encode(), expected.encode()
    )


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


def schema_error(exc: ValidationError) -> HTTPException:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "body"
    return HTTPException(status_code=422, detail=f"{where}: {first['msg']}")


def hooks_router(broadcaster: Broadcaster) -> APIRouter:
    """POST /hooks/alertmanager (more sources join here)."""
    router = APIRouter(prefix="/hooks")
    settings = broadcaster.settings.hooks
    base_dir = broadcaster.settings.resolve_path(Path("."))

    def token(ref: SecretRef | None, source: str) -> str:
        secret = ref.resolve(base_dir) if ref is not None else None
        if secret is None:
            raise HTTPException(status_code=404, detail=f"the {source} hook is not configured")
        return secret.get_secret_value()

    @router.post("/alertmanager")
    async def alertmanager(request: Request) -> dict[str, list[IntakeResult]]:
        """Prometheus Alertmanager, webhook_config with a bearer token."""
        expected = token(settings.alertmanager_token, "alertmanager")
        authorization = request.headers.get("authorization")
        if authorization is None:
            raise HTTPException(
                status_code=401,
                detail="missing Authorization: Bearer",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not bearer_matches(authorization, expected):
            raise HTTPException(status_code=403, detail="wrong token")
        body = await read_body(request, settings.max_body_bytes)
        try:
            notification = AlertmanagerNotification.model_validate(parse_json(body))
        except ValidationError as exc:
            raise schema_error(exc) from None
        return {"results": [await take_alert(broadcaster, notification.event())]}

    return router
