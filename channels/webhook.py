"""Webhook: the update as JSON, POSTed to each target, signed per Standard Webhooks.

`webhook-id` is the delivery key, so a receiver can drop the duplicate of a retry;
`webhook-timestamp` and `webhook-signature` (HMAC-SHA256 over id.timestamp.body) let it
reject forgeries and replays.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, ClassVar
from urllib.parse import urlsplit

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, field_validator

from broadcaster.models import Capabilities, ChannelFamily, RateLimit, Receipt
from channels.base import (
    ChannelConfig,
    ChannelContext,
    HttpChannel,
    Message,
    Recipient,
    SecretRef,
)


class WebhookTarget(BaseModel):
    """A receiver; its name is what the delivery table shows (URLs may carry tokens)."""

    model_config = ConfigDict(extra="forbid")

    url: AnyHttpUrl
    name: str | None = None


class WebhookConfig(ChannelConfig):
    targets: list[WebhookTarget] = Field(min_length=1, description="URLs, or {name, url}")
    secret: SecretRef | None = Field(
        default=None, description="Standard Webhooks secret (whsec_…), from env or file"
    )

    @field_validator("targets", mode="before")
    @classmethod
    def _plain_urls(cls, value: Any) -> Any:
        # A bare URL is a target without a name.
        if isinstance(value, list):
            return [{"url": item} if isinstance(item, str) else item for item in value]
        return value


def target_label(target: WebhookTarget) -> str:
    """A stable, secret-free id for a target: its name, or host + a hash of the URL."""
    if target.name:
        return target.name
    url = str(target.url)
    digest = hashlib.sha256(url.encode()).hexdigest()[:8]
    return f"{urlsplit(url).hostname}#{digest}"


class WebhookChannel(HttpChannel):
    """POST each update to a list of URLs."""

    family: ClassVar[ChannelFamily] = ChannelFamily.LONG
    capabilities: ClassVar[Capabilities] = Capabilities(per_recipient=True, languages="each")
    default_rate_limit: ClassVar[RateLimit] = RateLimit(
        per_target_per_second=10, per_target_burst=5
    )
    default_concurrency: ClassVar[int] = 128  # receivers are many hosts: keep them busy
    config_model: ClassVar[type[ChannelConfig]] = WebhookConfig

    config: WebhookConfig

    def __init__(self, name: str, config: ChannelConfig, context: ChannelContext) -> None:
        super().__init__(name, config, context)
        self._urls = {target_label(t): str(t.url) for t in self.config.targets}
        self._signer: object | None = None
        self._bodies: dict[int, str] = {}

    def recipients(self) -> list[Recipient]:
        return [Recipient(id=label) for label in self._urls]

    def secrets(self) -> Mapping[str, SecretRef]:
        return {"secret": self.config.secret} if self.config.secret else {}

    async def start(self) -> None:
        await super().start()
        if self.config.secret is not None:
            from standardwebhooks.webhooks import Webhook

            secret = self.secret(self.config.secret)
            if secret is not None:
                self._signer = Webhook(secret.get_secret_value())

    def body(self, message: Message) -> str:
        """The JSON every target gets for this update (built once per update)."""
        cached = self._bodies.get(message.update_id)
        if cached is None:
            render = message.render
            cached = json.dumps(
                {
                    "type": "incident.update",
                    "incident_id": message.incident_id,
                    "update_id": message.update_id,
                    **render.facts,
                    "texts": {
                        v.language: {"text": v.text, "subject": v.subject} for v in render.variants
                    },
                },
                separators=(",", ":"),
                default=str,
            )
            self._bodies = {message.update_id: cached}  # one update at a time, mostly
        return cached

    async def send(self, message: Message) -> Receipt:
        url = self._urls[message.recipient.id]
        body = self.body(message)
        now = datetime.now(UTC)
        headers = {
            "webhook-id": message.delivery_key,
            "webhook-timestamp": str(int(now.timestamp())),
        }
        if self._signer is not None:
            headers["webhook-signature"] = self._signer.sign(  # type: ignore[attr-defined]
                message.delivery_key, now, body
            )
        await self.post_json(
            url, body.encode(), headers, what=f"{self.name} → {message.recipient.id}"
        )
        return Receipt(delivered=True)

    async def check_config(self) -> list[str]:
        problems = await super().check_config()
        if self.config.secret is None:
            problems.append(
                f"{self.name}: no signing secret — receivers cannot verify the sender "
                '(set secret = {env = "..."})'
            )
        return problems
