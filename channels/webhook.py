"""Webhook: the update as JSON, POSTed to each target, signed per Standard Webhooks.

`webhook-id` (and `Idempotency-Key`, for receivers that read that one) is the delivery
key, so a receiver can drop the duplicate of a retry or of a send repeated after a crash;
`webhook-timestamp` and `webhook-signature` (HMAC-SHA256 over id.timestamp.body) let it
reject forgeries and replays.

An instance with `subscribers = true` is a subscriber channel: it POSTs each update, in
the subscriber's language, to the URL each subscriber registered. Those URLs come from
strangers, so they go through `broadcaster.safe_url`: https only, public addresses only
(unless `allow_networks` allows a network), checked at registration and again at each
connection (the address checked is the address connected to), and redirects refused.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Self
from urllib.parse import urlsplit

from pydantic import (
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    IPvAnyNetwork,
    field_validator,
    model_validator,
)

from broadcaster.errors import ConfigError
from broadcaster.models import AddressKind, Capabilities, ChannelFamily, RateLimit, Receipt
from channels.base import (
    ChannelConfig,
    ChannelContext,
    DeliveryError,
    HttpChannel,
    HttpClassifier,
    Message,
    PermanentError,
    Recipient,
    SecretRef,
    TransientError,
    retry_after_seconds,
)

if TYPE_CHECKING:
    import aiohttp

    from broadcaster.safe_url import UrlPolicy


SUBSCRIBER_CONNECTIONS_PER_HOST = 8


class WebhookTarget(BaseModel):
    """A receiver; its name is what the delivery table shows (URLs may carry tokens)."""

    model_config = ConfigDict(extra="forbid")

    url: AnyHttpUrl
    name: str | None = None


class WebhookConfig(ChannelConfig):
    targets: list[WebhookTarget] = Field(
        default_factory=list, description="URLs, or {name, url}; not with subscribers"
    )
    subscribers: bool = Field(
        default=False,
        description="a subscriber channel: POST each update to the URL each subscribed "
        "subscriber registered (https, public addresses only) instead of to targets",
    )
    allow_networks: list[IPvAnyNetwork] = Field(
        default_factory=list,
        description="subscribers: networks their URLs may reach although not public (a "
        "partner on the company network; 127.0.0.0/8 for the local simulators)",
    )
    allow_http: bool = Field(
        default=False,
        description="subscribers: accept http:// URLs — for tests and local simulators only",
    )
    ca_file: Path | None = Field(
        default=None,
        description="certificate(s) to trust besides the system's (a receiver with a private CA)",
    )
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

    @model_validator(mode="after")
    def _targets_or_subscribers(self) -> Self:
        if self.subscribers:
            if self.targets:
                raise ValueError(
                    "targets: a channel with subscribers = true posts to the URLs its "
                    "subscribers registered; move the targets to a channel of their own"
                )
        else:
            if not self.targets:
                raise ValueError(
                    "targets: at least one URL is required (or set subscribers = true to "
                    "post to the URLs subscribers register)"
                )
            given = [k for k in ("allow_networks", "allow_http") if getattr(self, k)]
            if given:
                raise ValueError(
                    f"{', '.join(given)}: only used with subscribers = true (targets are "
                    "yours and are called as configured)"
                )
        return self


def target_label(target: WebhookTarget) -> str:
    """A stable, secret-free id for a target: its name, or host + a hash of the URL."""
    if target.name:
        return target.name
    url = str(target.url)
    digest = hashlib.sha256(url.encode()).hexdigest()[:8]
    return f"{urlsplit(url).hostname}#{digest}"


class WebhookChannel(HttpChannel):
    """POST each update to a list of URLs, or to each subscriber's registered URL."""

    family: ClassVar[ChannelFamily] = ChannelFamily.LONG
    capabilities: Capabilities = Capabilities(per_recipient=True, languages="each")
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
        self._bodies: dict[tuple[int, str | None], str] = {}
        self._policy: UrlPolicy | None = None
        if self.config.subscribers:
            from broadcaster.safe_url import UrlPolicy

            self.address_kind = AddressKind.WEBHOOK
            self.follow_redirects = False  # a redirect would lead past the guard
            self.decompress_answers = False  # only the status matters: no gzip bombs
            self._policy = UrlPolicy(
                allow_networks=tuple(self.config.allow_networks),
                allow_http=self.config.allow_http,
            )

    def recipients(self) -> list[Recipient]:
        return [Recipient(id=label) for label in self._urls]

    def connector(self) -> aiohttp.TCPConnector:
        import ssl

        import aiohttp

        tls: ssl.SSLContext | bool = True
        cafile = self._ca_file()
        if cafile is not None:
            tls = ssl.create_default_context()
            try:
                tls.load_verify_locations(cafile=str(cafile))
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(
                    f"{self.name}: ca_file {cafile}: cannot be read ({exc})"
                ) from None
        if self._policy is None:
            return aiohttp.TCPConnector(limit=self.concurrency, ssl=tls)
        from broadcaster.safe_url import GuardedResolver

        # Every name is resolved through the guard, and aiohttp connects only to the
        # addresses it returns; IP literals are checked in `send`, before the request.
        return aiohttp.TCPConnector(
            limit=self.concurrency,
            # Many subscriptions naming one host must not become a flood on it.
            limit_per_host=SUBSCRIBER_CONNECTIONS_PER_HOST,
            ssl=tls,
            resolver=GuardedResolver(self._policy),
        )

    def _ca_file(self) -> Path | None:
        cafile = self.config.ca_file
        if cafile is not None and not cafile.is_absolute():
            cafile = self.context.base_dir / cafile
        return cafile

    def connection_error(self, exc: Exception, what: str) -> DeliveryError:
        from broadcaster.safe_url import AddressRefusedError

        refused = exc.__cause__ or getattr(exc, "os_error", None)
        if isinstance(refused, AddressRefusedError):
            return PermanentError(f"{what}: refused at connect: {refused}")
        return super().connection_error(exc, what)

    async def check_address(self, address: str) -> None:
        """A subscriber's URL must be https and reach only allowed addresses."""
        if self._policy is not None:
            from broadcaster.safe_url import check_url

            await check_url(address, self._policy)

    def secrets(self) -> Mapping[str, SecretRef]:
        return {"secret": self.config.secret} if self.config.secret else {}

    async def start(self) -> None:
        await super().start()
        if self.config.secret is not None:
            from standardwebhooks.webhooks import Webhook

            secret = self.secret(self.config.secret)
            if secret is not None:
                self._signer = Webhook(secret.get_secret_value())

    def subscriber_secret(self, subscriber_id: int) -> str | None:
        """The Standard Webhooks secret a subscriber verifies their updates with: derived
        from the channel's (HMAC-SHA256 over their id), so each holds a key that signs
        only their own updates — never one that would let them forge another's — and
        nothing needs storing. None without a channel secret, or on a channel of targets."""
        ref = self.config.secret
        if self.address_kind is None:
            return None
        secret = self.secret(ref) if ref is not None else None
        if secret is None:
            return None
        raw = secret.get_secret_value()
        try:  # the key bytes, as Standard Webhooks reads a whsec_ secret
            key = base64.b64decode(raw.removeprefix("whsec_"), validate=True)
        except ValueError:
            key = raw.encode()
        derived = hmac.new(key, f"subscriber:{subscriber_id}".encode(), hashlib.sha256)
        return "whsec_" + base64.b64encode(derived.digest()).decode()

    def _signer_for(self, message: Message) -> object | None:
        if self.address_kind is None or self._signer is None:
            return self._signer
        from standardwebhooks.webhooks import Webhook

        secret = self.subscriber_secret(int(message.recipient.id))
        return Webhook(secret) if secret is not None else None

    def body(self, message: Message) -> str:
        """The JSON every target gets for this update (built once per update): the text
        in each language; a subscriber gets theirs only, and `language` says which. A
        message to the team (update 0) is `{"type": "team.message", "kind", "text"}`."""
        render = message.render
        if not message.update_id:  # a message to the team (a nudge, a reply), not an update
            text = render.variants[0].text
            return json.dumps({"type": "team.message", "kind": render.template, "text": text})
        language: str | None = None
        if self.address_kind is not None:
            from broadcaster.support import pick_language

            language = pick_language(
                message.recipient.language, [v.language for v in render.variants]
            )
        key = (message.update_id, language)
        cached = self._bodies.get(key)
        if cached is None:
            variants = [v for v in render.variants if language in (None, v.language)]
            chosen = {"language": language} if language is not None else {}
            cached = json.dumps(
                {
                    "type": "incident.update",
                    "incident_id": message.incident_id,
                    "update_id": message.update_id,
                    **render.facts,
                    **chosen,
                    "texts": {v.language: {"text": v.text, "subject": v.subject} for v in variants},
                },
                separators=(",", ":"),
                default=str,
            )
            if any(update != message.update_id for update, _ in self._bodies):
                self._bodies = {}  # one update at a time, mostly
            self._bodies[key] = cached
        return cached

    def _subscriber_url(self, message: Message, what: str) -> str:
        """The subscriber's URL, if it may still be called: the scheme and an IP-literal
        host checked now, under this configuration (a name is checked as it resolves)."""
        from broadcaster.safe_url import UnsafeUrlError, check_before_connect

        url, policy = message.recipient.address, self._policy
        if not url or policy is None:
            raise PermanentError(f"{what}: no webhook URL")
        try:
            check_before_connect(url, policy)
        except UnsafeUrlError as exc:
            raise PermanentError(f"{what}: refused: {exc}") from None
        return url

    async def send(self, message: Message) -> Receipt:
        if self.address_kind is not None:
            what = f"{self.name} → subscriber #{message.recipient.id}"
            url = self._subscriber_url(message, what)
            classify: HttpClassifier | None = subscriber_answers(what)
        else:
            what = f"{self.name} → {message.recipient.id}"
            url = self._urls[message.recipient.id]
            classify = None
        body = self.body(message)
        now = datetime.now(UTC)
        headers = {
            "webhook-id": message.delivery_key,
            "idempotency-key": message.delivery_key,
            "webhook-timestamp": str(int(now.timestamp())),
        }
        signer = self._signer_for(message)
        if signer is not None:
            headers["webhook-signature"] = signer.sign(  # type: ignore[attr-defined]
                message.delivery_key, now, body
            )
        try:
            await self.post_json(url, body.encode(), headers, what=what, classify=classify)
        except EndpointGoneError:
            await self.opt_out(url, "webhook 410")  # as an SMS STOP: until they opt in again
            raise
        return Receipt(delivered=True)

    async def check_config(self) -> list[str]:
        problems = await super().check_config()
        if self.config.secret is None:
            problems.append(
                f"{self.name}: no signing secret — receivers cannot verify the sender "
                '(set secret = {env = "..."})'
            )
        cafile = self._ca_file()
        if cafile is not None and not cafile.is_file():
            problems.append(f"{self.name}: ca_file {cafile} not found")
        return problems


def subscriber_answers(what: str) -> HttpClassifier:
    """How a failed answer from one subscriber's URL is read: it fails that delivery,
    never the channel (their 401 says nothing about our credentials); 408, 429 and 5xx
    are retried, honouring Retry-After."""

    def classify(status: int, headers: Mapping[str, str], body: str) -> DeliveryError:
        message = f"{what}: HTTP {status}"
        if status in (408, 429) or status >= 500:
            retry_after = retry_after_seconds(headers.get("Retry-After"))
            return TransientError(message, retry_after=retry_after)
        if status == 410:
            return EndpointGoneError(f"{message} (gone: the subscriber is opted out)")
        return PermanentError(message)

    return classify


class EndpointGoneError(PermanentError):
    """A subscriber's URL answered 410 Gone: Standard Webhooks' way to say "stop"."""
