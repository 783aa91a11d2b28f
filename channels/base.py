"""The channel contract: an adapter declares what it is and can do; the core does the rest once.

An adapter subclasses `Channel`, declares its family, limits, capabilities, default rate
limit and a pydantic config model, and implements `send`. It classifies every provider
failure into one of `TransientError` (with `retry_after` when the provider says so),
`PermanentError` or `ChannelBrokenError`; nothing else may escape `send`. Adapters are
found through the `broadcaster.channels` entry-point group and import their SDK lazily.

Optionally, an adapter receives: `Channel.inbound()` returns an `InboundEndpoint` that
`serve` mounts at `POST /inbound/<channel>`. It authenticates and parses the raw request
itself (the server never imports an SDK) and reaches the core's read operations only
through `ChannelContext.support_desk`.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, SecretStr

from broadcaster.errors import (
    ChannelBrokenError,
    DeliveryError,
    PermanentError,
    PostGoneError,
    TransientError,
)
from broadcaster.models import (
    AddressKind,
    Capabilities,
    ChannelFamily,
    ChannelLimits,
    ChannelRender,
    RateLimit,
    Receipt,
    Thread,
)
from broadcaster.secrets import SecretRef
from broadcaster.subscribers import mask

if TYPE_CHECKING:
    import aiohttp

    from broadcaster.support import SupportDesk

log = logging.getLogger(__name__)

__all__ = [
    "Channel",
    "ChannelBrokenError",
    "ChannelConfig",
    "ChannelContext",
    "DeliveryError",
    "HttpChannel",
    "HttpClassifier",
    "InboundEndpoint",
    "InboundReply",
    "InboundRequest",
    "Message",
    "PermanentError",
    "PostGoneError",
    "Recipient",
    "SecretRef",
    "TransientError",
    "classify_http_status",
    "retry_after_seconds",
]


class ChannelConfig(BaseModel):
    """Settings every channel instance has; adapters extend it with their own."""

    model_config = ConfigDict(extra="forbid")

    type: str
    languages: list[str] = Field(default_factory=lambda: ["en"], min_length=1)
    concurrency: PositiveInt | None = Field(
        default=None, description="deliveries in flight at once; default: the adapter's"
    )
    rate_limit: RateLimit | None = Field(default=None, description="default: the adapter's")
    deadline_seconds: PositiveFloat = Field(
        default=3600, description="give up retrying a delivery this long after it was queued"
    )
    max_attempts: PositiveInt = 10
    backoff_seconds: PositiveFloat = Field(default=2.0, description="first retry delay")
    backoff_max_seconds: PositiveFloat = 300.0
    gsm7: bool = Field(
        default=False,
        description="transliterate to the GSM-7 alphabet (ê -> e) so SMS cost fewer segments",
    )
    fallback: str | None = Field(
        default=None,
        description="subscriber channels: another subscriber channel (sms -> email) that "
        "takes a subscriber's delivery when it fails permanently here or this channel is "
        "broken, if they are subscribed there too",
    )


@dataclass(frozen=True)
class Recipient:
    """Someone a channel delivers to: a target of its own audience, or a subscriber."""

    id: str
    language: str | None = None
    address: str | None = None  # a subscriber's phone (E.164) or email, for their channel


@dataclass(frozen=True)
class Message:
    """One delivery as the adapter sees it."""

    render: ChannelRender
    recipient: Recipient
    thread: Thread | None
    incident_id: int
    update_id: int
    delivery_key: str


# (channel name, languages) -> relative path -> content
PublicSiteRenderer = Callable[[str, list[str]], Awaitable[dict[str, bytes]]]


@dataclass
class ChannelContext:
    """What the core lends an adapter: where relative paths start, where to keep files,
    the renderer of the public site (from the store, by broadcaster/site), and the
    support desk an inbound endpoint asks for the current state."""

    base_dir: Path
    data_dir: Path
    render_public_site: PublicSiteRenderer | None = None
    support_desk: SupportDesk | None = None
    # Where `broadcaster serve` is reached from outside (serve.public_url), for links
    # and callbacks a provider calls back (Twilio's StatusCallback); None: not set.
    public_url: str | None = None
    # Subscriber id -> their signed manage page URL (self-service); POSTing to
    # `<url>/unsubscribe` is RFC 8058 one-click. It returns None when self-service,
    # serve.public_url or subscribers.secret is not configured.
    manage_url: Callable[[str], str | None] | None = None


@dataclass(frozen=True)
class InboundRequest:
    """One request to `POST /inbound/<channel>` as it arrived: header names in lower case,
    the raw body (size-limited by the server, not parsed: the endpoint authenticates
    before it parses)."""

    headers: Mapping[str, str]
    body: bytes


@dataclass(frozen=True)
class InboundReply:
    """The HTTP answer to an inbound request, and work to run once it has gone out (so a
    provider waiting for the answer is not held up by it)."""

    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    then: Callable[[], Awaitable[None]] | None = None

    @classmethod
    def refusal(cls, status: int, detail: str) -> InboundReply:
        """A refusal in the server's error shape, `{"detail": ...}`."""
        import json

        return cls(status=status, body=json.dumps({"detail": detail}).encode())


class InboundEndpoint(ABC):
    """The receiving side of one channel (provider callbacks, users' messages).

    `serve` opens it at start with the URL it is reachable at (None when
    `serve.public_url` is unset), hands it every request to `POST /inbound/<channel>`,
    and closes it at stop.
    """

    async def open(self, url: str | None) -> None:  # noqa: B027 - optional hook
        """Get ready; register `url` with the provider where it takes one."""

    @abstractmethod
    async def handle(self, request: InboundRequest) -> InboundReply:
        """Authenticate, then parse and act; never raise for a bad request: refuse it."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


class Channel(ABC):
    """One configured channel instance of an adapter."""

    family: ClassVar[ChannelFamily]
    limits: ClassVar[ChannelLimits] = ChannelLimits()
    capabilities: Capabilities = Capabilities()  # an instance may narrow its adapter's
    default_rate_limit: ClassVar[RateLimit] = RateLimit()
    default_concurrency: ClassVar[int] = 8
    config_model: ClassVar[type[ChannelConfig]] = ChannelConfig
    # A subscriber channel (SMS, email) delivers to each subscribed subscriber's address
    # of this kind, fanned out from the store in batches; None: its own audience. An
    # adapter whose instances can be either (Telegram, webhooks) sets it per instance.
    address_kind: AddressKind | None = None

    def __init__(self, name: str, config: ChannelConfig, context: ChannelContext) -> None:
        self.name = name
        self.config = config
        self.context = context

    @property
    def instance_limits(self) -> ChannelLimits:
        """The limits this instance's posts are checked against: the adapter's, unless
        its config narrows them (an SMS channel's `max_segments`)."""
        return self.limits

    @property
    def languages(self) -> list[str]:
        return self.config.languages

    @property
    def concurrency(self) -> int:
        return self.config.concurrency or self.default_concurrency

    @property
    def rate_limit(self) -> RateLimit:
        return self.config.rate_limit or self.default_rate_limit

    def recipients(self) -> list[Recipient]:
        """The channel's own audience; per-recipient channels list their targets."""
        return [Recipient(id="")]

    def rate_limit_for(self, recipient: str) -> RateLimit:
        """The limits one recipient's deliveries go out under (a provider may limit a
        group chat harder than a private one)."""
        return self.rate_limit

    def rate_limit_target(self, recipient: str) -> str:
        """The key the provider limits by (Slack channel, Telegram chat, sender)."""
        return recipient

    def account_key(self) -> str:
        """Deliveries sharing this key share the global bucket (one provider account)."""
        return self.name

    def secrets(self) -> Mapping[str, SecretRef]:
        """Secrets this instance needs, by config key, for `doctor`."""
        return {}

    def secret(self, ref: SecretRef) -> SecretStr | None:
        """Resolve one of this channel's secrets (files relative to the config's folder)."""
        return ref.resolve(self.context.base_dir)

    async def check_address(self, address: str) -> None:  # noqa: B027 - optional hook
        """Refuse (InvalidSubscriberError) a subscriber's normalised address that this
        channel must not deliver to; asked when a subscriber is added or changed."""

    def subscriber_secret(self, subscriber_id: int) -> str | None:
        """A secret one subscriber needs to verify what this channel sends them (a
        webhook signing key), handed to them when they register; None: none."""
        return None

    def inbound(self) -> InboundEndpoint | None:
        """A new inbound endpoint when this instance's config turns one on; None if not."""
        return None

    def inbound_key(self) -> str | None:
        """What the provider sends this instance's inbound traffic by, when one provider
        account can have only one receiver (a Telegram bot has one webhook): two
        instances with the same key would take each other's; None: no such limit."""
        return None

    async def opt_out(self, address: str, source: str) -> None:
        """Record that a subscriber refused this channel at the provider (an SMS STOP
        Twilio enforces, a Telegram user who blocked the bot), so fan-outs skip them from
        now on. Never raises: the delivery's own failure is what the caller reports."""
        desk = self.context.support_desk
        if desk is None:
            return
        try:
            await desk.set_subscribed(self.name, address, subscribed=False, source=source)
        except Exception:
            log.exception("%s: could not record the opt-out of %s", self.name, mask(address))

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Open connections inside the running event loop."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    @abstractmethod
    async def send(self, message: Message) -> Receipt:
        """Deliver one rendered update; raise a `DeliveryError` subclass on failure."""

    async def edit(self, provider_id: str, message: Message) -> Receipt:
        raise PermanentError(f"{self.name}: this channel cannot edit posts")

    async def delete(self, provider_id: str, recipient: Recipient) -> None:
        raise PermanentError(f"{self.name}: this channel cannot delete posts")

    async def check_config(self) -> list[str]:
        """Problems with this instance's configuration (missing secrets, bad targets)."""
        return [
            f"{self.name}: secret '{key}' not found in {ref.describe()}"
            for key, ref in self.secrets().items()
            if self.secret(ref) is None
        ]


def retry_after_seconds(value: str | None) -> float | None:
    """Parse an HTTP Retry-After header: delta-seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    from datetime import UTC, datetime

    return max(0.0, (when - datetime.now(UTC)).total_seconds())


# (status, headers, body text) of a failed HTTP answer -> the error it means
HttpClassifier = Callable[[int, Mapping[str, str], str], DeliveryError]


def classify_http_status(status: int, retry_after: str | None, what: str) -> DeliveryError:
    """Map an HTTP failure status to our error classes, the way most providers mean them."""
    message = f"{what}: HTTP {status}"
    if status == 429 or status == 408 or status >= 500:
        return TransientError(message, retry_after=retry_after_seconds(retry_after))
    if status in (401, 403):
        return ChannelBrokenError(f"{message} (credentials refused)")
    return PermanentError(message)


class HttpChannel(Channel):
    """A channel that talks HTTP with aiohttp: one shared session, created inside the loop."""

    request_timeout_seconds: ClassVar[float] = 10.0
    # An answer is read up to this many bytes (an error's text, an API's JSON): a huge or
    # endless body from a receiver must not fill the memory.
    max_answer_bytes: ClassVar[int] = 256 * 1024
    # False: a 3xx answer is a PermanentError ("redirect refused") and its Location is
    # never requested (an instance calling URLs strangers gave sets it).
    follow_redirects: bool = True
    # False: answers are not decompressed (a receiver's gzip bomb stays 400 KB); for an
    # instance that never needs what the answers say.
    decompress_answers: bool = True
    _session: aiohttp.ClientSession | None = None

    def connector(self) -> aiohttp.TCPConnector:
        """The connector the session is made with (an instance may resolve, or trust
        certificates, its own way)."""
        import aiohttp

        return aiohttp.TCPConnector(limit=self.concurrency)

    def connection_error(self, exc: Exception, what: str) -> DeliveryError:
        """What a failure to connect or to get an answer means: by default transient (a
        dropped connection may or may not have delivered: retried, and the delivery key
        lets the receiver recognise the duplicate). Never quote `exc`: aiohttp's message
        may carry the URL, and with it a token."""
        return TransientError(f"{what}: {type(exc).__name__}")

    async def start(self) -> None:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.request_timeout_seconds),
                connector=self.connector(),
                auto_decompress=self.decompress_answers,
                # No cookies: one receiver's must never travel to another on its host.
                cookie_jar=aiohttp.DummyCookieJar(),
            )

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError(f"{self.name}: start() was not awaited")
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(
        self,
        method: str,
        url: str,
        *,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        what: str,
        classify: HttpClassifier | None = None,
    ) -> tuple[int, str]:
        """One HTTP call; (status, text) on 2xx, else the error `classify` makes of the
        answer (default: `classify_http_status`). `what` names the call in errors: never
        put a URL there that carries a credential."""
        import aiohttp

        try:
            async with self.session.request(
                method,
                url,
                data=body,
                headers=headers or {},
                allow_redirects=self.follow_redirects,
            ) as response:
                text = await self._answer_text(response)
                status, answer_headers = response.status, response.headers
        except (TimeoutError, aiohttp.ClientError) as exc:
            # `from None`: aiohttp's exception may quote the URL, and with it a token.
            raise self.connection_error(exc, what) from None
        if 300 <= status < 400 and not self.follow_redirects:
            raise PermanentError(f"{what}: HTTP {status}: redirect refused (not followed)")
        if status >= 300:
            if classify is not None:
                raise classify(status, answer_headers, text)
            raise classify_http_status(status, answer_headers.get("Retry-After"), what)
        return status, text

    async def _answer_text(self, response: aiohttp.ClientResponse) -> str:
        """The answer's body as text, at most `max_answer_bytes` of it; bytes that are
        not in its charset are replaced, never an error."""
        body = b""
        while len(body) < self.max_answer_bytes:
            chunk = await response.content.read(self.max_answer_bytes - len(body))
            if not chunk:
                break
            body += chunk
        try:
            return body.decode(response.charset or "utf-8", errors="replace")
        except LookupError:  # a charset Python does not know
            return body.decode("utf-8", errors="replace")

    async def post_json(
        self,
        url: str,
        body: bytes,
        headers: Mapping[str, str],
        *,
        what: str,
        classify: HttpClassifier | None = None,
    ) -> tuple[int, str]:
        """POST a JSON body; see `request`."""
        return await self.request(
            "POST",
            url,
            body=body,
            headers={"Content-Type": "application/json", **headers},
            what=what,
            classify=classify,
        )
