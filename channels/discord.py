"""Discord: each update posted to a Discord channel (or a thread, or a forum post) through
an incoming webhook.

No SDK: Discord has none for Python, and discord.py's `Webhook` cannot be pointed at a
local server, so this adapter speaks the webhook API with the shared aiohttp session of
`HttpChannel`. The webhook URL (`https://discord.com/api/webhooks/<id>/<token>`) is the
credential — anyone holding it can post as the webhook — so it is a secret: it never
appears in an error, a log line, a receipt or the store. Errors name the config key and
where the secret is read from instead. The URL is used as Discord shows it (unversioned
`/api/`, or `/api/v10/` if so written); only its query string is dropped.

The text goes in `content` (at most 2,000 characters, the limit the core checks), with
Discord's markdown escaped so that an update reads as written: `snake_case` stays
upright, a summary starting with `#` is no headline, `[x](…)` is no disguised link. The
chat templates' `*heading*` line becomes **bold**. Escaping can only lengthen the text;
in the rare case it pushes an update that fits past 2,000 characters, the same text goes
as an embed's description (4,096 characters: escaping at most doubles a text), so an
update the checks passed is always delivered whole.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import urlencode, urlsplit

from pydantic import AnyHttpUrl, Field, field_validator

from broadcaster.models import (
    Capabilities,
    ChannelFamily,
    ChannelLimits,
    ChannelRender,
    RateLimit,
    Receipt,
)
from broadcaster.text import find_links, heading_words
from channels.base import (
    ChannelBrokenError,
    ChannelConfig,
    ChannelContext,
    DeliveryError,
    HttpChannel,
    Message,
    PermanentError,
    PostGoneError,
    Recipient,
    SecretRef,
    TransientError,
    retry_after_seconds,
)

__all__ = [
    "DiscordChannel",
    "DiscordConfig",
    "classify_discord_response",
    "discord_markdown",
    "discord_message",
]

log = logging.getLogger(__name__)

CONTENT_MAX_CHARS = 2000  # Execute Webhook: "content: the message contents (up to 2000 characters)"
USERNAME_MAX_CHARS = 80  # Execute Webhook `username`: 1-80 characters

# Discord's JSON error codes (https://discord.com/developers/docs/topics/opcodes-and-status-codes).
UNKNOWN_CHANNEL = 10003  # thread_id names no thread of the webhook's channel
UNKNOWN_WEBHOOK = 10015
UNKNOWN_MESSAGE = 10008
INVALID_WEBHOOK_TOKEN = 50027
# A webhook into a forum channel must name a post (thread_id): every update would fail alike.
FORUM_NEEDS_THREAD = 220001

FIX_URL = "copy the webhook URL again from Server Settings → Integrations → Webhooks"

# `https://discord.com/api/webhooks/<id>/<token>` (also `/api/v10/…`, ptb./canary. hosts).
_WEBHOOK_PATH = re.compile(r"(?P<root>.*)/webhooks/(?P<id>[0-9]+)/(?P<token>[A-Za-z0-9_.-]+)/?")
_SNOWFLAKE = re.compile(r"[0-9]{1,20}")
# Characters Discord's markdown gives a meaning to anywhere in a line: emphasis (* _),
# strike (~~), spoiler (||), code (`), masked links ([text](url)), mentions, channels,
# custom emoji and timestamps (<@…> <#…> <:…:…> <t:…>), and the escape itself (\).
_INLINE_MARKUP = re.compile(r"([\\*_~`|\[<])")
# At a line's start: headings (# ## ###), subtext (-#), quotes (> >>>), lists (- + 1.).
_LINE_START_MARKUP = re.compile(r"^(\s*)([#>+-])")
_NUMBERED_ITEM = re.compile(r"^(\s*[0-9]+)\.(?=\s|$)")


class DiscordConfig(ChannelConfig):
    webhook_url: SecretRef = Field(
        description="the webhook URL (https://discord.com/api/webhooks/<id>/<token>), from env "
        "or file: it is the credential"
    )
    username: str | None = Field(
        default=None, description="the name posts show (default: the webhook's own)"
    )
    avatar_url: AnyHttpUrl | None = Field(
        default=None, description="the picture posts show (default: the webhook's own)"
    )
    thread_id: str | None = Field(
        default=None, description="post into this thread or forum post of the webhook's channel"
    )

    @field_validator("username")
    @classmethod
    def _allowed_username(cls, value: str | None) -> str | None:
        # Discord refuses these with a 400 on every post: better said once, at load.
        if value is None:
            return None
        name = value.strip()
        if not 1 <= len(name) <= USERNAME_MAX_CHARS:
            raise ValueError(f"must be 1 to {USERNAME_MAX_CHARS} characters")
        lowered = name.lower()
        if "discord" in lowered or "clyde" in lowered or lowered in ("everyone", "here"):
            raise ValueError("Discord refuses webhook names containing 'discord' or 'clyde'")
        return name

    @field_validator("thread_id", mode="before")
    @classmethod
    def _snowflake(cls, value: Any) -> Any:
        # TOML gives an unquoted id as an integer.
        value = str(value) if isinstance(value, int) else value
        if isinstance(value, str) and not _SNOWFLAKE.fullmatch(value):
            raise ValueError(f"'{value}' is not a Discord id (copy it with Developer Mode on)")
        return value


@dataclass(frozen=True)
class Webhook:
    """A parsed webhook URL. The token and URL stay out of repr(): they are the secret."""

    id: str
    token: str = field(repr=False)
    url: str = field(repr=False)  # scheme://host/…/webhooks/<id>/<token>, no query


def parse_webhook_url(value: str) -> Webhook | None:
    """The webhook a URL names, or None when it is not a Discord webhook URL."""
    parts = urlsplit(value.strip())
    match = _WEBHOOK_PATH.fullmatch(parts.path)
    if parts.scheme not in ("http", "https") or not parts.netloc or match is None:
        return None
    base = f"{parts.scheme}://{parts.netloc}{match['root']}/webhooks/{match['id']}/{match['token']}"
    return Webhook(id=match["id"], token=match["token"], url=base)


def _escape_text(text: str, *, line_start: bool) -> str:
    """Escape Discord markdown in a piece of a line that holds no link. A backslash before
    any punctuation shows that character, so escaping never changes the words."""
    text = _INLINE_MARKUP.sub(r"\\\1", text)
    if line_start:
        text = _LINE_START_MARKUP.sub(r"\1\\\2", text)
        text = _NUMBERED_ITEM.sub(r"\1\\.", text)
    return text


def _escape_line(line: str) -> str:
    """Escape one line, leaving its links as written (an escape inside a URL would break
    it) and wrapping them in <…>, which keeps Discord from adding a preview card.

    Each character gets at most one backslash and each link two brackets, so the result
    is at most twice as long as the line."""
    pieces: list[str] = []
    position = 0
    for link in find_links(line):
        start = line.index(link, position)
        pieces.append(_escape_text(line[position:start], line_start=position == 0))
        pieces.append(f"<{link}>")
        position = start + len(link)
    pieces.append(_escape_text(line[position:], line_start=position == 0))
    return "".join(pieces)


def discord_markdown(text: str) -> str:
    """The rendered plain text as Discord markdown: markup escaped, links kept whole and
    without preview, a `*heading*` line in bold. Never more than twice as long."""
    lines = []
    for line in text.split("\n"):
        # A single asterisk is italics in Discord: the heading becomes **bold**.
        heading = heading_words(line)
        lines.append(f"**{_escape_line(heading)}**" if heading else _escape_line(line))
    return "\n".join(lines)


def discord_message(render: ChannelRender) -> dict[str, Any]:
    """The `content` (or, when escaping made it too long, the embed) of one update, and
    `allowed_mentions` so that an "@everyone" in an update notifies nobody."""
    # A webhook has one audience: every configured language goes out in one message.
    text = discord_markdown(render.text() if render.joined else render.variants[0].text)
    body: dict[str, Any] = {"allowed_mentions": {"parse": []}}
    if len(text) <= CONTENT_MAX_CHARS:
        body["content"] = text
    else:
        # Embed Limits: a description holds 4,096 characters, and links in it never get
        # preview cards.
        body["embeds"] = [{"description": text}]
    return body


def _form_error(errors: Any, path: str = "") -> str | None:
    """The first field error of a 400 "Invalid Form Body", as `field: message`."""
    if isinstance(errors, dict):
        for item in errors.get("_errors") or []:
            if isinstance(item, dict) and item.get("message"):
                return f"{path}: {item['message']}" if path else str(item["message"])
        for key, value in errors.items():
            if key != "_errors":
                found = _form_error(value, f"{path}.{key}" if path else str(key))
                if found:
                    return found
    elif isinstance(errors, list):
        for value in errors:
            if isinstance(value, str):  # API v6's shape: {"content": ["Must be …"]}
                return f"{path}: {value}" if path else value
            found = _form_error(value, path)
            if found:
                return found
    return None


def classify_discord_response(
    status: int,
    headers: Mapping[str, str],
    text: str,
    what: str,
    *,
    thread_id: str | None = None,
) -> DeliveryError:
    """Translate a failed webhook call (status, headers, body) into the core's classes."""
    try:
        data = json.loads(text) if text else {}
    except ValueError:
        data = {}  # an HTML page from Cloudflare or a proxy
    data = data if isinstance(data, dict) else {}
    code = data.get("code") if isinstance(data.get("code"), int) else None
    said = f"{code} {data.get('message') or ''}".strip() if code else f"HTTP {status}"
    if status == 429:
        # Retry-After (whole seconds, rounded up) first; the body's `retry_after` is in
        # seconds on API v8+, in milliseconds on the old versions an unversioned URL may
        # get, so it is only the fallback.
        retry_after = retry_after_seconds(headers.get("Retry-After"))
        if retry_after is None and isinstance(data.get("retry_after"), int | float):
            retry_after = max(0.0, float(data["retry_after"]))
        scope = " (global)" if data.get("global") else ""
        return TransientError(f"{what}: rate limited by Discord{scope}", retry_after=retry_after)
    if status == 408 or status >= 500:
        return TransientError(f"{what}: Discord {said}")
    if code == UNKNOWN_WEBHOOK or (status == 404 and code is None):
        return ChannelBrokenError(
            f"{what}: Discord has no such webhook ({said}) — it was deleted or the URL is "
            f"wrong; {FIX_URL}"
        )
    if code == INVALID_WEBHOOK_TOKEN or status == 401:
        return ChannelBrokenError(f"{what}: Discord refused the webhook token ({said}) — {FIX_URL}")
    if code == UNKNOWN_CHANNEL and thread_id is not None:
        return ChannelBrokenError(
            f"{what}: Discord has no thread {thread_id} in the webhook's channel ({said}) — "
            "check thread_id"
        )
    if code == FORUM_NEEDS_THREAD:
        return ChannelBrokenError(f"{what}: Discord {said} — set thread_id to a forum post")
    if status == 403:
        return ChannelBrokenError(f"{what}: Discord refused the webhook ({said})")
    if code == UNKNOWN_MESSAGE:
        return PostGoneError(f"{what}: Discord {said}")
    detail = _form_error(data.get("errors"))
    return PermanentError(f"{what}: Discord {said}" + (f" ({detail})" if detail else ""))


class DiscordChannel(HttpChannel):
    """Post to one Discord channel, thread or forum post through an incoming webhook."""

    family: ClassVar[ChannelFamily] = ChannelFamily.CHAT
    limits: ClassVar[ChannelLimits] = ChannelLimits(max_chars=CONTENT_MAX_CHARS)
    # A webhook can edit and delete its own messages, but cannot reply to one: follow-ups
    # are new messages in the same channel (or thread_id's thread).
    capabilities: Capabilities = Capabilities(edits=True, deletes=True)
    # Webhooks answer 5 requests per 2 s (their X-RateLimit bucket) and 30 messages a
    # minute per Discord channel. A burst of 5 refilled at 0.4/s stays under both: at
    # most 5 in any 2 s, 5 + 24 = 29 in any minute. Per account, and the account is the
    # webhook, so channel instances sharing one webhook share its budget.
    default_rate_limit: ClassVar[RateLimit] = RateLimit(global_per_second=0.4, global_burst=5)
    default_concurrency: ClassVar[int] = 2  # one webhook: more in flight only meets its 429
    config_model: ClassVar[type[ChannelConfig]] = DiscordConfig

    config: DiscordConfig

    def __init__(self, name: str, config: ChannelConfig, context: ChannelContext) -> None:
        super().__init__(name, config, context)
        self._guild_id: str | None = None
        self._guild_looked_up = False

    def secrets(self) -> Mapping[str, SecretRef]:
        return {"webhook_url": self.config.webhook_url}

    def account_key(self) -> str:
        # The webhook id is not a secret (the token is): it keys the webhook's budget.
        webhook = self._parsed()
        return f"discord:{webhook.id}" if webhook else self.name

    # --- the webhook -----------------------------------------------------------------

    def _parsed(self) -> Webhook | None:
        # Read at each use, like every secret: a replaced webhook URL is picked up.
        secret = self.secret(self.config.webhook_url)
        return parse_webhook_url(secret.get_secret_value()) if secret is not None else None

    def _webhook_or_broken(self) -> Webhook:
        webhook = self._parsed()
        if webhook is not None:
            return webhook
        where = self.config.webhook_url.describe()
        if self.secret(self.config.webhook_url) is None:
            raise ChannelBrokenError(f"{self.name}: webhook_url not found in {where}")
        raise ChannelBrokenError(
            f"{self.name}: the webhook_url in {where} is not a Discord webhook URL "
            "(https://discord.com/api/webhooks/<id>/<token>) — " + FIX_URL
        )

    def _url(self, webhook: Webhook, suffix: str = "", **query: str | None) -> str:
        params = {key: value for key, value in query.items() if value is not None}
        return webhook.url + suffix + (f"?{urlencode(params)}" if params else "")

    async def _request(
        self, method: str, url: str, *, what: str, payload: Mapping[str, Any] | None = None
    ) -> Any:
        """One webhook call: the answer's JSON (None for 204), or a classified error."""
        if self._session is None:
            await self.start()
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        body = json.dumps(payload, ensure_ascii=False).encode() if payload is not None else None
        thread_id = self.config.thread_id

        def classify(status: int, headers: Mapping[str, str], text: str) -> DeliveryError:
            return classify_discord_response(status, headers, text, what, thread_id=thread_id)

        _, text = await self.request(
            method, url, body=body, headers=headers, what=what, classify=classify
        )
        try:
            return json.loads(text) if text else None
        except ValueError:
            return None  # accepted all the same; the message id is then unknown

    def _body(self, message: Message) -> dict[str, Any]:
        body = discord_message(message.render)
        if self.config.username:
            body["username"] = self.config.username
        if self.config.avatar_url:
            body["avatar_url"] = str(self.config.avatar_url)
        return body

    # --- the contract ------------------------------------------------------------------

    async def send(self, message: Message) -> Receipt:
        webhook = self._webhook_or_broken()
        what = self.name
        # wait=true: Discord answers with the message (its id) once it is saved, instead
        # of 204 and no error when it was not.
        url = self._url(webhook, wait="true", thread_id=self.config.thread_id)
        posted = await self._request("POST", url, what=what, payload=self._body(message))
        # Posted: from here on nothing may raise, or the core would post it again.
        if not isinstance(posted, dict) or not posted.get("id"):
            return Receipt(delivered=True)
        message_id = str(posted["id"])
        channel_id = str(posted.get("channel_id") or "")
        return Receipt(
            provider_id=message_id,
            permalink=await self._permalink(webhook, posted, channel_id, message_id),
            data={"channel_id": channel_id} if channel_id else {},
            delivered=True,  # with wait=true the answer means the message is in the channel
        )

    async def _permalink(
        self, webhook: Webhook, posted: Mapping[str, Any], channel_id: str, message_id: str
    ) -> str | None:
        """discord.com/channels/<guild>/<channel>/<message>; the guild id is not in the
        message, so it is read once from the webhook object (best effort)."""
        guild_id = str(posted.get("guild_id") or "") or self._guild_id
        if not guild_id and not self._guild_looked_up:
            self._guild_looked_up = True
            try:
                found = await self._request("GET", webhook.url, what=self.name)
            except DeliveryError as error:
                log.warning("%s: no permalinks (webhook not readable): %s", self.name, error)
                found = None
            if isinstance(found, dict) and found.get("guild_id"):
                self._guild_id = guild_id = str(found["guild_id"])
        if not guild_id or not channel_id:
            return None
        return f"https://discord.com/channels/{guild_id}/{channel_id}/{message_id}"

    async def edit(self, provider_id: str, message: Message) -> Receipt:
        """Replace a message's text with this update's (Edit Webhook Message)."""
        webhook = self._webhook_or_broken()
        body = self._body(message)
        body.pop("username", None)  # a posted message keeps its name and avatar
        body.pop("avatar_url", None)
        # Set both: an edit may move the text between `content` and the embed.
        body.setdefault("content", None)
        body.setdefault("embeds", [])
        url = self._url(webhook, f"/messages/{provider_id}", thread_id=self.config.thread_id)
        edited = await self._request("PATCH", url, what=self.name, payload=body)
        channel_id = str(edited.get("channel_id") or "") if isinstance(edited, dict) else ""
        return Receipt(
            provider_id=provider_id,
            data={"channel_id": channel_id} if channel_id else {},
            delivered=True,
        )

    async def delete(self, provider_id: str, recipient: Recipient) -> None:
        """Delete a message (Delete Webhook Message); one already gone counts as deleted."""
        webhook = self._webhook_or_broken()
        url = self._url(webhook, f"/messages/{provider_id}", thread_id=self.config.thread_id)
        await self._request("DELETE", url, what=self.name)

    async def check_config(self) -> list[str]:
        """The webhook URL is there, is a webhook URL, and Discord knows it (GET webhook)."""
        problems = await super().check_config()
        if problems:
            return problems
        try:
            webhook = self._webhook_or_broken()
        except ChannelBrokenError as error:
            return [str(error)]
        where = self.config.webhook_url.describe()
        started_here = self._session is None
        try:
            found = await self._request("GET", webhook.url, what=self.name)
        except DeliveryError as error:
            problems.append(f"{error} (checked the webhook_url from {where})")
        else:
            if isinstance(found, dict) and found.get("type") not in (None, 1):
                problems.append(
                    f"{self.name}: the webhook_url from {where} is not an incoming webhook — "
                    "create one in Server Settings → Integrations → Webhooks"
                )
        finally:
            if started_here:
                await self.close()
        return problems
