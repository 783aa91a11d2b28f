"""A fake of Discord's incoming webhooks on 127.0.0.1, for `broadcaster demo`, drills and
tests.

It answers what the Discord channel calls, at `/api/webhooks/{id}/{token}` (or
`/api/v{n}/webhooks/…`): Execute Webhook (POST, `?wait=true` answers the message, without
it 204; `?thread_id=` posts into a thread), Get Webhook (GET), and Get/Edit/Delete
Webhook Message (`…/messages/{message_id}`). Errors have Discord's shape,
`{"message": …, "code": …}`: 404 10015 "Unknown Webhook" for an unknown id, 401 50027
"Invalid Webhook Token" for a wrong token, 404 10003 for an unknown thread, 404 10008 for
an unknown message, 400 50035 "Invalid Form Body" (with `errors`) for content over 2,000
characters. Failures are scripted per operation; 429s carry `retry_after` in the body
(seconds) and `Retry-After` (whole seconds, rounded up) like Discord's. It keeps every
message, deleted ones too, and records every call.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from broadcaster.sandbox.server import ScriptedSimulator, dropped

__all__ = ["DiscordCall", "DiscordFailure", "DiscordMessage", "FakeDiscord"]

DEFAULT_WEBHOOK_ID = "1234567890123456789"
DEFAULT_TOKEN = "sandbox-Webhook_token-0123456789abcdefABCDEF"
DEFAULT_GUILD_ID = "1100000000000000001"
DEFAULT_CHANNEL_ID = "1100000000000000002"
MAX_CONTENT_CHARS = 2000
MAX_EMBED_DESCRIPTION_CHARS = 4096

Operation = Literal["execute", "get", "get_message", "edit", "delete"]


class DiscordFailure(BaseModel):
    """How to fail one call: an HTTP status with Discord's error body, or no answer."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    status: int = Field(default=500, ge=400, le=599, description="429, 500, 400…")
    code: int | None = Field(default=None, description="Discord's JSON error code")
    message: str | None = None
    retry_after: float | None = Field(default=None, ge=0, description="429: seconds")
    errors: dict[str, Any] | None = Field(default=None, description="400: field errors")
    drop: bool = Field(default=False, description="close the connection without a response")
    times: int | None = Field(default=1, ge=1, description="None: every matching call")


@dataclass
class DiscordCall:
    """One request the fake saw (the token is not kept), and what it answered."""

    operation: str
    query: dict[str, str]
    body: dict[str, Any] | None
    at: float  # time.monotonic()
    status: int | None = None  # None: the connection was dropped

    @property
    def ok(self) -> bool:
        return self.status is not None and self.status < 300


@dataclass
class DiscordMessage:
    """A message as the channel shows it now (deleted ones are kept, marked)."""

    id: str
    channel_id: str
    thread_id: str | None
    content: str
    embeds: list[dict[str, Any]]
    username: str | None
    avatar_url: str | None
    allowed_mentions: dict[str, Any] | None
    mention_everyone: bool
    edits: int = 0
    deleted: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def edited(self) -> bool:
        return self.edits > 0


class _Refused(Exception):
    def __init__(self, status: int, message: str, code: int, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.body: dict[str, Any] = {"message": message, "code": code, **extra}


def _too_long(path: list[str], limit: int) -> _Refused:
    errors: dict[str, Any] = {
        "_errors": [
            {"code": "BASE_TYPE_MAX_LENGTH", "message": f"Must be {limit} or fewer in length."}
        ]
    }
    for key in reversed(path):
        errors = {key: errors}
    return _Refused(400, "Invalid Form Body", 50035, errors=errors)


def _pings_everyone(content: str, allowed_mentions: dict[str, Any] | None) -> bool:
    """Whether Discord would notify @everyone/@here: by default it parses every mention;
    `allowed_mentions.parse` without "everyone" turns that off."""
    if "@everyone" not in content and "@here" not in content:
        return False
    if allowed_mentions is None:
        return True
    return "everyone" in (allowed_mentions.get("parse") or [])


class FakeDiscord(ScriptedSimulator[DiscordFailure, DiscordCall]):
    """A scriptable Discord webhook: `async with FakeDiscord() as discord: ...`.

    Point a Discord channel's `webhook_url` at `discord.webhook_url`; `threads` are the
    thread ids of the webhook's channel that `thread_id` may name.
    """

    what: ClassVar[str] = "the Discord fake"

    def __init__(
        self,
        *,
        webhook_id: str = DEFAULT_WEBHOOK_ID,
        token: str = DEFAULT_TOKEN,
        guild_id: str = DEFAULT_GUILD_ID,
        channel_id: str = DEFAULT_CHANNEL_ID,
        threads: tuple[str, ...] = (),
        name: str = "Status",
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        super().__init__(host=host, port=port)
        self.webhook_id, self.token = webhook_id, token
        self.guild_id, self.channel_id = guild_id, channel_id
        self.threads = set(threads)
        self.name = name
        self._lock = threading.Lock()
        self._messages: dict[str, DiscordMessage] = {}
        self._ids = itertools.count(1)

    # --- lifecycle -----------------------------------------------------------------

    def _app(self) -> web.Application:
        app = web.Application()
        for prefix in ("/api", "/api/v{version:[0-9]+}"):
            hook = prefix + "/webhooks/{webhook_id}/{token}"
            app.router.add_route("*", hook, self._handle)
            app.router.add_route("*", hook + "/messages/{message_id}", self._handle)
        return app

    @property
    def webhook_url(self) -> str:
        """The URL Discord shows under "Copy Webhook URL", on this fake."""
        return self.webhook_url_for()

    def webhook_url_for(self, *, webhook_id: str | None = None, token: str | None = None) -> str:
        """A webhook URL on this fake, with another id or token (for refusals)."""
        return f"{self.url}/api/webhooks/{webhook_id or self.webhook_id}/{token or self.token}"

    # --- scripting and inspection --------------------------------------------------

    def fail(self, operation: Operation, *failures: DiscordFailure) -> None:
        """Fail the next calls of `operation` ("execute", "edit", "delete", "get") in order."""
        self._failures.add(operation, *failures)

    def calls_to(self, operation: Operation) -> list[DiscordCall]:
        return [c for c in self.calls if c.operation == operation]

    @property
    def messages(self) -> list[DiscordMessage]:
        """Every message posted, in posting order, deleted ones included (`deleted`)."""
        with self._lock:
            return list(self._messages.values())

    def message(self, message_id: str) -> DiscordMessage | None:
        with self._lock:
            return self._messages.get(message_id)

    def _forget(self) -> None:
        with self._lock:
            self._messages.clear()

    # --- the API -----------------------------------------------------------------------

    @staticmethod
    def _operation(method: str, message_id: str | None) -> str:
        if message_id is None:
            return {"POST": "execute", "GET": "get"}.get(method, method.lower())
        return {"GET": "get_message", "PATCH": "edit", "DELETE": "delete"}.get(
            method, method.lower()
        )

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        message_id = request.match_info.get("message_id")
        operation = self._operation(request.method, message_id)
        body: dict[str, Any] | None = None
        if request.can_read_body:
            try:
                parsed = await request.json()
            except ValueError:
                return web.json_response({"message": "400: Bad Request", "code": 0}, status=400)
            body = parsed if isinstance(parsed, dict) else None
        call = DiscordCall(operation, dict(request.query), body, time.monotonic())
        self._calls.record(call)
        try:
            if request.match_info["webhook_id"] != self.webhook_id:
                raise _Refused(404, "Unknown Webhook", 10015)
            if request.match_info["token"] != self.token:
                raise _Refused(401, "Invalid Webhook Token", 50027)
            failure = self._failures.next(operation)
            if failure is not None:
                call.status = None if failure.drop else failure.status
                return self._failure(request, failure)
            status, answer = self._answer(operation, message_id, dict(request.query), body)
        except _Refused as refused:
            call.status = refused.status
            return web.json_response(refused.body, status=refused.status)
        call.status = status
        if answer is None:
            return web.Response(status=status)
        return web.json_response(answer, status=status)

    @staticmethod
    def _failure(request: web.Request, failure: DiscordFailure) -> web.StreamResponse:
        if failure.drop:
            return dropped(request)
        headers: dict[str, str] = {}
        body: dict[str, Any] = {}
        if failure.status == 429:
            body = {"message": failure.message or "You are being rate limited.", "global": False}
            if failure.retry_after is not None:
                body["retry_after"] = failure.retry_after
                headers["Retry-After"] = str(math.ceil(failure.retry_after))
            headers["X-RateLimit-Scope"] = "user"
        else:
            # Discord's defaults: 400 is a form error (50035), anything else code 0.
            invalid_form = failure.status == 400
            default = "Invalid Form Body" if invalid_form else f"{failure.status}: Error"
            code = failure.code if failure.code is not None else 50035 if invalid_form else 0
            body = {"message": failure.message or default, "code": code}
            if failure.errors is not None:
                body["errors"] = failure.errors
        return web.json_response(body, status=failure.status, headers=headers)

    def _answer(
        self,
        operation: str,
        message_id: str | None,
        query: dict[str, str],
        body: dict[str, Any] | None,
    ) -> tuple[int, dict[str, Any] | None]:
        thread_id = query.get("thread_id")
        if thread_id is not None and thread_id not in self.threads:
            raise _Refused(404, "Unknown Channel", 10003)
        if operation == "get":
            return 200, self._webhook_json()
        if operation == "execute":
            posted = self._execute(body or {}, thread_id)
            wait = query.get("wait", "false").lower() in ("true", "1")
            return (200, self._message_json(posted)) if wait else (204, None)
        if message_id is None or operation not in ("get_message", "edit", "delete"):
            raise _Refused(405, "405: Method Not Allowed", 0)
        with self._lock:
            message = self._messages.get(message_id)
            # A message in a thread is only found with its thread_id, as on Discord.
            if message is None or message.deleted or message.thread_id != thread_id:
                raise _Refused(404, "Unknown Message", 10008)
            if operation == "delete":
                message.deleted = True
                return 204, None
            if operation == "edit":
                self._edit(message, body or {})
            return 200, self._message_json(message)

    @staticmethod
    def _checked(content: Any, embeds: Any) -> tuple[str, list[dict[str, Any]]]:
        text = content if isinstance(content, str) else ""
        items = [e for e in embeds if isinstance(e, dict)] if isinstance(embeds, list) else []
        if not text and not items:
            raise _Refused(400, "Cannot send an empty message", 50006)
        if len(text) > MAX_CONTENT_CHARS:
            raise _too_long(["content"], MAX_CONTENT_CHARS)
        for index, embed in enumerate(items):
            if len(str(embed.get("description") or "")) > MAX_EMBED_DESCRIPTION_CHARS:
                raise _too_long(["embeds", str(index), "description"], MAX_EMBED_DESCRIPTION_CHARS)
        return text, items

    def _execute(self, body: dict[str, Any], thread_id: str | None) -> DiscordMessage:
        text, embeds = self._checked(body.get("content"), body.get("embeds"))
        username = body.get("username")
        if isinstance(username, str) and any(w in username.lower() for w in ("discord", "clyde")):
            errors = {
                "username": {
                    "_errors": [
                        {
                            "code": "USERNAME_INVALID_CONTAINS",
                            "message": 'Username cannot contain "discord"',
                        }
                    ]
                }
            }
            raise _Refused(400, "Invalid Form Body", 50035, errors=errors)
        allowed = body.get("allowed_mentions")
        allowed = allowed if isinstance(allowed, dict) else None
        with self._lock:
            message_id = str(1_300_000_000_000_000_000 + next(self._ids))
            message = DiscordMessage(
                id=message_id,
                channel_id=thread_id or self.channel_id,
                thread_id=thread_id,
                content=text,
                embeds=embeds,
                username=username if isinstance(username, str) else None,
                avatar_url=body.get("avatar_url"),
                allowed_mentions=allowed,
                mention_everyone=_pings_everyone(text, allowed),
            )
            self._messages[message_id] = message
        return message

    def _edit(self, message: DiscordMessage, body: dict[str, Any]) -> None:
        # A key absent keeps the field; null or [] clears it.
        content = body.get("content", message.content)
        embeds = body.get("embeds", message.embeds)
        text, items = self._checked(content, embeds)
        message.history.append({"content": message.content, "embeds": message.embeds})
        message.content, message.embeds = text, items
        if "allowed_mentions" in body and isinstance(body["allowed_mentions"], dict):
            message.allowed_mentions = body["allowed_mentions"]
        message.edits += 1

    def _webhook_json(self) -> dict[str, Any]:
        # The real answer includes the token too; a client must not keep or show it.
        return {
            "type": 1,
            "id": self.webhook_id,
            "name": self.name,
            "avatar": None,
            "channel_id": self.channel_id,
            "guild_id": self.guild_id,
            "application_id": None,
            "token": self.token,
        }

    def _message_json(self, message: DiscordMessage) -> dict[str, Any]:
        now = datetime.now(UTC).isoformat()
        return {
            "id": message.id,
            "type": 0,
            "content": message.content,
            "channel_id": message.channel_id,
            "author": {
                "id": self.webhook_id,
                "username": message.username or self.name,
                "avatar": None,
                "discriminator": "0000",
                "bot": True,
            },
            "attachments": [],
            "embeds": message.embeds,
            "mentions": [],
            "mention_roles": [],
            "mention_everyone": message.mention_everyone,
            "pinned": False,
            "tts": False,
            "timestamp": now,
            "edited_timestamp": now if message.edited else None,
            "flags": 0,
            "components": [],
            "webhook_id": self.webhook_id,
        }
