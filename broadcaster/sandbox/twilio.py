"""A fake of Twilio's Messages API on 127.0.0.1, for twilio-python's real client in demos
and tests.

It answers what the SMS channel calls — `POST /2010-04-01/Accounts/{sid}/Messages.json`
(form-encoded) and `GET /2010-04-01/Accounts/{sid}.json` — the way Twilio does: HTTP Basic
auth with the Account SID and Auth Token, a Message resource (`SM…`, `queued`) answered
201, errors as `{"code", "message", "more_info", "status"}`. It keeps the messages it was
given and records every call; failures are scripted per operation (and optionally per
recipient). Like Twilio, it refuses to send to a number that texted STOP.

The other direction is Twilio calling the app: `send_status_callbacks` POSTs each
message's StatusCallback and `inbound` an incoming SMS, both signed with
`X-Twilio-Signature` exactly as Twilio signs them.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any, ClassVar, NamedTuple

import aiohttp
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from broadcaster.sandbox.server import ScriptedSimulator, dropped, request_params
from broadcaster.text import measure_sms

__all__ = [
    "DEFAULT_ACCOUNT_SID",
    "DEFAULT_AUTH_TOKEN",
    "FakeTwilio",
    "TwilioCall",
    "TwilioFailure",
    "TwilioMessage",
    "WebhookAnswer",
    "twilio_signature",
]

API_VERSION = "2010-04-01"
DEFAULT_ACCOUNT_SID = "AC" + "5a" * 16
DEFAULT_AUTH_TOKEN = "sandbox-twilio-auth-token"
SIGNATURE_HEADER = "X-Twilio-Signature"
MAX_BODY_CHARS = 1600
# What Twilio's default STOP filtering acts on (see channels.sms for the same lists).
_STOP = frozenset({"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "REVOKE", "OPTOUT"})
_START = frozenset({"START", "YES", "UNSTOP"})


def twilio_signature(auth_token: str, url: str, params: Mapping[str, str]) -> str:
    """`X-Twilio-Signature` of a request Twilio makes to `url` with these form parameters."""
    from twilio.request_validator import RequestValidator

    signature: str = RequestValidator(auth_token).compute_signature(url, dict(params))
    return signature


class TwilioFailure(BaseModel):
    """How to fail one call: a Twilio error (code + HTTP status), or no answer at all."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    code: int | None = Field(default=None, description="Twilio's error code (20429, 21211…)")
    status: int = Field(default=400, ge=400, le=599, description="HTTP status")
    message: str | None = Field(default=None, description="default: a generic one")
    to: str | None = Field(default=None, description="only messages to this number")
    drop: bool = Field(default=False, description="close the connection without a response")
    times: int | None = Field(default=1, ge=1, description="None: every matching call")


@dataclass
class TwilioCall:
    """One API call the fake saw, and what it answered."""

    operation: str  # "messages.create" or "accounts.fetch"
    account_sid: str
    params: dict[str, Any]
    authorized: bool
    at: float
    status: int | None = None  # None: the connection was dropped
    code: int | None = None  # Twilio's error code, None when it succeeded

    @property
    def ok(self) -> bool:
        return self.status is not None and self.status < 300


@dataclass
class TwilioMessage:
    """A message as the fake keeps it."""

    sid: str
    account_sid: str
    to: str
    body: str
    from_: str | None
    messaging_service_sid: str | None
    validity_period: int | None
    status_callback: str | None
    status: str
    num_segments: int
    created_at: datetime
    callbacks: list[tuple[str, int]] = field(default_factory=list)  # (status, HTTP answer)


class WebhookAnswer(NamedTuple):
    """The app's answer to a request Twilio made."""

    status: int
    body: str
    content_type: str


class _ApiError(Exception):
    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class FakeTwilio(ScriptedSimulator[TwilioFailure, TwilioCall]):
    """A scriptable fake of Twilio's Messages API: `async with FakeTwilio() as twilio: ...`.

    Point an SMS channel's `base_url` at `twilio.url`. `accounts` maps each Account SID to
    its Auth Token; `numbers`, when given, are the only `From` numbers the accounts own;
    `delay` holds each message create that long (to see requests overlap:
    `max_in_flight`)."""

    what: ClassVar[str] = "the Twilio fake"

    def __init__(
        self,
        *,
        accounts: Mapping[str, str] | None = None,
        numbers: Iterable[str] | None = None,
        delay: float = 0.0,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        super().__init__(host=host, port=port)
        self.accounts = dict(accounts or {DEFAULT_ACCOUNT_SID: DEFAULT_AUTH_TOKEN})
        self.numbers = set(numbers) if numbers is not None else None
        self.delay = delay
        self.account_status = "active"
        self._lock = threading.Lock()
        self._messages: dict[str, TwilioMessage] = {}
        self._opted_out: set[str] = set()
        self._sids = itertools.count(1)
        self._in_flight = 0
        self.max_in_flight = 0

    # --- lifecycle -----------------------------------------------------------------------

    def _app(self) -> web.Application:
        app = web.Application()
        prefix = f"/{API_VERSION}/Accounts/{{sid}}"
        app.router.add_post(prefix + "/Messages.json", self._create_message)
        app.router.add_get(prefix + ".json", self._fetch_account)
        return app

    # --- scripting and inspection --------------------------------------------------------

    def fail(self, operation: str, *failures: TwilioFailure) -> None:
        """Fail the next calls of `operation` ("messages.create", "accounts.fetch")."""
        self._failures.add(operation, *failures)

    def calls_to(self, operation: str) -> list[TwilioCall]:
        return [c for c in self.calls if c.operation == operation]

    @property
    def messages(self) -> list[TwilioMessage]:
        """Every message accepted, in order."""
        with self._lock:
            return list(self._messages.values())

    def messages_to(self, number: str) -> list[TwilioMessage]:
        return [m for m in self.messages if m.to == number]

    def message(self, sid: str) -> TwilioMessage | None:
        with self._lock:
            return self._messages.get(sid)

    def opt_out(self, number: str) -> None:
        """`number` texted STOP (without the app hearing of it): sends to it now fail 21610."""
        with self._lock:
            self._opted_out.add(number)

    def opted_out(self, number: str) -> bool:
        """True while Twilio would refuse to send to `number` (it texted STOP)."""
        with self._lock:
            return number in self._opted_out

    def _forget(self) -> None:
        with self._lock:
            self._messages.clear()
            self._opted_out.clear()
        self.max_in_flight = 0

    # --- the API ---------------------------------------------------------------------------

    def _account(self, request: web.Request) -> tuple[str, bool]:
        """The account of the URL, and whether Basic auth is that account's SID + token."""
        sid = request.match_info["sid"]
        scheme, _, encoded = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "basic":
            return sid, False
        try:
            user, _, password = base64.b64decode(encoded).decode().partition(":")
        except ValueError:
            return sid, False
        return sid, user == sid and self.accounts.get(sid) == password

    @staticmethod
    def _error(status: int, code: int, message: str) -> web.Response:
        return web.json_response(
            {
                "code": code,
                "message": message,
                "more_info": f"https://www.twilio.com/docs/errors/{code}",
                "status": status,
            },
            status=status,
        )

    def _scripted(
        self, request: web.Request, call: TwilioCall, to: str | None
    ) -> web.StreamResponse | None:
        failure = self._failures.next(call.operation, lambda f: f.to is None or f.to == to)
        if failure is None:
            return None
        if failure.drop:
            self._calls.record(call)
            return dropped(request)
        code = failure.code or failure.status
        call.status, call.code = failure.status, code
        self._calls.record(call)
        return self._error(failure.status, code, failure.message or f"Scripted error {code}")

    async def _create_message(self, request: web.Request) -> web.StreamResponse:
        sid, authorized = self._account(request)
        params = await request_params(request)
        call = TwilioCall("messages.create", sid, params, authorized, time.time())
        with self._lock:
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            scripted = self._scripted(request, call, params.get("To"))
            if scripted is not None:
                return scripted
            try:
                if not authorized:
                    raise _ApiError(401, 20003, "Authenticate")
                message = self._accept(sid, params)
            except _ApiError as error:
                call.status, call.code = error.status, error.code
                self._calls.record(call)
                return self._error(error.status, error.code, error.message)
            call.status = 201
            self._calls.record(call)
            return web.json_response(self._resource(message), status=201)
        finally:
            with self._lock:
                self._in_flight -= 1

    def _accept(self, account: str, params: dict[str, Any]) -> TwilioMessage:
        """Validate a Messages create the way Twilio does, and keep the message."""
        to, body = params.get("To"), params.get("Body")
        sender, service = params.get("From"), params.get("MessagingServiceSid")
        if not to:
            raise _ApiError(400, 21604, "A 'To' phone number is required.")
        if not (to.startswith("+") and to[1:].isdigit() and 7 <= len(to) - 1 <= 15):
            raise _ApiError(400, 21211, f"The 'To' number {to} is not a valid phone number.")
        if not sender and not service:
            raise _ApiError(
                400, 21603, "A 'From' or 'MessagingServiceSid' parameter is required to send"
            )
        if sender and self.numbers is not None and sender not in self.numbers:
            raise _ApiError(
                400,
                21606,
                f"The From phone number {sender} is not a valid, SMS-capable inbound phone "
                "number or short code for your account.",
            )
        if not body:
            raise _ApiError(400, 21602, "Message body is required.")
        if len(body) > MAX_BODY_CHARS:
            raise _ApiError(
                400, 21617, "The concatenated message body exceeds the 1600 character limit."
            )
        validity = params.get("ValidityPeriod")
        if validity is not None and not (validity.isdigit() and 1 <= int(validity) <= 36000):
            raise _ApiError(400, 21624, "Invalid validity period value")
        with self._lock:
            if to in self._opted_out:
                raise _ApiError(400, 21610, "Attempt to send to unsubscribed recipient")
            message = TwilioMessage(
                sid=f"SM{next(self._sids):032x}",
                account_sid=account,
                to=to,
                body=body,
                from_=sender,
                messaging_service_sid=service,
                validity_period=int(validity) if validity is not None else None,
                status_callback=params.get("StatusCallback"),
                # With a Messaging Service and no From, Twilio answers "accepted" until it
                # has picked a sender.
                status="queued" if sender else "accepted",
                num_segments=measure_sms(body).segments,
                created_at=datetime.now(UTC),
            )
            self._messages[message.sid] = message
        return message

    @staticmethod
    def _resource(message: TwilioMessage) -> dict[str, Any]:
        created = format_datetime(message.created_at, usegmt=True)
        uri = f"/{API_VERSION}/Accounts/{message.account_sid}/Messages/{message.sid}"
        return {
            "sid": message.sid,
            "account_sid": message.account_sid,
            "api_version": API_VERSION,
            "body": message.body,
            "date_created": created,
            "date_updated": created,
            "date_sent": None,
            "direction": "outbound-api",
            "error_code": None,
            "error_message": None,
            "from": message.from_,
            "messaging_service_sid": message.messaging_service_sid,
            "num_media": "0",
            "num_segments": str(message.num_segments),
            "price": None,
            "price_unit": "USD",
            "status": message.status,
            "subresource_uris": {"media": f"{uri}/Media.json"},
            "to": message.to,
            "uri": f"{uri}.json",
        }

    async def _fetch_account(self, request: web.Request) -> web.StreamResponse:
        sid, authorized = self._account(request)
        call = TwilioCall("accounts.fetch", sid, dict(request.query), authorized, time.time())
        scripted = self._scripted(request, call, None)
        if scripted is not None:
            return scripted
        if not authorized:
            call.status, call.code = 401, 20003
            self._calls.record(call)
            return self._error(401, 20003, "Authenticate")
        call.status = 200
        self._calls.record(call)
        return web.json_response(
            {
                "sid": sid,
                "friendly_name": "Sandbox account",
                "status": self.account_status,
                "type": "Full",
                "date_created": format_datetime(datetime(2026, 1, 1, tzinfo=UTC), usegmt=True),
                "uri": f"/{API_VERSION}/Accounts/{sid}.json",
            }
        )

    # --- Twilio calling the app ----------------------------------------------------------

    async def _post_signed(
        self, url: str, params: dict[str, str], account_sid: str
    ) -> WebhookAnswer:
        signature = twilio_signature(self.accounts[account_sid], url, params)
        async with (
            aiohttp.ClientSession() as session,
            session.post(url, data=params, headers={SIGNATURE_HEADER: signature}) as response,
        ):
            text = await response.text()
            return WebhookAnswer(response.status, text, response.content_type)

    async def send_status_callbacks(
        self,
        status: str = "delivered",
        error_code: int | None = None,
        *,
        sids: Iterable[str] | None = None,
    ) -> list[int]:
        """Report `status` (sent, delivered, undelivered, failed) of each message with a
        StatusCallback (or of the given SIDs), as Twilio does: a signed form POST.
        Returns the app's HTTP statuses, in message order."""
        wanted = set(sids) if sids is not None else None
        answers = []
        for message in self.messages:
            if message.status_callback is None or (
                wanted is not None and message.sid not in wanted
            ):
                continue
            params = {
                "AccountSid": message.account_sid,
                "ApiVersion": API_VERSION,
                "MessageSid": message.sid,
                "SmsSid": message.sid,
                "MessageStatus": status,
                "SmsStatus": status,
                "To": message.to,
                "From": message.from_ or "+15550000000",
            }
            if message.messaging_service_sid:
                params["MessagingServiceSid"] = message.messaging_service_sid
            if error_code is not None:
                params["ErrorCode"] = str(error_code)
            answer = await self._post_signed(message.status_callback, params, message.account_sid)
            with self._lock:
                message.status = status
                message.callbacks.append((status, answer.status))
            answers.append(answer.status)
        return answers

    async def inbound(
        self,
        from_: str,
        body: str,
        to: str,
        *,
        url: str,
        account_sid: str | None = None,
        opt_out_type: str | None = None,
    ) -> WebhookAnswer:
        """A user texts `body` to `to`: Twilio's STOP filtering applies (an opt-out
        keyword blocks sending to them, START lifts it), then the "A message comes in"
        webhook at `url` is called, signed. `opt_out_type`: the OptOutType parameter
        Advanced Opt-Out adds (STOP, START, HELP)."""
        account = account_sid or next(iter(self.accounts))
        word = body.strip().upper()
        with self._lock:
            if word in _STOP or opt_out_type == "STOP":
                self._opted_out.add(from_)
            elif word in _START or opt_out_type == "START":
                self._opted_out.discard(from_)
        sid = f"SM{next(self._sids):032x}"
        params = {
            "AccountSid": account,
            "ApiVersion": API_VERSION,
            "Body": body,
            "From": from_,
            "To": to,
            "MessageSid": sid,
            "SmsMessageSid": sid,
            "SmsSid": sid,
            "SmsStatus": "received",
            "NumMedia": "0",
            "NumSegments": str(max(1, measure_sms(body).segments)),
        }
        if opt_out_type is not None:
            params["OptOutType"] = opt_out_type
        return await self._post_signed(url, params, account)
