"""Bluesky: posts with link and hashtag facets, follow-ups as replies, on the `atproto` SDK.

Login uses a handle and an app password. Bluesky limits `createSession` to 30 per
5 minutes per handle, so the session (access + refresh tokens) is kept in a file under
the data folder, readable only by its owner, and resumed and refreshed on the next run
instead of logging in again. The tokens never go to the database or the logs.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from pydantic import Field

from broadcaster.models import (
    Capabilities,
    ChannelFamily,
    ChannelLimits,
    PostRef,
    RateLimit,
    Receipt,
    Thread,
)
from channels.base import (
    Channel,
    ChannelBrokenError,
    ChannelConfig,
    ChannelContext,
    DeliveryError,
    Message,
    PermanentError,
    Recipient,
    SecretRef,
    TransientError,
)

if TYPE_CHECKING:
    from atproto import AsyncClient, Session, SessionEvent, models

T = TypeVar("T")

PERMALINK = "https://bsky.app/profile/{handle}/post/{rkey}"
DEFAULT_SERVICE = "https://bsky.social"  # atproto's AsyncClient without a base_url
MAX_POST_LANGS = 3  # app.bsky.feed.post: langs has maxLength 3


class BlueskyConfig(ChannelConfig):
    handle: str = Field(description="the account's handle, e.g. status.example.com")
    app_password: SecretRef = Field(
        description="an app password (Settings → Privacy and security → App passwords), "
        "from env or file — never the account password"
    )
    base_url: str | None = Field(
        default=None, description="the PDS, when not bsky.social (self-hosted, or a test fake)"
    )


class SessionExpiredError(TransientError):
    """The PDS said ExpiredToken: refresh the session, then the request may go again."""


def xrpc_error_name(exc: BaseException) -> str | None:
    """The XRPC error name of an SDK request error ("ExpiredToken"), if the server sent one."""
    from atproto_client.models.common import XrpcError

    response = getattr(exc, "response", None)
    content = getattr(response, "content", None)
    return content.error if isinstance(content, XrpcError) else None


def classify_atproto_error(exc: Exception, what: str) -> DeliveryError:
    """Map an `atproto` SDK exception to the contract's classes, by XRPC error name first."""
    from atproto.exceptions import (
        BadRequestError,
        LoginRequiredError,
        NetworkError,
        RateLimitExceededError,
        RequestErrorBase,
        RequestException,
        UnauthorizedError,
    )

    name = xrpc_error_name(exc)
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    said = f"{what}: {status} {name}" if status and name else f"{what}: {type(exc).__name__}"
    if isinstance(exc, RateLimitExceededError):
        retry_after = exc.retry_after
        if retry_after is None and exc.reset_at is not None:
            retry_after = max(0.0, (exc.reset_at - datetime.now(UTC)).total_seconds())
        return TransientError(f"{said} (rate limited)", retry_after=retry_after)
    if isinstance(exc, NetworkError):  # transport failures, timeouts, 409/413/502
        return TransientError(said)
    if name == "ExpiredToken":  # a 400, but it means: refresh and try again
        return SessionExpiredError(f"{said} (session expired)")
    if isinstance(exc, UnauthorizedError | LoginRequiredError) or name in (
        "AuthenticationRequired",
        "AccountTakedown",
        "InvalidToken",
    ):
        return ChannelBrokenError(f"{said} — Bluesky refused the credentials")
    if isinstance(exc, BadRequestError):
        return PermanentError(said)
    if isinstance(exc, RequestException) and (status is None or status >= 500):
        return TransientError(said)
    if isinstance(exc, RequestErrorBase):
        return PermanentError(said)
    return TransientError(f"{what}: unexpected answer ({type(exc).__name__})")


def build_facets(text: str) -> list[models.AppBskyRichtextFacet.Main]:
    """Link and #hashtag facets, indexed by UTF-8 byte offsets as the lexicon requires.

    Detection is the SDK's port of Bluesky's own (`detectFacets` of @atproto/api), so a
    post gets the links and tags the Bluesky app itself would make; mentions are left
    out (they need a network lookup, and templates do not mention accounts)."""
    from atproto import client_utils

    facets: list[models.AppBskyRichtextFacet.Main] = client_utils.facet_detection.detect_facets(
        text
    )
    return facets


class SessionFile:
    """The persisted session string of one service (the PDS or entryway it was created
    at): a file only its owner can read or write."""

    def __init__(self, path: Path, service: str) -> None:
        self.path = path
        self.service = service

    def read(self) -> str | None:
        """The session, unless there is none or it was made at another service (the
        config's `base_url` changed): its tokens would be sent where they do not belong."""
        try:
            service, _, session = self.path.read_text().partition("\n")
        except FileNotFoundError:
            return None
        return session.strip() or None if service == self.service else None

    def write(self, value: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        temporary = self.path.with_suffix(".tmp")
        # Created 0600 from the start (never readable by others, whatever the umask),
        # then renamed over the old one so a crash leaves a whole file.
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write(f"{self.service}\n{value}")
        os.chmod(temporary, 0o600)
        os.replace(temporary, self.path)

    def forget(self) -> None:
        self.path.unlink(missing_ok=True)


class BlueskyChannel(Channel):
    """Post to one Bluesky account; follow-ups reply under the incident's first post."""

    family: ClassVar[ChannelFamily] = ChannelFamily.SHORT
    limits: ClassVar[ChannelLimits] = ChannelLimits(max_graphemes=300)  # counted in graphemes
    capabilities: Capabilities = Capabilities(threads=True, deletes=True)
    # 5,000 points/hour per account, 3 points a post: ≈1,666 posts/h. 0.45/s with a
    # burst of 10 allows at most 10 + 1,620 posts in any hour.
    default_rate_limit: ClassVar[RateLimit] = RateLimit(global_per_second=0.45, global_burst=10)
    default_concurrency: ClassVar[int] = 2
    config_model: ClassVar[type[ChannelConfig]] = BlueskyConfig
    request_timeout_seconds: ClassVar[float] = 15.0

    config: BlueskyConfig

    def __init__(self, name: str, config: ChannelConfig, context: ChannelContext) -> None:
        super().__init__(name, config, context)
        self.session_file = SessionFile(
            context.data_dir / "bluesky" / f"{name}.session",
            service=self.config.base_url or DEFAULT_SERVICE,
        )
        self._client: AsyncClient | None = None
        self._logged_in = False
        self._did: str | None = None
        self._handle = self.config.handle
        self._login_lock = asyncio.Lock()

    def secrets(self) -> Mapping[str, SecretRef]:
        return {"app_password": self.config.app_password}

    def account_key(self) -> str:
        # Two channel instances on one account share its points budget.
        return f"bluesky:{self.config.handle.lower()}"

    async def start(self) -> None:
        from atproto import AsyncClient, AsyncRequest

        if self._client is None:
            client = AsyncClient(
                self.config.base_url,
                request=AsyncRequest(timeout=self.request_timeout_seconds),
            )
            client.on_session_change(self._session_changed)
            self._client = client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.request.close()
            self._client = None
            self._logged_in = False

    async def _session_changed(self, event: SessionEvent, session: Session) -> None:
        from atproto import SessionEvent

        self._did, self._handle = session.did, session.handle
        if event in (SessionEvent.CREATE, SessionEvent.REFRESH):
            self.session_file.write(session.export())

    # --- session ---------------------------------------------------------------------

    async def _logged_in_client(self) -> AsyncClient:
        """The client with a working session: resumed from the file, else a new login."""
        await self.start()
        assert self._client is not None
        client = self._client
        async with self._login_lock:
            if self._logged_in:
                return client
            saved = self.session_file.read()
            if saved is not None and self._resumable(saved):
                try:
                    # Imports the tokens and fetches the profile, refreshing first when the
                    # access token is about to expire: no createSession.
                    await client.login(session_string=saved)
                    self._logged_in = True
                    return client
                except Exception as exc:
                    error = classify_atproto_error(exc, f"{self.name}: resuming the session")
                    if isinstance(error, TransientError) and not isinstance(
                        error, SessionExpiredError
                    ):
                        raise error from exc
                    self.session_file.forget()  # refused or expired: log in again
            password = self.secret(self.config.app_password)
            if password is None:
                raise ChannelBrokenError(
                    f"{self.name}: app password not found in {self.config.app_password.describe()}"
                )
            try:
                await client.login(self.config.handle, password.get_secret_value())
            except Exception as exc:
                error = classify_atproto_error(exc, f"{self.name}: login as {self.config.handle}")
                raise error from exc
            self._logged_in = True
            return client

    def _resumable(self, saved: str) -> bool:
        """The saved session is this account's (the config may have changed since)."""
        from atproto import Session

        try:
            session = Session.decode(saved)
        except ValueError:
            return False
        handle: str = session.handle
        return handle.lower() == self.config.handle.lower() or session.did == self.config.handle

    async def _refresh(self, client: AsyncClient, what: str) -> None:
        try:
            # The SDK refreshes by itself only when the token's own `exp` is near; a PDS
            # may refuse it earlier (revoked, clock skew). No public method does this.
            await client._refresh_and_set_session()
        except Exception as exc:
            error = classify_atproto_error(exc, what)
            if isinstance(error, TransientError) and not isinstance(error, SessionExpiredError):
                raise error from exc
            # The refresh token is refused too: the next try logs in with the password.
            self._logged_in = False
            self.session_file.forget()
            raise error from exc

    async def _call(self, what: str, request: Callable[[AsyncClient], Awaitable[T]]) -> T:
        """Run one request; on ExpiredToken or a refused token, refresh and try once more."""
        client = await self._logged_in_client()
        try:
            return await request(client)
        except Exception as exc:
            error = classify_atproto_error(exc, what)
            if not isinstance(error, ChannelBrokenError | SessionExpiredError):
                raise error from exc
        async with self._login_lock:  # one refresh for sends refused together
            await self._refresh(client, what)
        try:
            return await request(client)
        except Exception as exc:
            raise classify_atproto_error(exc, what) from exc

    # --- the contract -------------------------------------------------------------

    async def send(self, message: Message) -> Receipt:
        from atproto import AtUri

        text = message.render.text()
        reply = reply_ref(message.thread, self.name) if message.thread else None
        langs = self.languages[:MAX_POST_LANGS]

        async def post(client: AsyncClient) -> Any:
            return await client.send_post(
                text,
                profile_identify=self._did,
                reply_to=reply,
                langs=langs,
                facets=build_facets(text) or None,
            )

        created: models.AppBskyFeedPost.CreateRecordResponse = await self._call(
            f"{self.name}: post", post
        )
        rkey = AtUri.from_str(created.uri).rkey
        return Receipt(
            provider_id=created.uri,
            permalink=PERMALINK.format(handle=self._handle, rkey=rkey),
            data={"cid": created.cid},
        )

    async def delete(self, provider_id: str, recipient: Recipient) -> None:
        async def delete(client: AsyncClient) -> None:
            await client.delete_post(provider_id)

        await self._call(f"{self.name}: delete {provider_id}", delete)

    async def check_config(self) -> list[str]:
        problems = await super().check_config()
        if problems:
            return problems
        started = self._client is None
        try:
            await self._logged_in_client()
        except DeliveryError as exc:
            return [str(exc)]
        finally:
            if started:
                await self.close()
        return []


def reply_ref(thread: Thread, channel: str) -> models.AppBskyFeedPost.ReplyRef:
    """A reply under the incident's first post (root), after the latest one (parent)."""
    from atproto import models

    def strong_ref(post: PostRef) -> models.ComAtprotoRepoStrongRef.Main:
        cid = post.data.get("cid")
        if cid is None:
            raise PermanentError(f"{channel}: post {post.provider_id} has no cid to reply to")
        return models.ComAtprotoRepoStrongRef.Main(uri=post.provider_id, cid=cid)

    return models.AppBskyFeedPost.ReplyRef(
        root=strong_ref(thread.root), parent=strong_ref(thread.parent)
    )
