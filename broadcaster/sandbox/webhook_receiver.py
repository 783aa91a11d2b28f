"""A webhook receiver on 127.0.0.1 that answers the way a scripted provider would.

`broadcaster demo`, drills and tests point webhook channels at it. It records every
request, verifies Standard Webhooks signatures when given the secret, and follows a
script per target: answer 429 with Retry-After, 5xx, 410, a redirect, answer slowly, or
drop the connection without answering. It serves https when given an SSL context (a
test's certificate). A test in another process (or the CLI) drives it over HTTP through
`/_sim/*`.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from standardwebhooks import Webhook

from broadcaster.sandbox.server import (
    CallLog,
    FailureScript,
    SimulatorServer,
    dropped,
    retry_after_header,
)

__all__ = ["Behaviour", "Received", "WebhookReceiver"]

HOOK_PREFIX = "/hook/"
CONTROL_PREFIX = "/_sim/"


@dataclass
class Received:
    """One request the receiver saw (header names lower-cased), and what it answered."""

    path: str
    webhook_id: str | None
    body: dict[str, Any] | None
    at: float
    signature_valid: bool | None
    headers: dict[str, str]
    status: int | None = None  # the HTTP status answered; None: the connection was dropped
    raw: bytes = field(default=b"", repr=False)

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict (the raw body as text)."""
        data = asdict(self)
        data["raw"] = self.raw.decode("utf-8", errors="replace")
        return data


class Behaviour(BaseModel):
    """How to answer: a status (with Retry-After), after a delay, or no answer at all."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    status: int = Field(default=200, ge=100, le=599)
    retry_after: float | None = Field(
        default=None, ge=0, description="seconds, sent as the Retry-After header"
    )
    delay: float = Field(default=0.0, ge=0, description="seconds to wait before answering")
    drop: bool = Field(default=False, description="close the connection without a response")
    location: str | None = Field(
        default=None, description="sent as the Location header (with a 3xx: a redirect)"
    )
    times: int | None = Field(
        default=None,
        ge=1,
        description="how many requests it applies to before the next one in the script; "
        "None: every request from then on",
    )


def _target_path(path_or_name: str) -> str:
    return path_or_name if path_or_name.startswith("/") else HOOK_PREFIX + path_or_name


class WebhookReceiver(SimulatorServer):
    """A scriptable webhook endpoint: `async with WebhookReceiver() as hooks: ...`.

    Every path except `/_sim/*` is a target; `target("status")` is `{url}/hook/status`.
    Requests answered 2xx are in `received`; every request is in `attempts`.
    """

    what: ClassVar[str] = "the webhook receiver"

    def __init__(
        self,
        *,
        secret: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(host=host, port=port, ssl_context=ssl_context)
        self._webhook = Webhook(secret) if secret else None
        # The server may run on another thread (start_in_thread): the default is
        # touched under this lock; the logs and scripts guard themselves.
        self._lock = threading.Lock()
        self._received: CallLog[Received] = CallLog()
        self._attempts: CallLog[Received] = CallLog()
        self._scripts: FailureScript[Behaviour] = FailureScript()
        self._default = Behaviour()

    # --- lifecycle -----------------------------------------------------------------

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_post(CONTROL_PREFIX + "script", self._control_script)
        app.router.add_post(CONTROL_PREFIX + "default", self._control_default)
        app.router.add_get(CONTROL_PREFIX + "received", self._control_received)
        app.router.add_get(CONTROL_PREFIX + "attempts", self._control_attempts)
        app.router.add_post(CONTROL_PREFIX + "reset", self._control_reset)
        app.router.add_route("*", CONTROL_PREFIX + "{tail:.*}", self._control_unknown)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    def target(self, name: str) -> str:
        """The URL of one named target: `{url}/hook/{name}`."""
        return f"{self.url}{HOOK_PREFIX}{name}"

    # --- scripting -----------------------------------------------------------------

    def script(self, path_or_name: str, *behaviours: Behaviour) -> None:
        """Answer the next requests to one target with these behaviours, in order.

        A behaviour with `times=n` answers n requests, then the next one takes over;
        after the last, the default applies. Replaces any script for that target.
        """
        for behaviour in behaviours[:-1]:
            if behaviour.times is None:
                raise ValueError(
                    f"{behaviour!r} has times=None (forever), so the behaviours after it "
                    "would never apply: give it times=n or put it last"
                )
        self._scripts.replace(_target_path(path_or_name), *behaviours)

    def default(self, behaviour: Behaviour) -> None:
        """How every target without a (remaining) script is answered."""
        with self._lock:
            self._default = behaviour

    def reset(self) -> None:
        """Forget every request, script and default."""
        self._received.clear()
        self._attempts.clear()
        self._scripts.clear()
        with self._lock:
            self._default = Behaviour()

    def _next_behaviour(self, path: str) -> Behaviour:
        behaviour = self._scripts.next(path)
        if behaviour is not None:
            return behaviour
        with self._lock:
            return self._default

    # --- what was received ---------------------------------------------------------

    @property
    def received(self) -> list[Received]:
        """Requests answered 2xx, oldest first (a snapshot, safe from any thread)."""
        return self._received.snapshot()

    @property
    def attempts(self) -> list[Received]:
        """Every request to a target, whatever was answered (a snapshot)."""
        return self._attempts.snapshot()

    def received_ids(self) -> list[str]:
        """The webhook-id of every request answered 2xx (those that had one)."""
        return [r.webhook_id for r in self.received if r.webhook_id is not None]

    def _timeout_message(self, count: int, timeout: float) -> str:
        statuses = [a.status for a in self.attempts]
        got = len(self._received)
        return (
            f"webhook receiver: {got} of {count} requests answered 2xx within {timeout} s "
            f"({len(statuses)} attempts, statuses answered: {statuses[-20:]})"
        )

    async def wait_for(self, count: int, timeout: float) -> list[Received]:
        """Wait until `count` requests were answered 2xx; raise TimeoutError after `timeout`.

        Polls, so it works whichever thread or loop the server runs on.
        """
        deadline = time.monotonic() + timeout
        while len(self._received) < count:
            if time.monotonic() >= deadline:
                raise TimeoutError(self._timeout_message(count, timeout))
            await asyncio.sleep(0.005)
        return self.received

    def wait_for_blocking(self, count: int, timeout: float) -> list[Received]:
        """`wait_for` for synchronous code (with the server in a thread)."""
        deadline = time.monotonic() + timeout
        while len(self._received) < count:
            if time.monotonic() >= deadline:
                raise TimeoutError(self._timeout_message(count, timeout))
            time.sleep(0.005)
        return self.received

    # --- the webhook endpoint ------------------------------------------------------

    def _verify(self, raw: bytes, headers: dict[str, str]) -> bool | None:
        if self._webhook is None:
            return None
        try:
            self._webhook.verify(raw, headers, json_parse=False)
        except Exception:
            # WebhookVerificationError, and also malformed headers (bad base64,
            # a signature without "v1,"): all mean "not signed by the secret".
            return False
        return True

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        # Lower-case names, so a test can look headers up whatever case the client sent.
        headers = {name.lower(): value for name, value in request.headers.items()}
        body: dict[str, Any] | None = None
        if raw:
            try:
                parsed = json.loads(raw)
            except ValueError:
                parsed = None
            if isinstance(parsed, dict):
                body = parsed
        path = request.path
        behaviour = self._next_behaviour(path)
        record = Received(
            path=path,
            webhook_id=headers.get("webhook-id"),
            body=body,
            at=time.time(),
            signature_valid=self._verify(raw, headers),
            headers=headers,
            status=None if behaviour.drop else behaviour.status,
            raw=raw,
        )
        self._attempts.record(record)
        if behaviour.delay:
            await asyncio.sleep(behaviour.delay)
        if record.status is not None and 200 <= record.status < 300:
            # Counted once answered, so wait_for() never runs ahead of a slow answer.
            self._received.record(record)
        if behaviour.drop:
            return dropped(request)
        response_headers = {}
        if behaviour.retry_after is not None:
            response_headers["Retry-After"] = retry_after_header(behaviour.retry_after)
        if behaviour.location is not None:
            response_headers["Location"] = behaviour.location
        if 200 <= behaviour.status < 300:
            payload: dict[str, Any] = {"ok": True}
        else:
            payload = {"ok": False, "error": f"simulated {behaviour.status}"}
        if behaviour.status in (204, 304) or behaviour.status < 200:
            return web.Response(status=behaviour.status, headers=response_headers)
        return web.json_response(payload, status=behaviour.status, headers=response_headers)

    # --- the control API -----------------------------------------------------------

    @staticmethod
    async def _json_object(request: web.Request) -> dict[str, Any]:
        try:
            data = await request.json()
        except ValueError as exc:
            raise _bad_request(f"body is not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise _bad_request("body must be a JSON object")
        return data

    async def _control_script(self, request: web.Request) -> web.Response:
        data = await self._json_object(request)
        target = data.get("target")
        if not isinstance(target, str) or not target:
            raise _bad_request('"target" (a target name or path) is required')
        try:
            behaviours = [Behaviour.model_validate(b) for b in data.get("behaviours", [])]
            self.script(target, *behaviours)
        except (ValidationError, ValueError) as exc:
            raise _bad_request(str(exc)) from exc
        return web.json_response({"ok": True, "target": _target_path(target)})

    async def _control_default(self, request: web.Request) -> web.Response:
        data = await self._json_object(request)
        try:
            self.default(Behaviour.model_validate(data))
        except ValidationError as exc:
            raise _bad_request(str(exc)) from exc
        return web.json_response({"ok": True})

    @staticmethod
    def _since(request: web.Request) -> int:
        try:
            return max(0, int(request.query.get("since", "0")))
        except ValueError as exc:
            raise _bad_request("since must be an integer") from exc

    async def _control_received(self, request: web.Request) -> web.Response:
        since = self._since(request)
        return web.json_response([r.to_json() for r in self.received[since:]])

    async def _control_attempts(self, request: web.Request) -> web.Response:
        since = self._since(request)
        return web.json_response([r.to_json() for r in self.attempts[since:]])

    async def _control_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"ok": True})

    async def _control_unknown(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "ok": False,
                "error": f"no control endpoint {request.method} {request.path}; have "
                "POST /_sim/script, POST /_sim/default, GET /_sim/received, "
                "GET /_sim/attempts, POST /_sim/reset",
            },
            status=404,
        )


def _bad_request(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(
        text=json.dumps({"ok": False, "error": message}), content_type="application/json"
    )
