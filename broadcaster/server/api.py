"""The admin API under `/v1/`: what the CLI does, over HTTP, for the remote CLI and scripts.

Every route needs `Authorization: Bearer <token>` with one of `serve.api_tokens`; a
token's scope is read < publish < admin. The audit trail records who acted as
`api:<token name>`, with the person the client names (`X-Broadcaster-Actor`) in front.
While no token is configured, the API answers 404.
"""

# No `from __future__ import annotations`: FastAPI must see the route signatures'
# dependencies (defined inside `api_router`) as objects, not as names to look up.
import hmac
import logging
import pathlib
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, HTTPException, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from broadcaster.config import Playbook
from broadcaster.core import Broadcaster, DoctorCheck, PublishResult
from broadcaster.errors import BroadcasterError, CheckFailedError, NotFoundError
from broadcaster.models import (
    AuditEntry,
    ChannelInfo,
    ChannelProgress,
    CheckFailure,
    Delivery,
    DeliveryState,
    Draft,
    DraftState,
    ImportReport,
    Incident,
    NewSubscriber,
    Preview,
    Reminder,
    Retraction,
    Subscriber,
    TemplateInfo,
    UpdateRequest,
)
from broadcaster.server.hooks import read_body
from broadcaster.subscribers import CSV_COLUMNS, InvalidSubscriberError

log = logging.getLogger("broadcaster.api")

Scope = Literal["read", "publish", "admin"]
_RANK: dict[Scope, int] = {"read": 0, "publish": 1, "admin": 2}
ACTOR_HEADER = "X-Broadcaster-Actor"
_MAX_ID = 2**63 - 1  # the store's integer keys; larger numbers name nothing
IncidentId = Annotated[int, Path(ge=1, le=_MAX_ID)]
UpdateId = Annotated[int, Path(ge=1, le=_MAX_ID)]
DraftId = Annotated[int, Path(ge=1, le=_MAX_ID)]
SubscriberId = Annotated[int, Path(ge=1, le=_MAX_ID)]
# A CSV import is read whole, then stored a row per transaction (about 1.5 ms a row on
# SQLite): 2 MiB is some 30,000 rows, under a minute. Bigger lists come in several files.
IMPORT_MAX_BYTES = 2 * 1024 * 1024


@dataclass(frozen=True)
class Caller:
    """Who called: the token's name and scope, and the actor recorded for them."""

    token: str
    scope: Scope
    actor: str


class ApiError(BaseModel):
    """Every refusal: one line a person can act on; `failures` when checks failed."""

    detail: str
    error: str = Field(default="", description="NotFoundError, CheckFailedError, BroadcasterError…")
    failures: list[CheckFailure] = Field(default_factory=list)


class RequestInvalid(BaseModel):
    """FastAPI's own refusal of a request that does not fit the schema."""

    detail: list[dict[str, Any]] = Field(description="each problem: loc, msg, type")


class Settled(BaseModel):
    """Deliveries of some updates per channel, and whether they are done."""

    settled: bool = Field(description="nothing left to send, except on broken channels")
    channels: list[ChannelProgress]


class Requeued(BaseModel):
    requeued: int = Field(description="failed deliveries queued again")
    skipped: int = Field(description="failed deliveries of older updates (superseded)")


class Retracted(BaseModel):
    channels: dict[str, Retraction] = Field(description="per channel, what the retraction does")


class Cancelled(BaseModel):
    cancelled: int = Field(description="queued deliveries stopped")


class Subscription(BaseModel):
    """A subscriber's consent for one channel, as a client sets it."""

    model_config = ConfigDict(extra="forbid")

    subscribed: bool = Field(description="false: opted out (nothing more is sent there)")


def error_response(exc: BroadcasterError) -> JSONResponse:
    """The HTTP answer to a broadcaster error: 404, 422 (checks, a subscriber's phone,
    email or CSV) or 409."""
    status = 409
    failures: list[CheckFailure] = []
    if isinstance(exc, NotFoundError):
        status = 404
    elif isinstance(exc, CheckFailedError):
        status, failures = 422, exc.failures
    elif isinstance(exc, InvalidSubscriberError):
        status = 422
    body = ApiError(detail=str(exc), error=type(exc).__name__, failures=failures)
    return JSONResponse(body.model_dump(mode="json"), status_code=status)


def _responses(*codes: int) -> dict[int | str, dict[str, object]]:
    return {code: {"model": ApiError} for code in codes}


# A route whose body FastAPI validates, and that refuses valid-looking data itself too
# (an email that is not one): 422 comes in either shape.
_INVALID: dict[int | str, dict[str, Any]] = {
    422: {
        "model": ApiError | RequestInvalid,
        "description": "the body does not fit the schema, or the data is refused",
    }
}


def api_router(broadcaster: Broadcaster) -> APIRouter:
    """The `/v1/` routes over `broadcaster`; tokens are resolved once, here."""
    base_dir = broadcaster.settings.resolve_path(pathlib.Path("."))
    tokens: list[tuple[str, Scope, bytes]] = []
    for token in broadcaster.settings.serve.api_tokens:
        secret = token.secret.resolve(base_dir)
        if secret is None:
            log.warning(
                "api token %s is not set (%s): it cannot be used",
                token.name,
                token.secret.describe(),
            )
            continue
        tokens.append((token.name, token.scope, secret.get_secret_value().encode()))

    bearer = HTTPBearer(auto_error=False, description="one of serve.api_tokens")

    def caller(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
        actor: Annotated[
            str | None, Header(alias=ACTOR_HEADER, description="the person behind the client")
        ] = None,
    ) -> Caller:
        if not tokens:
            raise HTTPException(
                status_code=404, detail="the admin API is off: no serve.api_tokens configured"
            )
        if credentials is None or not credentials.credentials.strip():
            raise HTTPException(
                status_code=401,
                detail="missing Authorization: Bearer <token>",
                headers={"WWW-Authenticate": "Bearer"},
            )
        presented = credentials.credentials.strip().encode()
        found = None
        for name, scope, secret in tokens:  # every token compared: no timing by position
            if hmac.compare_digest(presented, secret):
                found = (name, scope)
        if found is None:
            raise HTTPException(status_code=403, detail="unknown token")
        name, scope = found
        person = "".join(ch for ch in (actor or "")[:80] if ch.isprintable()).strip()
        return Caller(name, scope, f"{person} via api:{name}" if person else f"api:{name}")

    def needs(scope: Scope) -> object:
        def check(who: Annotated[Caller, Depends(caller)]) -> Caller:
            if _RANK[who.scope] < _RANK[scope]:
                raise HTTPException(
                    status_code=403,
                    detail=f"token {who.token} has scope {who.scope}; this needs {scope}",
                )
            return who

        return Depends(check)

    Reader = Annotated[Caller, needs("read")]
    Publisher = Annotated[Caller, needs("publish")]
    Admin = Annotated[Caller, needs("admin")]
    DryRun = Annotated[bool, Query(description="check and render; store and send nothing")]

    router = APIRouter(
        prefix="/v1",
        tags=["admin"],
        responses=_responses(401, 403, 404, 409),
    )

    # -- incidents and updates ------------------------------------------------------

    @router.get("/incidents")
    async def list_incidents(
        _who: Reader,
        open_only: bool = False,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
    ) -> list[Incident]:
        """Incidents, newest first."""
        return await broadcaster.incidents(open_only=open_only, limit=limit)

    async def publish_or_preview(
        request: UpdateRequest, incident_id: int | None, who: Caller, dry_run: bool
    ) -> Preview | PublishResult:
        request = request.model_copy(update={"actor": who.actor})
        if dry_run:
            return await broadcaster.preview(request, incident_id)
        return await broadcaster.publish(request, incident_id)

    @router.post(
        "/incidents",
        status_code=201,
        responses={**_responses(422), 200: {"model": Preview, "description": "dry run"}},
    )
    async def open_incident(
        request: UpdateRequest, who: Publisher, response: Response, dry_run: DryRun = False
    ) -> PublishResult | Preview:
        """Open an incident with its first update (`actor` is set from the token)."""
        if dry_run:
            response.status_code = 200
        return await publish_or_preview(request, None, who, dry_run)

    @router.get("/incidents/{incident_id}")
    async def get_incident(incident_id: IncidentId, _who: Reader) -> Incident:
        """One incident with its updates."""
        return await broadcaster.incident(incident_id)

    @router.post(
        "/incidents/{incident_id}/updates",
        status_code=201,
        responses={**_responses(422), 200: {"model": Preview, "description": "dry run"}},
    )
    async def update_incident(
        incident_id: IncidentId,
        request: UpdateRequest,
        who: Publisher,
        response: Response,
        dry_run: DryRun = False,
    ) -> PublishResult | Preview:
        """A follow-up update (status `resolved` resolves the incident)."""
        if dry_run:
            response.status_code = 200
        return await publish_or_preview(request, incident_id, who, dry_run)

    @router.get("/incidents/{incident_id}/audit")
    async def audit(incident_id: IncidentId, _who: Reader) -> list[AuditEntry]:
        """Who did what, oldest first."""
        await broadcaster.incident(incident_id)
        return await broadcaster.audit(incident_id)

    @router.get("/incidents/{incident_id}/progress")
    async def progress(
        incident_id: IncidentId, _who: Reader, channel: str | None = None
    ) -> list[ChannelProgress]:
        """Deliveries per channel, counted by state, with the failures."""
        return await broadcaster.progress(incident_id, channel=channel)

    @router.get("/incidents/{incident_id}/deliveries")
    async def deliveries(
        incident_id: IncidentId,
        _who: Reader,
        channel: str | None = None,
        state: Annotated[list[DeliveryState] | None, Query()] = None,
    ) -> list[Delivery]:
        """Every delivery (one per channel and recipient), optionally by state."""
        await broadcaster.incident(incident_id)
        return await broadcaster.deliveries(incident_id, channel=channel, states=state)

    @router.post("/incidents/{incident_id}/retry")
    async def retry(
        incident_id: IncidentId, who: Publisher, channel: str | None = None
    ) -> Requeued:
        """Queue the failed deliveries of the incident's latest update again."""
        requeued, skipped = await broadcaster.retry(incident_id, channel=channel, actor=who.actor)
        return Requeued(requeued=requeued, skipped=skipped)

    @router.post("/updates/{update_id}/cancel")
    async def cancel(update_id: UpdateId, who: Publisher) -> Cancelled:
        """The kill switch: stop an update's queued deliveries."""
        return Cancelled(cancelled=await broadcaster.cancel(update_id, actor=who.actor))

    @router.post("/updates/{update_id}/retract")
    async def retract(update_id: UpdateId, who: Publisher, dry_run: bool = False) -> Retracted:
        """Take an update back: stop what is queued, delete its posts where the channel
        can (tracked as deliveries), drop it from the status page. `dry_run`: only say
        what would happen."""
        report = await broadcaster.retract(update_id, actor=who.actor, dry_run=dry_run)
        return Retracted(channels=report)

    @router.get("/progress")
    async def settled(
        _who: Reader,
        update_id: Annotated[
            list[Annotated[int, Field(ge=1, le=_MAX_ID)]] | None,
            Query(description="none: every update"),
        ] = None,
    ) -> Settled:
        """Whether these updates are done going out, for clients that wait on them."""
        return Settled(
            settled=await broadcaster.settled(update_id),
            channels=await broadcaster.store.progress(update_ids=update_id),
        )

    @router.get("/incidents/{incident_id}/first-messages")
    async def first_messages(incident_id: IncidentId, _who: Reader) -> dict[str, datetime]:
        """Per channel, when the incident's first message was accepted there."""
        return await broadcaster.first_messages(incident_id)

    @router.get("/incidents/{incident_id}/reminders")
    async def reminders(incident_id: IncidentId, _who: Reader) -> list[Reminder]:
        """The incident's promised updates: each nudge and holding reminder, and its outcome."""
        return await broadcaster.reminders(incident_id)

    @router.get("/playbooks")
    async def playbooks(_who: Reader) -> dict[str, Playbook]:
        """The configured emergency protocols, by name."""
        return await broadcaster.playbooks()

    @router.get("/schedule")
    async def schedule(
        _who: Reader, limit: Annotated[int, Query(ge=1, le=1000)] = 100
    ) -> list[Reminder]:
        """What the scheduler fires next: nudges and holding updates, soonest first."""
        return await broadcaster.schedule(limit=limit)

    # -- drafts ---------------------------------------------------------------------

    @router.get("/drafts")
    async def list_drafts(
        _who: Reader, state: DraftState | Literal["all"] = DraftState.PENDING
    ) -> list[Draft]:
        """Updates held for approval (pending ones unless told)."""
        return await broadcaster.drafts(state=None if state == "all" else state)

    @router.get("/drafts/{draft_id}")
    async def get_draft(draft_id: DraftId, _who: Reader) -> Draft:
        return await broadcaster.draft(draft_id)

    @router.post("/drafts/{draft_id}/approve", responses=_responses(422))
    async def approve(draft_id: DraftId, who: Publisher) -> PublishResult:
        """Publish the draft as it was drafted."""
        return await broadcaster.approve(draft_id, actor=who.actor)

    @router.post("/drafts/{draft_id}/reject")
    async def reject(draft_id: DraftId, who: Publisher) -> Draft:
        """Drop the draft: nothing is sent."""
        await broadcaster.reject(draft_id, actor=who.actor)
        return await broadcaster.draft(draft_id)

    # -- templates, channels, health -------------------------------------------------

    @router.get("/templates")
    async def templates(_who: Reader) -> list[TemplateInfo]:
        return await broadcaster.templates()

    @router.get("/templates/problems")
    async def template_problems(_who: Reader) -> list[CheckFailure]:
        """Every template checked against every configured channel: empty when all fit."""
        return await broadcaster.check_templates()

    @router.get("/templates/{name}")
    async def template(name: str, _who: Reader) -> TemplateInfo:
        return await broadcaster.template(name)

    @router.get("/channels")
    async def channels(_who: Reader) -> list[ChannelInfo]:
        return await broadcaster.channel_infos()

    @router.get("/doctor")
    async def doctor(_who: Admin) -> list[DoctorCheck]:
        """Store, channels' credentials, templates: what `broadcaster doctor` checks."""
        return await broadcaster.doctor()

    # -- subscribers ------------------------------------------------------------------
    # People's phone numbers and emails: never for `read` tokens (dashboards). The comms
    # team (`publish`) keeps the list; a data-access export and an erasure are `admin`.
    # Addresses ride in bodies only, never in paths, so access log lines hold none.

    @router.post("/subscribers", status_code=201, responses=_INVALID)
    async def add_subscriber(new: NewSubscriber, who: Publisher) -> Subscriber:
        """Add one subscriber; 409 when the phone or email is already a subscriber's."""
        return await broadcaster.add_subscriber(new, actor=who.actor, source="api")

    @router.post(
        "/subscribers/import",
        responses={
            **_responses(422),
            400: {"model": ApiError, "description": "not UTF-8 text"},
            413: {"model": ApiError, "description": "body over 2 MiB: split the file"},
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "description": f"a header row naming columns among {', '.join(CSV_COLUMNS)}",
                "content": {"text/csv": {"schema": {"type": "string"}}},
            }
        },
    )
    async def import_subscribers(request: Request, who: Publisher) -> ImportReport:
        """Add or update each row; refused rows come back with line and reason (the
        others are stored). 422 when the text is not CSV or the header is wrong."""
        try:
            body = await read_body(request, IMPORT_MAX_BYTES)
        except HTTPException:  # too big
            raise HTTPException(
                status_code=413,
                detail=f"CSV over {IMPORT_MAX_BYTES} bytes — split it into smaller files",
            ) from None
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise HTTPException(
                status_code=400, detail="the CSV is not UTF-8 text — export it as CSV UTF-8"
            ) from None
        return await broadcaster.import_subscribers(text, actor=who.actor)

    @router.get("/subscribers")
    async def list_subscribers(
        _who: Publisher,
        channel: Annotated[
            str | None, Query(description="only those subscribed to this channel")
        ] = None,
        after: Annotated[int, Query(ge=0, le=_MAX_ID, description="the last id seen")] = 0,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> list[Subscriber]:
        """Subscribers by id, a page at a time."""
        return await broadcaster.subscribers(channel=channel, after=after, limit=limit)

    @router.get("/subscribers/{subscriber_id}")
    async def get_subscriber(subscriber_id: SubscriberId, _who: Publisher) -> Subscriber:
        return await broadcaster.subscriber(subscriber_id)

    @router.put("/subscribers/{subscriber_id}/channels/{channel}", responses=_INVALID)
    async def set_subscription(
        subscriber_id: SubscriberId, channel: str, subscription: Subscription, who: Publisher
    ) -> Subscriber:
        """Opt a subscriber in or out of one subscriber channel."""
        return await broadcaster.set_subscription(
            subscriber_id,
            channel,
            subscribed=subscription.subscribed,
            actor=who.actor,
            source="api",
        )

    @router.get("/subscribers/{subscriber_id}/export")
    async def export_subscriber(subscriber_id: SubscriberId, _who: Admin) -> dict[str, Any]:
        """Everything kept about one subscriber (a data-access request)."""
        return await broadcaster.export_subscriber(subscriber_id)

    @router.delete("/subscribers/{subscriber_id}")
    async def erase_subscriber(subscriber_id: SubscriberId, who: Admin) -> Subscriber:
        """Erase a subscriber (a data-erasure request): answers what was erased."""
        return await broadcaster.erase_subscriber(subscriber_id, actor=who.actor)

    return router


async def broadcaster_error(_request: Request, exc: Exception) -> JSONResponse:
    """Exception handler: a `BroadcasterError` anywhere in the app as `ApiError`."""
    assert isinstance(exc, BroadcasterError)
    return error_response(exc)
