"""A fake Telegram Bot API on 127.0.0.1, for `broadcaster demo`, drills and tests.

It answers the methods the Telegram adapter calls — `getMe`, `sendMessage`,
`editMessageText`, `deleteMessage` — at `/bot<token>/<method>`, reading the
form-encoded bodies python-telegram-bot sends (nested objects such as
`reply_parameters` arrive as JSON strings) or JSON bodies. Errors have the Bot API's
shape, `{"ok": false, "error_code": 429, "description": …, "parameters": {"retry_after": N}}`:
401 for a wrong token, 400 "chat not found", 403 "bot was kicked", `migrate_to_chat_id`
for a group upgraded to a supergroup. HTML text is parsed the way Telegram does (a bare
`<` or `&` is refused) and its length checked after parsing. Every call is recorded.
"""

from __future__ import annotations

import asyncio
import html
import json
import re
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, ClassVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from broadcaster.sandbox.server import SimulatorServer

__all__ = ["BotApiCall", "BotApiFault", "FakeChat", "FakeTelegram", "TelegramPost"]

MAX_TEXT_CHARS = 4096  # "1-4096 characters after entities parsing" (sendMessage)
# Bot API "Formatting options", HTML style: the tags it accepts.
_TAGS = "b|strong|i|em|u|ins|s|strike|del|span|tg-spoiler|a|tg-emoji|code|pre|blockquote"
_TAG = re.compile(rf"</?(?:{_TAGS})(?:\s[^<>]*)?>")
_ENTITY = re.compile(r"&(?:lt|gt|amp|quot|#[0-9]+|#x[0-9a-fA-F]+);")
# Nested objects arrive as JSON strings in a form-encoded body.
_JSON_FIELDS = ("reply_parameters", "reply_markup", "entities", "link_preview_options")


class BotApiFault(BaseModel):
    """A scripted failure for one method: an error answer, after a delay."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    error_code: int = Field(default=500, ge=400, le=599)
    description: str = "Internal Server Error"
    retry_after: float | None = Field(default=None, ge=0)
    delay: float = Field(default=0.0, ge=0)
    times: int | None = Field(default=1, ge=1, description="None: every call from then on")


@dataclass
class FakeChat:
    """A chat the bot is a member of (a channel, a group or a private chat)."""

    id: int
    type: str = "channel"
    title: str | None = "Status"
    username: str | None = None
    kicked: bool = False
    migrated_to: int | None = None


@dataclass
class TelegramPost:
    """A message the bot posted, as the chat shows it now."""

    chat_id: int
    message_id: int
    html: str
    text: str
    reply_to: int | None
    date: int
    edited: bool = False


@dataclass
class BotApiCall:
    """One request: the method, its parameters (nested JSON decoded), and the answer."""

    method: str
    params: dict[str, Any]
    content_type: str
    at: float
    status: int = 200
    answer: dict[str, Any] = field(default_factory=dict)


class _ApiError(Exception):
    def __init__(self, code: int, description: str, **parameters: Any) -> None:
        super().__init__(description)
        self.code = code
        self.description = description
        self.parameters = parameters


def parse_html(text: str) -> str:
    """The plain text of a Bot API HTML message; raise the 400 Telegram would."""
    plain: list[str] = []
    position = 0
    while position < len(text):
        char = text[position]
        if char == "<":
            tag = _TAG.match(text, position)
            if tag is None:
                offset = len(text[:position].encode())
                raise _ApiError(
                    400,
                    "Bad Request: can't parse entities: Unsupported start tag at byte "
                    f"offset {offset}",
                )
            position = tag.end()
            continue
        if char == "&":
            entity = _ENTITY.match(text, position)
            if entity is None:
                offset = len(text[:position].encode())
                raise _ApiError(
                    400,
                    "Bad Request: can't parse entities: Can't find end of the entity starting "
                    f"at byte offset {offset}",
                )
            plain.append(html.unescape(entity.group()))
            position = entity.end()
            continue
        plain.append(char)
        position += 1
    return "".join(plain)


class FakeTelegram(SimulatorServer):
    """A scriptable Bot API: `async with FakeTelegram(token=…, chats=[…]) as api: …`.

    Point a channel's `base_url` at `url`. `posts` shows what each chat holds;
    `calls` every request in order.
    """

    what: ClassVar[str] = "the fake Telegram API"

    def __init__(
        self,
        *,
        token: str = "123456:TEST-token",
        chats: list[FakeChat] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        super().__init__(host=host, port=port)
        self.token = token
        self.chats: dict[int, FakeChat] = {c.id: c for c in chats or []}
        self.posts: dict[int, dict[int, TelegramPost]] = {}
        self.calls: list[BotApiCall] = []
        self._faults: dict[str, deque[list[Any]]] = {}  # method -> [fault, calls left]
        self._next_id: dict[int, int] = {}

    # --- lifecycle -----------------------------------------------------------------

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/bot{token}/{method}", self._handle)
        return app

    # --- scripting -------------------------------------------------------------------

    def add_chat(self, chat: FakeChat) -> FakeChat:
        self.chats[chat.id] = chat
        return chat

    def fail(self, method: str, fault: BotApiFault) -> None:
        """Answer the next call(s) of `method` with this error, then normally."""
        self._faults.setdefault(method, deque()).append([fault, fault.times])

    def messages(self, chat_id: int) -> list[TelegramPost]:
        return list(self.posts.get(chat_id, {}).values())

    def calls_of(self, method: str) -> list[BotApiCall]:
        return [c for c in self.calls if c.method == method]

    # --- the API -----------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        params = await self._params(request)
        call = BotApiCall(
            method=method,
            params=params,
            content_type=request.content_type,
            at=time.monotonic(),
        )
        self.calls.append(call)
        try:
            if request.match_info["token"] != self.token:
                raise _ApiError(401, "Unauthorized")
            await self._scripted(method)
            result = self._call(method, params)
            answer: dict[str, Any] = {"ok": True, "result": result}
        except _ApiError as error:
            answer = {"ok": False, "error_code": error.code, "description": error.description}
            if error.parameters:
                answer["parameters"] = error.parameters
            call.status = error.code
        call.answer = answer
        return web.json_response(answer, status=call.status)

    @staticmethod
    async def _params(request: web.Request) -> dict[str, Any]:
        if request.content_type == "application/json":
            body = await request.json()
            return dict(body) if isinstance(body, dict) else {}
        if request.method == "GET":
            params: dict[str, Any] = dict(request.query)
        else:
            params = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
        for key in _JSON_FIELDS:
            if isinstance(params.get(key), str):
                params[key] = json.loads(params[key])
        return params

    async def _scripted(self, method: str) -> None:
        queue = self._faults.get(method)
        if not queue:
            return
        step = queue[0]
        fault: BotApiFault = step[0]
        if step[1] is not None:
            step[1] -= 1
            if step[1] == 0:
                queue.popleft()
        if fault.delay:
            await asyncio.sleep(fault.delay)
        parameters = {} if fault.retry_after is None else {"retry_after": fault.retry_after}
        raise _ApiError(fault.error_code, fault.description, **parameters)

    def _call(self, method: str, params: dict[str, Any]) -> Any:
        if method == "getMe":
            bot_id = int(self.token.split(":", 1)[0])
            return {
                "id": bot_id,
                "is_bot": True,
                "first_name": "Status",
                "username": "status_test_bot",
            }
        if method == "sendMessage":
            return self._send(params)
        if method == "editMessageText":
            return self._edit(params)
        if method == "deleteMessage":
            post = self._post(params, "delete")
            del self.posts[post.chat_id][post.message_id]
            return True
        raise _ApiError(404, "Not Found")

    def _chat(self, value: Any) -> FakeChat:
        text = str(value or "")
        chat: FakeChat | None = None
        if text.startswith("@"):
            chat = next((c for c in self.chats.values() if c.username == text[1:]), None)
        elif re.fullmatch(r"-?[0-9]+", text):
            chat = self.chats.get(int(text))
        if chat is None:
            raise _ApiError(400, "Bad Request: chat not found")
        if chat.migrated_to is not None:
            raise _ApiError(
                400,
                "Bad Request: group chat was upgraded to a supergroup chat",
                migrate_to_chat_id=chat.migrated_to,
            )
        if chat.kicked:
            where = "channel chat" if chat.type == "channel" else "group chat"
            if chat.type == "private":
                raise _ApiError(403, "Forbidden: bot was blocked by the user")
            raise _ApiError(403, f"Forbidden: bot was kicked from the {where}")
        return chat

    @staticmethod
    def _text(params: dict[str, Any]) -> tuple[str, str]:
        raw = str(params.get("text", ""))
        text = parse_html(raw) if str(params.get("parse_mode", "")).upper() == "HTML" else raw
        if not text.strip():
            raise _ApiError(400, "Bad Request: message text is empty")
        if len(text) > MAX_TEXT_CHARS:
            raise _ApiError(400, "Bad Request: message is too long")
        return raw, text

    def _send(self, params: dict[str, Any]) -> dict[str, Any]:
        chat = self._chat(params.get("chat_id"))
        raw, text = self._text(params)
        reply = params.get("reply_parameters") or {}
        reply_to = int(reply["message_id"]) if reply.get("message_id") is not None else None
        chat_posts = self.posts.setdefault(chat.id, {})
        if reply_to is not None and reply_to not in chat_posts:
            if not reply.get("allow_sending_without_reply"):
                raise _ApiError(400, "Bad Request: message to be replied not found")
            reply_to = None
        message_id = self._next_id.get(chat.id, 0) + 1
        self._next_id[chat.id] = message_id
        post = TelegramPost(chat.id, message_id, raw, text, reply_to, int(time.time()))
        chat_posts[message_id] = post
        return self._message(chat, post)

    def _post(self, params: dict[str, Any], verb: str) -> TelegramPost:
        chat = self._chat(params.get("chat_id"))
        try:
            return self.posts[chat.id][int(params.get("message_id", 0))]
        except (KeyError, ValueError):
            raise _ApiError(400, f"Bad Request: message to {verb} not found") from None

    def _edit(self, params: dict[str, Any]) -> dict[str, Any]:
        post = self._post(params, "edit")
        raw, text = self._text(params)
        if raw == post.html:
            raise _ApiError(
                400,
                "Bad Request: message is not modified: specified new message content and "
                "reply markup are exactly the same as a current content and reply markup "
                "of the message",
            )
        post.html, post.text, post.edited = raw, text, True
        message = self._message(self.chats[post.chat_id], post)
        message["edit_date"] = int(time.time())
        return message

    def _message(self, chat: FakeChat, post: TelegramPost) -> dict[str, Any]:
        chat_json: dict[str, Any] = {"id": chat.id, "type": chat.type}
        if chat.title and chat.type != "private":
            chat_json["title"] = chat.title
        if chat.username:
            chat_json["username"] = chat.username
        if chat.type == "private":
            chat_json["first_name"] = chat.title or "User"
        message: dict[str, Any] = {
            "message_id": post.message_id,
            "date": post.date,
            "chat": chat_json,
            "text": post.text,
        }
        if post.reply_to is not None:
            replied = self.posts[chat.id][post.reply_to]
            message["reply_to_message"] = {
                "message_id": replied.message_id,
                "date": replied.date,
                "chat": chat_json,
                "text": replied.text,
            }
        return message
