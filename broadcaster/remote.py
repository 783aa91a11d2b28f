"""The CLI's remote mode: the same operations, asked of a `broadcaster serve` over `/v1/`.

With `BROADCASTER_URL` (or `--server`) and `BROADCASTER_TOKEN` set, the CLI uses a
`RemoteBroadcaster` instead of opening the store: the laptop holds a token, never a
provider secret. Errors come back as the same `BroadcasterError`s with the same words.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import quote

import aiohttp
from pydantic import BaseModel, TypeAdapter, ValidationError

from broadcaster.config import Playbook
from broadcaster.core import DoctorCheck, PublishResult
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
from broadcaster.operations import ProgressCallback
from broadcaster.server.api import (
    ACTOR_HEADER,
    ApiError,
    Cancelled,
    Requeued,
    Retracted,
    Settled,
    Subscription,
)

T = TypeVar("T")
Params = list[tuple[str, str]]


class RemoteBroadcaster:
    """`Operations` over HTTP; `actor` names the person in the server's audit trail."""

    poll_seconds = 0.5

    def __init__(self, url: str, token: str, *, actor: str, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self._session = aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {token}", ACTOR_HEADER: actor},
            timeout=aiohttp.ClientTimeout(total=timeout),
        )

    async def close(self) -> None:
        await self._session.close()

    async def __aenter__(self) -> RemoteBroadcaster:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _call(
        self,
        method: str,
        path: str,
        answer: type[T],
        *,
        params: Params | None = None,
        body: BaseModel | None = None,
        csv: str | None = None,
        timeout: float | None = None,
    ) -> T:
        url = f"{self.url}/v1{path}"
        payload = body.model_dump(mode="json") if body is not None else None
        extra: dict[str, Any] = {}
        if csv is not None:
            extra["data"] = csv.encode()
            extra["headers"] = {"Content-Type": "text/csv; charset=utf-8"}
        if timeout is not None:
            extra["timeout"] = aiohttp.ClientTimeout(total=timeout)
        try:
            async with self._session.request(
                method, url, params=params, json=payload, **extra
            ) as reply:
                data = await reply.read()
                if reply.status >= 400:
                    raise _error(reply.status, data, self.url)
        except aiohttp.ClientError as exc:
            raise BroadcasterError(f"cannot reach {self.url}: {exc}") from None
        except TimeoutError:
            raise BroadcasterError(f"{self.url} did not answer in time") from None
        try:
            return TypeAdapter[T](answer).validate_json(data)
        except ValidationError:
            raise BroadcasterError(
                f"{self.url} answered {path} with something else than a broadcaster's API "
                "— is BROADCASTER_URL the address of `broadcaster serve`?"
            ) from None

    # -- publishing -------------------------------------------------------------------

    @staticmethod
    def _publish_path(incident_id: int | None) -> str:
        return "/incidents" if incident_id is None else f"/incidents/{incident_id}/updates"

    async def preview(self, request: UpdateRequest, incident_id: int | None = None) -> Preview:
        return await self._call(
            "POST",
            self._publish_path(incident_id),
            Preview,
            params=[("dry_run", "true")],
            body=request,
        )

    async def publish(
        self, request: UpdateRequest, incident_id: int | None = None
    ) -> PublishResult:
        return await self._call(
            "POST", self._publish_path(incident_id), PublishResult, body=request
        )

    async def draft(self, draft_id: int) -> Draft:
        return await self._call("GET", f"/drafts/{draft_id}", Draft)

    async def drafts(self, *, state: DraftState | None = DraftState.PENDING) -> list[Draft]:
        params = [("state", state.value if state is not None else "all")]
        return await self._call("GET", "/drafts", list[Draft], params=params)

    async def approve(self, draft_id: int, *, actor: str) -> PublishResult:
        return await self._call("POST", f"/drafts/{draft_id}/approve", PublishResult)

    async def reject(self, draft_id: int, *, actor: str) -> None:
        await self._call("POST", f"/drafts/{draft_id}/reject", Draft)

    async def cancel(self, update_id: int, *, actor: str) -> int:
        answer = await self._call("POST", f"/updates/{update_id}/cancel", Cancelled)
        return answer.cancelled

    async def retract(
        self, update_id: int, *, actor: str, dry_run: bool = False
    ) -> dict[str, Retraction]:
        params = [("dry_run", "true")] if dry_run else []
        answer = await self._call("POST", f"/updates/{update_id}/retract", Retracted, params=params)
        return answer.channels

    async def retry(self, incident_id: int, *, channel: str | None, actor: str) -> tuple[int, int]:
        params = [("channel", channel)] if channel else []
        answer = await self._call(
            "POST", f"/incidents/{incident_id}/retry", Requeued, params=params
        )
        return answer.requeued, answer.skipped

    async def wait(
        self,
        update_ids: Sequence[int] | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> list[ChannelProgress]:
        """Watch the server send these updates until they settle (it dispatches, not us)."""
        params = [("update_id", str(i)) for i in update_ids or []]
        while True:
            answer = await self._call("GET", "/progress", Settled, params=params)
            if answer.settled:
                break
            if on_progress is not None:
                await on_progress(answer.channels, False)
            await asyncio.sleep(self.poll_seconds)
        if on_progress is not None:
            await on_progress(answer.channels, False)
        return answer.channels

    # -- reading ----------------------------------------------------------------------

    async def incidents(self, *, open_only: bool = False, limit: int = 50) -> list[Incident]:
        params = [("open_only", str(open_only).lower()), ("limit", str(limit))]
        return await self._call("GET", "/incidents", list[Incident], params=params)

    async def incident(self, incident_id: int) -> Incident:
        return await self._call("GET", f"/incidents/{incident_id}", Incident)

    async def progress(
        self, incident_id: int, *, channel: str | None = None
    ) -> list[ChannelProgress]:
        params = [("channel", channel)] if channel else []
        return await self._call(
            "GET", f"/incidents/{incident_id}/progress", list[ChannelProgress], params=params
        )

    async def deliveries(
        self,
        incident_id: int,
        *,
        channel: str | None = None,
        states: Sequence[DeliveryState] | None = None,
    ) -> list[Delivery]:
        params = [("channel", channel)] if channel else []
        params += [("state", s.value) for s in states or []]
        return await self._call(
            "GET", f"/incidents/{incident_id}/deliveries", list[Delivery], params=params
        )

    async def audit(self, incident_id: int) -> list[AuditEntry]:
        return await self._call("GET", f"/incidents/{incident_id}/audit", list[AuditEntry])

    async def first_messages(self, incident_id: int) -> dict[str, datetime]:
        return await self._call(
            "GET", f"/incidents/{incident_id}/first-messages", dict[str, datetime]
        )

    async def schedule(self, *, limit: int = 100) -> list[Reminder]:
        return await self._call("GET", "/schedule", list[Reminder], params=[("limit", str(limit))])

    async def playbooks(self) -> dict[str, Playbook]:
        return await self._call("GET", "/playbooks", dict[str, Playbook])

    async def reminders(self, incident_id: int) -> list[Reminder]:
        return await self._call("GET", f"/incidents/{incident_id}/reminders", list[Reminder])

    async def templates(self) -> list[TemplateInfo]:
        return await self._call("GET", "/templates", list[TemplateInfo])

    async def template(self, name: str) -> TemplateInfo:
        return await self._call("GET", f"/templates/{name}", TemplateInfo)

    async def check_templates(self) -> list[CheckFailure]:
        return await self._call("GET", "/templates/problems", list[CheckFailure])

    async def channel_infos(self) -> list[ChannelInfo]:
        return await self._call("GET", "/channels", list[ChannelInfo])

    async def doctor(self) -> list[DoctorCheck]:
        return await self._call("GET", "/doctor", list[DoctorCheck])

    # -- subscribers ------------------------------------------------------------------

    async def add_subscriber(self, new: NewSubscriber, *, actor: str) -> Subscriber:
        return await self._call("POST", "/subscribers", Subscriber, body=new)

    async def import_subscribers(self, csv_text: str, *, actor: str) -> ImportReport:
        # The server stores row by row: a big file takes longer than any other call.
        return await self._call(
            "POST", "/subscribers/import", ImportReport, csv=csv_text, timeout=600
        )

    async def subscribers(
        self, *, channel: str | None = None, after: int = 0, limit: int = 100
    ) -> list[Subscriber]:
        params = [("after", str(after)), ("limit", str(limit))]
        params += [("channel", channel)] if channel else []
        return await self._call("GET", "/subscribers", list[Subscriber], params=params)

    async def subscriber(self, subscriber_id: int) -> Subscriber:
        return await self._call("GET", f"/subscribers/{subscriber_id}", Subscriber)

    async def export_subscriber(self, subscriber_id: int) -> dict[str, Any]:
        return await self._call("GET", f"/subscribers/{subscriber_id}/export", dict[str, Any])

    async def erase_subscriber(self, subscriber_id: int, *, actor: str) -> Subscriber:
        return await self._call("DELETE", f"/subscribers/{subscriber_id}", Subscriber)

    async def set_subscription(
        self, subscriber_id: int, channel: str, *, subscribed: bool, actor: str
    ) -> Subscriber:
        return await self._call(
            "PUT",
            f"/subscribers/{subscriber_id}/channels/{quote(channel, safe='')}",
            Subscriber,
            body=Subscription(subscribed=subscribed),
        )


def _error(status: int, data: bytes, url: str) -> BroadcasterError:
    """The server's refusal as the error the local mode would have raised."""
    try:
        error = ApiError.model_validate_json(data)
    except ValidationError:
        detail = _validation_detail(data)
        if detail is None:
            return BroadcasterError(f"{url} answered HTTP {status}")
        return BroadcasterError(detail)
    if error.failures:
        return CheckFailedError(error.failures)
    if status == 404 and error.error == "NotFoundError":
        return NotFoundError(error.detail)
    if status in (401, 403):
        return BroadcasterError(f"{url} refused the token: {error.detail}")
    return BroadcasterError(error.detail)


def _validation_detail(data: bytes) -> str | None:
    """FastAPI's 422 for a request that does not fit the schema, as one line."""
    try:
        errors = TypeAdapter(dict[str, list[dict[str, Any]]]).validate_json(data)["detail"]
        first = errors[0]
    except (ValidationError, KeyError, IndexError):
        return None
    where = ".".join(str(p) for p in first.get("loc", []) if p != "body")
    return f"{where}: {first.get('msg', 'invalid')}"
