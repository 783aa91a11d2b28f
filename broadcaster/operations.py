"""What the CLI asks of a broadcaster, local or remote.

`Broadcaster` (the store and channels in this process) and `RemoteBroadcaster` (a
`broadcaster serve` reached over its `/v1/` API) both provide it, so every command prints
the same thing in either mode.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from broadcaster.config import Playbook
    from broadcaster.core import DoctorCheck, PublishResult
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

ProgressCallback = Callable[[list["ChannelProgress"], bool], Awaitable[None]]


class Operations(Protocol):
    """Publishing, approving, watching and reading; see `Broadcaster` for each."""

    async def preview(self, request: UpdateRequest, incident_id: int | None = None) -> Preview: ...

    async def publish(
        self, request: UpdateRequest, incident_id: int | None = None
    ) -> PublishResult: ...

    async def draft(self, draft_id: int) -> Draft: ...

    async def drafts(self, *, state: DraftState | None = ...) -> list[Draft]: ...

    async def approve(self, draft_id: int, *, actor: str) -> PublishResult: ...

    async def reject(self, draft_id: int, *, actor: str) -> None: ...

    async def cancel(self, update_id: int, *, actor: str) -> int: ...

    async def retract(
        self, update_id: int, *, actor: str, dry_run: bool = False
    ) -> dict[str, Retraction]: ...

    async def retry(
        self, incident_id: int, *, channel: str | None, actor: str
    ) -> tuple[int, int]: ...

    async def wait(
        self,
        update_ids: Sequence[int] | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> list[ChannelProgress]: ...

    async def incidents(self, *, open_only: bool = False, limit: int = 50) -> list[Incident]: ...

    async def incident(self, incident_id: int) -> Incident: ...

    async def progress(
        self, incident_id: int, *, channel: str | None = None
    ) -> list[ChannelProgress]: ...

    async def deliveries(
        self,
        incident_id: int,
        *,
        channel: str | None = None,
        states: Sequence[DeliveryState] | None = None,
    ) -> list[Delivery]: ...

    async def audit(self, incident_id: int) -> list[AuditEntry]: ...

    async def first_messages(self, incident_id: int) -> dict[str, datetime]: ...

    async def schedule(self, *, limit: int = 100) -> list[Reminder]: ...

    async def reminders(self, incident_id: int) -> list[Reminder]: ...

    async def playbooks(self) -> dict[str, Playbook]: ...

    async def templates(self) -> list[TemplateInfo]: ...

    async def template(self, name: str) -> TemplateInfo: ...

    async def check_templates(self) -> list[CheckFailure]: ...

    async def channel_infos(self) -> list[ChannelInfo]: ...

    async def doctor(self) -> list[DoctorCheck]: ...

    async def add_subscriber(self, new: NewSubscriber, *, actor: str) -> Subscriber: ...

    async def import_subscribers(self, csv_text: str, *, actor: str) -> ImportReport: ...

    async def subscribers(
        self, *, channel: str | None = None, after: int = 0, limit: int = 100
    ) -> list[Subscriber]: ...

    async def subscriber(self, subscriber_id: int) -> Subscriber: ...

    async def export_subscriber(self, subscriber_id: int) -> dict[str, Any]: ...

    async def erase_subscriber(self, subscriber_id: int, *, actor: str) -> Subscriber: ...

    async def set_subscription(
        self, subscriber_id: int, channel: str, *, subscribed: bool, actor: str
    ) -> Subscriber: ...
