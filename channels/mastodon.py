"""Mastodon: each update as a status on one account, follow-ups as replies to the previous
one, on the `Mastodon.py` client.

Measured as the instance counts, not as its web composer does. Mastodon's
StatusLengthValidator counts grapheme clusters (`each_grapheme_cluster.size`) after
replacing every http(s) URL with 23 characters (URL_PLACEHOLDER), so the limit is
declared as 500 graphemes with `link_length=23`. The web composer counts code points
instead, so a post with a ZWJ emoji (one grapheme, several code points) may look over
500 there and still be accepted. Instances that raised their limit accept it too.

Mastodon.py is synchronous (requests): one client per channel instance, made in
`start()` without any request (`version_check_mode="none"`), called through
`asyncio.to_thread`. Its own rate-limit waiting is off (`ratelimit_method="throw"`): the
core schedules retries. The delivery key goes as the `Idempotency-Key`, which Mastodon
remembers for an hour per account, so a retry after a lost answer returns the status
already posted instead of posting it again. The token is only ever in the client's
Authorization header, never in an error or a log line.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

from pydantic import Field

from broadcaster.models import Capabilities, ChannelFamily, ChannelLimits, RateLimit, Receipt
from channels.base import (
    Channel,
    ChannelBrokenError,
    ChannelConfig,
    ChannelContext,
    DeliveryError,
    Message,
    PermanentError,
    PostGoneError,
    Recipient,
    SecretRef,
    TransientError,
    classify_http_status,
)

if TYPE_CHECKING:
    from mastodon import Mastodon

__all__ = ["MastodonChannel", "MastodonConfig", "classify_mastodon_error"]

T = TypeVar("T")

# Mastodon's answer to a valid token without the scope an endpoint needs (Api::BaseController).
OUT_OF_SCOPE = "This action is outside the authorized scopes"
USER_AGENT = "incident-broadcaster (Mastodon.py)"


class MastodonConfig(ChannelConfig):
    base_url: str = Field(description="the instance, e.g. https://mastodon.social (tests: a fake)")
    access_token: SecretRef = Field(
        description="an access token with the write:statuses scope (Preferences → Development "
        "→ New application), from env or file"
    )
    visibility: Literal["public", "unlisted"] = Field(
        default="public", description="unlisted: kept off the public timelines"
    )


def classify_mastodon_error(
    exc: Exception, what: str, ratelimit_reset: float | None = None
) -> DeliveryError:
    """Map a Mastodon.py exception to the contract's classes.

    Mastodon.py raises `MastodonAPIError(message, status, reason, error)` (subclasses for
    404, 401 and 5xx) and, in "throw" mode, a bare `MastodonRatelimitError` on 429: the
    reset time it parsed from `X-RateLimit-Reset` is only on the client (`ratelimit_reset`,
    epoch seconds), so the caller passes it in."""
    from mastodon.errors import (
        MastodonAPIError,
        MastodonIllegalArgumentError,
        MastodonNetworkError,
        MastodonRatelimitError,
    )

    if isinstance(exc, MastodonRatelimitError):
        retry_after = max(0.0, ratelimit_reset - time.time()) if ratelimit_reset else None
        return TransientError(f"{what}: HTTP 429 rate limited", retry_after=retry_after)
    if isinstance(exc, MastodonNetworkError):
        # Refused, dropped or timed out; it may have posted: the idempotency key tells.
        cause = exc.__cause__ or exc.__context__
        return TransientError(f"{what}: {type(cause or exc).__name__}")
    if isinstance(exc, MastodonAPIError) and len(exc.args) >= 4 and isinstance(exc.args[1], int):
        status, reason, error = exc.args[1], exc.args[2], exc.args[3]
        detail = " ".join(str(error or reason or "").split())[:200]
        said = f"{what}: HTTP {status} {detail}".rstrip()
        decided = classify_http_status(status, None, what)  # 429/5xx, 401/403, other 4xx
        if isinstance(decided, ChannelBrokenError):
            hint = (
                "the access token needs the write:statuses scope"
                if error == OUT_OF_SCOPE
                else "the instance refused the access token (Preferences → Development)"
            )
            return ChannelBrokenError(f"{said} — {hint}")
        if status == 404:
            return PostGoneError(said)
        return type(decided)(said)
    if isinstance(exc, MastodonIllegalArgumentError):
        return PermanentError(f"{what}: {exc}")
    # A 2xx that is not JSON, or anything unforeseen: it may have posted, retry with the key.
    return TransientError(f"{what}: unexpected answer ({type(exc).__name__})")


def receipt_of(status: Mapping[str, Any]) -> Receipt:
    url = status.get("url")
    return Receipt(provider_id=str(status["id"]), permalink=str(url) if url else None)


class MastodonChannel(Channel):
    """Post to one Mastodon account; follow-ups reply to the previous post of the incident."""

    family: ClassVar[ChannelFamily] = ChannelFamily.SHORT
    limits: ClassVar[ChannelLimits] = ChannelLimits(max_graphemes=500, link_length=23)
    capabilities: Capabilities = Capabilities(threads=True, edits=True, deletes=True)
    # Mastodon allows 300 statuses per 3 hours per account (and 300 requests per 5 min).
    # 0.025/s with a burst of 20 posts at most 20 + 270 in any 3 hours: under the limit,
    # with room left for a person posting by hand during an incident.
    default_rate_limit: ClassVar[RateLimit] = RateLimit(global_per_second=0.025, global_burst=20)
    default_concurrency: ClassVar[int] = 2
    config_model: ClassVar[type[ChannelConfig]] = MastodonConfig
    request_timeout_seconds: ClassVar[float] = 15.0

    config: MastodonConfig

    def __init__(self, name: str, config: ChannelConfig, context: ChannelContext) -> None:
        super().__init__(name, config, context)
        self._client: Mastodon | None = None

    def secrets(self) -> Mapping[str, SecretRef]:
        return {"access_token": self.config.access_token}

    async def start(self) -> None:
        from mastodon import Mastodon

        token = self.secret(self.config.access_token)
        if self._client is None and token is not None:
            self._client = Mastodon(
                access_token=token.get_secret_value(),
                api_base_url=self.config.base_url,
                version_check_mode="none",  # no request at start, no version guessing
                ratelimit_method="throw",  # the core waits, not a thread in time.sleep
                request_timeout=self.request_timeout_seconds,
                user_agent=USER_AGENT,
            )

    async def close(self) -> None:
        if self._client is not None:
            self._client.session.close()
            self._client = None

    async def _call(self, what: str, request: Callable[[Mastodon], T]) -> T:
        """Run one Mastodon.py call on a thread; raise a classified error on failure."""
        if self._client is None:
            await self.start()
        client = self._client
        if client is None:
            raise ChannelBrokenError(
                f"{self.name}: access token not found in {self.config.access_token.describe()}"
            )

        def run() -> T:
            try:
                return request(client)
            except Exception as exc:
                # Read at once, on this thread: the client keeps only the latest reset.
                reset = getattr(client, "ratelimit_reset", None)
                raise classify_mastodon_error(exc, what, reset) from exc

        return await asyncio.to_thread(run)

    async def send(self, message: Message) -> Receipt:
        thread = message.thread
        status = await self._call(
            f"{self.name}: post",
            lambda api: api.status_post(
                message.render.text(),
                in_reply_to_id=thread.parent.provider_id if thread else None,
                visibility=self.config.visibility,
                # A status has one language: a bilingual post is tagged with the first.
                language=message.render.variants[0].language,
                idempotency_key=message.delivery_key,
            ),
        )
        return receipt_of(status)

    async def edit(self, provider_id: str, message: Message) -> Receipt:
        """Replace a status's text (PUT /api/v1/statuses/:id); Mastodon shows it as edited."""
        status = await self._call(
            f"{self.name}: edit {provider_id}",
            lambda api: api.status_update(provider_id, message.render.text()),
        )
        return receipt_of(status)

    async def delete(self, provider_id: str, recipient: Recipient) -> None:
        """Delete a status (one already gone: `PostGoneError`)."""
        await self._call(
            f"{self.name}: delete {provider_id}", lambda api: api.status_delete(provider_id)
        )

    async def check_config(self) -> list[str]:
        problems = await super().check_config()
        if problems:
            return problems

        def verify(api: Mastodon) -> None:
            from mastodon.errors import MastodonAPIError

            try:
                api.account_verify_credentials()
            except MastodonAPIError as exc:
                # The token is valid; write:statuses alone may not read the profile.
                if exc.args[1:2] == (403,) and exc.args[3:4] == (OUT_OF_SCOPE,):
                    return
                raise

        started_here = self._client is None
        try:
            await self._call(f"{self.name}: verify credentials", verify)
        except DeliveryError as exc:
            problems.append(f"{exc} (at {self.config.base_url})")
        finally:
            if started_here:
                await self.close()
        return problems
