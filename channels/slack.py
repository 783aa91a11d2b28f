"""Slack: each update as a Block Kit message in one or more Slack channels, follow-ups in
the thread of the first post, which is edited to show the incident's current state.

Built on slack-sdk's `AsyncWebClient` (aiohttp). The SDK's own retry handlers are turned
off: the core owns retries, and the SDK's default one retries a dropped connection, which
may post the same message twice.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field, field_validator

from broadcaster.models import (
    Capabilities,
    ChannelFamily,
    ChannelLimits,
    ChannelRender,
    RateLimit,
    Receipt,
)
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
    retry_after_seconds,
)

if TYPE_CHECKING:
    import aiohttp
    from slack_sdk.web.async_client import AsyncWebClient

__all__ = ["SlackChannel", "SlackConfig", "escape_mrkdwn", "slack_blocks"]

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://slack.com/api/"
SECTION_MAX_CHARS = 3000  # Block Kit: a section's text object holds at most 3,000 characters
HEADER_MAX_CHARS = 150  # Block Kit: a header's plain_text holds at most 150 characters

# Slack's `error` codes (https://api.slack.com/methods/chat.postMessage#errors), by what
# they mean for the core. Anything else answered ok:false is this recipient's problem.
BROKEN_ERRORS = frozenset(
    {
        "invalid_auth",
        "not_authed",
        "token_revoked",
        "token_expired",
        "account_inactive",
        "missing_scope",  # the app lacks chat:write: no channel will work until fixed
        "no_permission",
        "team_access_not_granted",
        "org_login_required",
        "ekm_access_denied",
    }
)
TRANSIENT_ERRORS = frozenset(
    {"ratelimited", "internal_error", "fatal_error", "service_unavailable", "request_timeout"}
)


class SlackConfig(ChannelConfig):
    token: SecretRef = Field(description="the bot token (xoxb-…), from env or file")
    channels: list[str] = Field(
        min_length=1, description="Slack channel ids (C…): each gets its own post and thread"
    )
    base_url: str = Field(default=DEFAULT_BASE_URL, description="Web API root (tests: a fake)")
    broadcast_follow_ups: bool = Field(
        default=False, description="also show follow-ups in the channel (reply_broadcast)"
    )
    update_first_post: bool = Field(
        default=True, description="edit the first post to show the latest state on a follow-up"
    )

    @field_validator("base_url")
    @classmethod
    def _trailing_slash(cls, value: str) -> str:
        # The SDK joins base_url + method name: "…/api" + "chat.postMessage" would be wrong.
        return value if value.endswith("/") else value + "/"


def escape_mrkdwn(text: str) -> str:
    """Escape the three characters Slack's mrkdwn gives meaning to (`<@U…>`, `&amp;`)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _split_section(text: str, limit: int = SECTION_MAX_CHARS) -> list[str]:
    """Pieces of at most `limit` characters, cut at line ends where possible.

    The core checks the rendered text against 3,000 characters; escaping (& -> &amp;) can
    still push a section past Slack's limit, so the overflow goes into the next section."""
    pieces: list[str] = []
    while len(text) > limit:
        cut = text.rfind("\n", 0, limit + 1)
        if cut <= 0:
            cut = text.rfind(" ", 0, limit + 1)
        if cut <= 0:
            cut = limit
        amp = text.rfind("&", max(0, cut - 4), cut)
        if amp > 0 and ";" not in text[amp:cut]:
            cut = amp  # never split an entity (&amp;) in two
        pieces.append(text[:cut].rstrip("\n"))
        text = text[cut:].lstrip("\n ")
    pieces.append(text)
    return pieces


def _next_update(value: str) -> str:
    """A date Slack shows in each reader's own time zone (`<!date^…>`), with a fallback."""
    when = datetime.fromisoformat(value)
    fallback = escape_mrkdwn(when.strftime("%Y-%m-%d %H:%M %Z").strip())
    return f"<!date^{int(when.timestamp())}^{{date_short_pretty}} {{time}}|{fallback}>"


def _fact_fields(render: ChannelRender, language: str) -> list[dict[str, Any]]:
    """Status, impact, components, ETA and next update as Block Kit section fields."""
    fields = []
    for key, heading, value in render.fact_rows(language):
        if key == "components":
            shown = "\n".join(
                f"{escape_mrkdwn(name)}: {escape_mrkdwn(state)}" for name, state in value.items()
            )
        elif key == "next_update":
            shown = _next_update(str(value))
        else:
            shown = escape_mrkdwn(str(value))
        fields.append(f"*{heading}*\n{shown}")
    # Block Kit: a field's text holds at most 2,000 characters.
    return [{"type": "mrkdwn", "text": field[:2000]} for field in fields]


def slack_blocks(render: ChannelRender) -> tuple[list[dict[str, Any]], str]:
    """The Block Kit blocks and the plain-text fallback (`text`) of one update.

    Header: the title; a section per language with the rendered chat text as mrkdwn;
    then status, impact, components, ETA and next update as fields when the update has
    them."""
    blocks: list[dict[str, Any]] = []
    title = str(render.facts.get("title") or "").strip()
    if title:
        header = title if len(title) <= HEADER_MAX_CHARS else title[: HEADER_MAX_CHARS - 1] + "…"
        # plain_text is not mrkdwn: nothing to escape.
        blocks.append({"type": "header", "text": {"type": "plain_text", "text": header}})
    for variant in render.variants if render.joined else render.variants[:1]:
        for piece in _split_section(escape_mrkdwn(variant.text)):
            blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": piece}})
    fields = _fact_fields(render, render.variants[0].language)
    if fields:
        blocks.append({"type": "section", "fields": fields})
    # Notifications, screen readers and old clients show `text`; it is mrkdwn too.
    fallback = escape_mrkdwn(render.text() if render.joined else render.variants[0].text)
    return blocks, fallback


def _header(headers: Any, name: str) -> str | None:
    if not headers:
        return None
    for key, value in dict(headers).items():
        if str(key).lower() == name.lower():
            return str(value[0] if isinstance(value, list) and value else value)
    return None


def classify_slack_error(exc: BaseException, what: str) -> DeliveryError:
    """Translate a slack-sdk or aiohttp failure into the core's error classes."""
    import aiohttp
    from slack_sdk.errors import SlackApiError

    if isinstance(exc, SlackApiError):
        response = exc.response
        # An AsyncSlackResponse, or the raw aiohttp response when the body was not JSON.
        status = int(getattr(response, "status_code", None) or getattr(response, "status", 0) or 0)
        data = getattr(response, "data", None)
        error = str(data.get("error") or "") if isinstance(data, dict) else ""
        retry_after = _header(getattr(response, "headers", None), "Retry-After")
        if error == "ratelimited" or status == 429:
            return TransientError(
                f"{what}: rate limited by Slack", retry_after=retry_after_seconds(retry_after)
            )
        if error in BROKEN_ERRORS:
            return ChannelBrokenError(f"{what}: Slack refused the token ({error})")
        if error in TRANSIENT_ERRORS or status >= 500:
            return TransientError(f"{what}: Slack {error or f'HTTP {status}'}")
        if error == "message_not_found":
            return PostGoneError(f"{what}: Slack {error}")
        if error:
            return PermanentError(f"{what}: Slack {error}")
        return classify_http_status(status, retry_after, what)
    if isinstance(exc, TimeoutError | aiohttp.ClientError):
        # A dropped connection may or may not have posted: the core decides to retry.
        return TransientError(f"{what}: {type(exc).__name__}")
    return TransientError(f"{what}: {type(exc).__name__}: {exc}")


class SlackChannel(Channel):
    """Post to Slack channels with a bot token; follow-ups in the first post's thread."""

    family: ClassVar[ChannelFamily] = ChannelFamily.CHAT
    # Slack takes 40,000 characters in `text` but a section block only 3,000: a longer
    # update would be split over several sections, and nobody reads a wall in a status
    # channel. 3,000 is what one section shows.
    limits: ClassVar[ChannelLimits] = ChannelLimits(max_chars=SECTION_MAX_CHARS)
    capabilities: Capabilities = Capabilities(
        threads=True, edits=True, deletes=True, per_recipient=True
    )
    # chat.postMessage: "1 message per second per channel, short bursts allowed".
    default_rate_limit: ClassVar[RateLimit] = RateLimit(per_target_per_second=1)
    default_concurrency: ClassVar[int] = 4
    request_timeout_seconds: ClassVar[float] = 10.0
    config_model: ClassVar[type[ChannelConfig]] = SlackConfig

    config: SlackConfig

    def __init__(self, name: str, config: ChannelConfig, context: ChannelContext) -> None:
        super().__init__(name, config, context)
        self._session: aiohttp.ClientSession | None = None
        self._client: AsyncWebClient | None = None

    def recipients(self) -> list[Recipient]:
        return [Recipient(id=channel) for channel in self.config.channels]

    def secrets(self) -> Mapping[str, SecretRef]:
        return {"token": self.config.token}

    async def start(self) -> None:
        import aiohttp
        from slack_sdk.web.async_client import AsyncWebClient

        if self._client is not None:
            return
        token = self.secret(self.config.token)
        if self._session is None:
            # trust_env: aiohttp honours HTTPS_PROXY *and* NO_PROXY; the SDK's own proxy
            # setting reads HTTPS_PROXY and ignores NO_PROXY, so it is cleared below.
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.request_timeout_seconds),
                connector=aiohttp.TCPConnector(limit=self.concurrency),
                trust_env=True,
            )
        client = AsyncWebClient(
            token=token.get_secret_value() if token else None,
            base_url=self.config.base_url,
            session=self._session,
            timeout=int(self.request_timeout_seconds),
            retry_handlers=[],  # the core retries; the SDK's would post twice
        )
        client.proxy = None
        self._client = client

    async def close(self) -> None:
        self._client = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _api(self) -> AsyncWebClient:
        if self._client is None:
            await self.start()
        assert self._client is not None
        if self._client.token is None:
            raise ChannelBrokenError(
                f"{self.name}: token not found in {self.config.token.describe()}"
            )
        return self._client

    async def send(self, message: Message) -> Receipt:
        client = await self._api()
        channel = message.recipient.id
        what = f"{self.name} → {channel}"
        blocks, text = slack_blocks(message.render)
        thread = message.thread
        extra: dict[str, Any] = {}
        if thread is not None:
            extra = {"thread_ts": thread.root.provider_id}
            if self.config.broadcast_follow_ups:
                extra["reply_broadcast"] = True
        try:
            response = await client.chat_postMessage(
                channel=channel, text=text, blocks=blocks, unfurl_links=False, **extra
            )
        except Exception as exc:
            raise classify_slack_error(exc, what) from exc
        ts = str(response["ts"])
        posted_in = str(response.get("channel") or channel)
        # Posted: from here on nothing may raise, or the core would post it again.
        permalink = await self._permalink(client, posted_in, ts, what)
        if thread is not None and self.config.update_first_post:
            root_channel = thread.root.data.get("channel", posted_in)
            await self._show_current_state(client, root_channel, thread.root.provider_id, message)
        return Receipt(provider_id=ts, permalink=permalink, data={"channel": posted_in})

    async def _permalink(
        self, client: AsyncWebClient, channel: str, ts: str, what: str
    ) -> str | None:
        try:
            response = await client.chat_getPermalink(channel=channel, message_ts=ts)
        except Exception as exc:
            log.warning("%s: no permalink for %s: %s", what, ts, classify_slack_error(exc, what))
            return None
        permalink = response.get("permalink")
        return str(permalink) if permalink else None

    async def _show_current_state(
        self, client: AsyncWebClient, channel: str, root_ts: str, message: Message
    ) -> None:
        """Edit the first post to show the latest update; best effort (the follow-up went
        out, and the next follow-up edits it again)."""
        blocks, text = slack_blocks(message.render)
        blocks.append(
            {
                "type": "context",
                "elements": [
                    {"type": "mrkdwn", "text": "Latest update — every update is in the thread."}
                ],
            }
        )
        try:
            await client.chat_update(channel=channel, ts=root_ts, text=text, blocks=blocks)
        except Exception as exc:
            what = f"{self.name} → {channel}"
            log.warning("%s: first post not updated: %s", what, classify_slack_error(exc, what))

    async def edit(self, provider_id: str, message: Message) -> Receipt:
        """Replace a post's text and blocks with this update's (chat.update)."""
        client = await self._api()
        channel = message.recipient.id
        blocks, text = slack_blocks(message.render)
        try:
            await client.chat_update(channel=channel, ts=provider_id, text=text, blocks=blocks)
        except Exception as exc:
            raise classify_slack_error(exc, f"{self.name} → {channel}") from exc
        return Receipt(provider_id=provider_id, data={"channel": channel})

    async def delete(self, provider_id: str, recipient: Recipient) -> None:
        """Delete a post (chat.delete); a post already gone counts as deleted."""
        client = await self._api()
        try:
            await client.chat_delete(channel=recipient.id, ts=provider_id)
        except Exception as exc:
            raise classify_slack_error(exc, f"{self.name} → {recipient.id}") from exc

    async def check_config(self) -> list[str]:
        problems = await super().check_config()
        if problems:
            return problems
        token = self.secret(self.config.token)
        if token is not None and not token.get_secret_value().startswith("xoxb-"):
            problems.append(f"{self.name}: the token is not a bot token (xoxb-…)")
        started_here = self._client is None
        try:
            client = await self._api()
            await client.auth_test()
        except Exception as exc:
            error = exc if isinstance(exc, DeliveryError) else classify_slack_error(exc, self.name)
            problems.append(f"{error} — auth.test at {self.config.base_url} failed")
        finally:
            if started_here:
                await self.close()
        return problems
