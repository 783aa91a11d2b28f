"""A fake of Slack's Web API on 127.0.0.1, for slack-sdk's real client in demos and tests.

It answers the methods the Slack channel calls — `auth.test`, `chat.postMessage`,
`chat.update`, `chat.delete`, `chat.getPermalink` — the way Slack does: HTTP 200 with
`{"ok": false, "error": …}` for API errors, 429 with Retry-After for `ratelimited`. It
checks the bot token (Authorization: Bearer, or a `token` parameter), reads JSON, form
and query parameters as the SDK sends them, keeps the messages it was given, and records
every call. Failures are scripted per method (and optionally per Slack channel).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from broadcaster.sandbox.server import (
    ScriptedSimulator,
    dropped,
    request_params,
    retry_after_header,
)

__all__ = ["SlackCall", "SlackFailure", "SlackMessage", "SlackWebApi"]

API_PREFIX = "/api/"
DEFAULT_TOKEN = "xoxb-sandbox-token"


class SlackFailure(BaseModel):
    """How to fail one call: an API error, an HTTP status, or no answer at all."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    error: str | None = Field(default=None, description="Slack's error code, answered ok:false")
    status: int = Field(default=200, ge=200, le=599, description="HTTP status (429, 503…)")
    retry_after: float | None = Field(default=None, ge=0, description="Retry-After, seconds")
    channel: str | None = Field(default=None, description="only calls for this Slack channel")
    drop: bool = Field(default=False, description="close the connection without a response")
    times: int | None = Field(default=1, ge=1, description="None: every matching call")


@dataclass
class SlackCall:
    """One Web API call the fake saw, and what it answered."""

    method: str
    params: dict[str, Any]
    token: str | None
    at: float
    status: int | None
    error: str | None = None  # the `error` answered, None when ok

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None


@dataclass
class SlackMessage:
    """A message as the fake keeps it (the latest text and blocks after chat.update)."""

    channel: str
    ts: str
    text: str | None
    blocks: list[dict[str, Any]] | None
    thread_ts: str | None = None
    reply_broadcast: bool = False
    edits: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


class SlackWebApi(ScriptedSimulator[SlackFailure, SlackCall]):
    """A scriptable fake Slack Web API: `async with SlackWebApi() as slack: ...`.

    Point a Slack channel's `base_url` at `slack.api_url`; accepted tokens are `tokens`;
    `channels`, when given, are the only Slack channel ids that exist.
    """

    what: ClassVar[str] = "the Slack fake"

    def __init__(
        self,
        *,
        tokens: tuple[str, ...] = (DEFAULT_TOKEN,),
        channels: tuple[str, ...] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        super().__init__(host=host, port=port)
        self.tokens = set(tokens)
        self.channels = set(channels) if channels is not None else None
        self._lock = threading.Lock()
        self._messages: dict[tuple[str, str], SlackMessage] = {}
        self._clock = itertools.count(1)

    # --- lifecycle -----------------------------------------------------------------

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", API_PREFIX + "{method}", self._handle)
        return app

    @property
    def api_url(self) -> str:
        """What a Slack channel's `base_url` should be: `{url}/api/`."""
        return self.url + API_PREFIX

    # --- scripting and inspection --------------------------------------------------

    def fail(self, method: str, *failures: SlackFailure) -> None:
        """Fail the next calls of `method` (e.g. "chat.postMessage") in this order."""
        self._failures.add(method, *failures)

    def calls_to(self, method: str) -> list[SlackCall]:
        return [c for c in self.calls if c.method == method]

    @property
    def messages(self) -> list[SlackMessage]:
        """Messages currently posted (not deleted), in posting order."""
        with self._lock:
            return list(self._messages.values())

    def message(self, channel: str, ts: str) -> SlackMessage | None:
        with self._lock:
            return self._messages.get((channel, ts))

    async def wait_for_calls(self, method: str, count: int, timeout: float) -> list[SlackCall]:
        """Wait until `count` successful calls of `method` were answered."""
        deadline = time.monotonic() + timeout
        while len([c for c in self.calls_to(method) if c.ok]) < count:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"Slack fake: fewer than {count} ok {method} in {timeout} s")
            await asyncio.sleep(0.01)
        return self.calls_to(method)

    # --- the Web API ---------------------------------------------------------------

    def _scripted(self, method: str, channel: str | None) -> SlackFailure | None:
        return self._failures.next(method, lambda f: f.channel is None or f.channel == channel)

    @staticmethod
    async def _params(request: web.Request) -> dict[str, Any]:
        params = await request_params(request)
        # Form-encoded blocks arrive as a JSON string.
        if isinstance(params.get("blocks"), str):
            params["blocks"] = json.loads(params["blocks"])
        return params

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        method = request.match_info["method"]
        params = await self._params(request)
        auth = request.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ").strip() if auth else params.pop("token", None)
        channel = params.get("channel")
        call = SlackCall(method, params, token or None, time.time(), status=200)
        failure = self._scripted(method, channel if isinstance(channel, str) else None)
        if failure is not None:
            call.status = None if failure.drop else failure.status
            call.error = failure.error or ("ratelimited" if failure.status == 429 else None)
        self._calls.record(call)
        if failure is not None:
            return self._failure(request, failure, call)
        if not token:
            return self._error(call, "not_authed")
        if token not in self.tokens:
            return self._error(call, "invalid_auth")
        handler = {
            "auth.test": self._auth_test,
            "chat.postMessage": self._post_message,
            "chat.update": self._update,
            "chat.delete": self._delete,
            "chat.getPermalink": self._permalink,
        }.get(method)
        if handler is None:
            return self._error(call, "unknown_method")
        if method != "auth.test":
            if not isinstance(channel, str) or not channel:
                return self._error(call, "channel_not_found")
            if self.channels is not None and channel not in self.channels:
                return self._error(call, "channel_not_found")
        answer = handler(params)
        if "error" in answer:
            return self._error(call, str(answer["error"]))
        return web.json_response({"ok": True, **answer})

    def _failure(
        self, request: web.Request, failure: SlackFailure, call: SlackCall
    ) -> web.StreamResponse:
        if failure.drop:
            return dropped(request)
        headers = {}
        if failure.retry_after is not None:
            headers["Retry-After"] = retry_after_header(failure.retry_after)
        if failure.status >= 500:
            # Slack's edge answers outages with an HTML page, not the API's JSON.
            return web.Response(
                status=failure.status, text="<html>Slack is down</html>", content_type="text/html"
            )
        return web.json_response(
            {"ok": False, "error": call.error or "unknown_error"},
            status=failure.status,
            headers=headers,
        )

    @staticmethod
    def _error(call: SlackCall, error: str) -> web.Response:
        call.error = error
        return web.json_response({"ok": False, "error": error})

    def _forget(self) -> None:
        with self._lock:
            self._messages.clear()

    def _next_ts(self) -> str:
        return f"{1_700_000_000 + next(self._clock)}.000100"

    def _auth_test(self, params: dict[str, Any]) -> dict[str, Any]:
        return {
            "url": "https://sandbox.slack.com/",
            "team": "Sandbox",
            "user": "broadcaster",
            "team_id": "T0SANDBOX",
            "user_id": "U0BROADCAST",
            "bot_id": "B0BROADCAST",
        }

    def _post_message(self, params: dict[str, Any]) -> dict[str, Any]:
        text, blocks = params.get("text"), params.get("blocks")
        if not text and not blocks:
            return {"error": "no_text"}
        channel = str(params["channel"])
        thread_ts = params.get("thread_ts")
        with self._lock:
            if thread_ts and (channel, str(thread_ts)) not in self._messages:
                return {"error": "thread_not_found"}
            ts = self._next_ts()
            self._messages[(channel, ts)] = SlackMessage(
                channel=channel,
                ts=ts,
                text=text,
                blocks=blocks,
                thread_ts=str(thread_ts) if thread_ts else None,
                reply_broadcast=params.get("reply_broadcast") in (True, "true", "1", 1),
            )
        message = {"type": "message", "text": text, "ts": ts, "bot_id": "B0BROADCAST"}
        return {"channel": channel, "ts": ts, "message": message}

    def _update(self, params: dict[str, Any]) -> dict[str, Any]:
        channel, ts = str(params["channel"]), str(params.get("ts", ""))
        with self._lock:
            message = self._messages.get((channel, ts))
            if message is None:
                return {"error": "message_not_found"}
            message.history.append({"text": message.text, "blocks": message.blocks})
            message.text = params.get("text", message.text)
            message.blocks = params.get("blocks", message.blocks)
            message.edits += 1
        return {"channel": channel, "ts": ts, "text": message.text}

    def _delete(self, params: dict[str, Any]) -> dict[str, Any]:
        channel, ts = str(params["channel"]), str(params.get("ts", ""))
        with self._lock:
            if self._messages.pop((channel, ts), None) is None:
                return {"error": "message_not_found"}
        return {"channel": channel, "ts": ts}

    def _permalink(self, params: dict[str, Any]) -> dict[str, Any]:
        channel, ts = str(params["channel"]), str(params.get("message_ts", ""))
        with self._lock:
            if (channel, ts) not in self._messages:
                return {"error": "message_not_found"}
        return {
            "channel": channel,
            "permalink": f"https://sandbox.slack.com/archives/{channel}/p{ts.replace('.', '')}",
        }
