"""A fake Telegram Bot API on 127.0.0.1, for `broadcaster demo`, drills and tests.

It answers the methods the Telegram adapter calls — `getMe`, `sendMessage`,
`editMessageText`, `deleteMessage`, and for the support bot `getUpdates` (a long poll
with offset and timeout; 409 while a webhook is set), `setWebhook`, `deleteWebhook`,
`getWebhookInfo` — at `/bot<token>/<method>`, reading the
form-encoded bodies python-telegram-bot sends (nested objects such as
`reply_parameters` arrive as JSON strings) or JSON bodies. Errors have the Bot API's
shape, `{"ok": false, "error_code": 429, "description": …, "parameters": {"retry_after": N}}`:
401 for a wrong token, 400 "chat not found", 403 "bot was kicked", `migrate_to_chat_id`
for a group upgraded to a supergroup. HTML text is parsed the way Telegram does (a bare
`<` or `&` is refused) and its length checked after parsing. Every call is recorded.

Users talk to the bot through `user_says(chat_id, text, language_code=…)`, which queues
a message update: `getUpdates` returns it, or `deliver_webhook()` POSTs it to the
registered webhook with its `X-Telegram-Bot-Api-Secret-Token`, as Telegram does (a
method in the webhook's answer is run, too).
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
from urllib.parse import urlsplit

import aiohttp
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
_JSON_FIELDS = (
    "reply_parameters",
    "reply_markup",
    "entities",
    "link_preview_options",
    "allowed_updates",
)
# setWebhook's secret_token: "1-256 characters. Only characters A-Z, a-z, 0-9, _ and -".
_SECRET_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,256}")
SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"


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


def _flag(value: Any) -> bool:
    """A boolean parameter, as JSON (true) or a form field ("True", "true")."""
    return value is True or str(value).lower() == "true"


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
        # Incoming updates not yet confirmed (by a later getUpdates offset or a webhook's 2xx).
        self.updates: list[dict[str, Any]] = []
        self.webhook: dict[str, Any] | None = None  # url, secret_token, allowed_updates
        self.webhook_error: str | None = None  # the last failed push, as getWebhookInfo says
        self._next_update_id = 100_000
        self._arrived = asyncio.Event()
        self._stopping = False

    # --- lifecycle -----------------------------------------------------------------

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/bot{token}/{method}", self._handle)
        return app

    async def stop(self) -> None:
        """Answer the long polls in progress (as empty) first, then stop."""
        self._stopping = True
        self._arrived.set()
        try:
            await super().stop()
        finally:
            self._stopping = False

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

    def user_says(
        self,
        chat_id: int,
        text: str,
        language_code: str | None = "fr",
        *,
        user_id: int | None = None,
        first_name: str = "Ann",
    ) -> dict[str, Any]:
        """Queue a message to the bot from a user, in a private chat (a positive
        `chat_id`, created if new) or in a group the fake knows; returns the update."""
        chat = self.chats.get(chat_id)
        if chat is None:
            kind = "private" if chat_id > 0 else "supergroup"
            chat = self.add_chat(FakeChat(chat_id, type=kind, title=first_name))
        sender: dict[str, Any] = {
            "id": user_id if user_id is not None else (chat_id if chat_id > 0 else 777),
            "is_bot": False,
            "first_name": first_name,
        }
        if language_code is not None:
            sender["language_code"] = language_code
        message_id = self._next_id.get(chat.id, 0) + 1
        self._next_id[chat.id] = message_id
        chat_json: dict[str, Any] = {"id": chat.id, "type": chat.type}
        if chat.type == "private":
            chat_json["first_name"] = first_name
        elif chat.title:
            chat_json["title"] = chat.title
        message: dict[str, Any] = {
            "message_id": message_id,
            "from": sender,
            "chat": chat_json,
            "date": int(time.time()),
            "text": text,
        }
        if text.startswith("/"):
            command = text.split(maxsplit=1)[0]
            message["entities"] = [{"type": "bot_command", "offset": 0, "length": len(command)}]
        self._next_update_id += 1
        update = {"update_id": self._next_update_id, "message": message}
        self.updates.append(update)
        self._wake()
        return update

    def _wake(self) -> None:
        """Wake a waiting getUpdates, from the fake's own loop or another thread."""
        loop = self._thread_loop
        if loop is not None:
            loop.call_soon_threadsafe(self._arrived.set)
        else:
            self._arrived.set()

    async def deliver_webhook(self) -> list[int]:
        """POST each pending update to the webhook, in order, as Telegram does: with the
        secret token header; a 2xx confirms it (and a `method` in the answer is run),
        anything else leaves it pending. Returns the HTTP statuses."""
        if self.webhook is None:
            raise RuntimeError("no webhook is set: call setWebhook first")
        url, secret = self.webhook["url"], self.webhook.get("secret_token")
        headers = {SECRET_HEADER: secret} if secret else {}
        statuses = []
        async with aiohttp.ClientSession() as session:
            for update in list(self.updates):
                async with session.post(url, json=update, headers=headers) as response:
                    body = await response.read()
                    statuses.append(response.status)
                if response.status >= 300:
                    self.webhook_error = f"Wrong response from the webhook: {response.status}"
                    continue
                self.updates.remove(update)
                self._run_webhook_answer(body, response.content_type)
        return statuses

    def _run_webhook_answer(self, body: bytes, content_type: str) -> None:
        """Telegram runs a Bot API method given in a webhook's answer."""
        if content_type != "application/json" or not body:
            return
        try:
            params = json.loads(body)
        except ValueError:
            return
        if not isinstance(params, dict) or not isinstance(params.get("method"), str):
            return
        method = params.pop("method")
        call = BotApiCall(method, params, "webhook-answer", time.monotonic())
        self.calls.append(call)
        try:
            call.answer = {"ok": True, "result": self._call(method, params)}
        except _ApiError as error:
            call.status = error.code
            call.answer = {"ok": False, "error_code": error.code, "description": error.description}

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
            if method == "getUpdates":
                result: Any = await self._get_updates(params)
            else:
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
        if method == "setWebhook":
            return self._set_webhook(params)
        if method == "deleteWebhook":
            self.webhook = None
            if _flag(params.get("drop_pending_updates")):
                self.updates.clear()
            return True
        if method == "getWebhookInfo":
            info: dict[str, Any] = {
                "url": self.webhook["url"] if self.webhook else "",
                "has_custom_certificate": False,
                "pending_update_count": len(self.updates),
            }
            if self.webhook and self.webhook.get("allowed_updates") is not None:
                info["allowed_updates"] = self.webhook["allowed_updates"]
            if self.webhook and self.webhook_error:
                info["last_error_date"] = int(time.time())
                info["last_error_message"] = self.webhook_error
            return info
        raise _ApiError(404, "Not Found")

    def _set_webhook(self, params: dict[str, Any]) -> bool:
        url = str(params.get("url", ""))
        if not url:  # "Use an empty string to remove webhook integration"
            self.webhook = None
            return True
        parts = urlsplit(url)
        # Telegram needs HTTPS; the sandbox also takes plain HTTP to the loopback.
        if parts.scheme != "https" and not (
            parts.scheme == "http" and parts.hostname in ("127.0.0.1", "localhost", "::1")
        ):
            raise _ApiError(
                400, "Bad Request: bad webhook: An HTTPS URL must be provided for webhook"
            )
        secret = params.get("secret_token")
        if secret is not None and not _SECRET_TOKEN.fullmatch(str(secret)):
            raise _ApiError(400, "Bad Request: secret token contains unallowed characters")
        if _flag(params.get("drop_pending_updates")):
            self.updates.clear()
        self.webhook = {
            "url": url,
            "secret_token": secret,
            "allowed_updates": params.get("allowed_updates"),
        }
        self.webhook_error = None
        return True

    async def _get_updates(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        """Confirm updates below `offset`, then return the pending ones, waiting up to
        `timeout` seconds for one to arrive (a long poll)."""
        if self.webhook is not None:
            raise _ApiError(
                409,
                "Conflict: can't use getUpdates method while webhook is active; use "
                "deleteWebhook to delete the webhook first",
            )
        offset = int(params.get("offset") or 0)
        limit = int(params.get("limit") or 100)
        timeout = float(params.get("timeout") or 0)
        if offset > 0:
            self.updates = [u for u in self.updates if u["update_id"] >= offset]
        deadline = time.monotonic() + timeout
        while not self.updates and not self._stopping and (left := deadline - time.monotonic()) > 0:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except TimeoutError:
                break
        return self.updates[:limit]

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
