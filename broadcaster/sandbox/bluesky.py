"""A fake Bluesky PDS on 127.0.0.1: the XRPC endpoints the `atproto` SDK calls to post.

It implements `com.atproto.server.createSession`, `refreshSession` and `getSession`,
`app.bsky.actor.getProfile` (login fetches it), `com.atproto.repo.createRecord` and
`deleteRecord`, with one account. Access tokens are well-formed three-part JWTs with a
future `exp` (the SDK decodes them to decide when to refresh). It counts sessions,
keeps the records, and follows a script of failures per method: 429
`RateLimitExceeded` with `ratelimit-reset`, 400 `ExpiredToken`, 401
`AuthenticationRequired`, 5xx. It imports no provider SDK.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, ClassVar

from aiohttp import web

from broadcaster.sandbox.server import SimulatorServer

__all__ = ["FakePds", "PdsRecord", "XrpcFailure"]

_UNAUTHENTICATED = {"com.atproto.server.createSession", "com.atproto.server.refreshSession"}
_TID_ALPHABET = "234567abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class XrpcFailure:
    """An XRPC error answer: status, error name, message; `reset_in` adds rate-limit headers."""

    status: int
    error: str
    message: str = ""
    reset_in: float | None = None
    times: int = 1


@dataclass
class PdsRecord:
    """A record created on the fake, as the SDK sent it."""

    uri: str
    cid: str
    collection: str
    rkey: str
    value: dict[str, Any]
    at: float
    deleted: bool = False


@dataclass
class Call:
    """One XRPC request the fake saw, with what it answered."""

    method: str
    at: float
    status: int
    headers: dict[str, str] = field(default_factory=dict)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _jwt(payload: dict[str, Any]) -> str:
    header = {"typ": "at+jwt", "alg": "HS256"}
    parts = [_b64url(json.dumps(p).encode()) for p in (header, payload)]
    return ".".join([*parts, _b64url(secrets.token_bytes(32))])


def _cid(value: dict[str, Any]) -> str:
    """A CIDv1 (dag-cbor, sha2-256) in base32, computed over the JSON for stability."""
    digest = hashlib.sha256(json.dumps(value, sort_keys=True).encode()).digest()
    raw = bytes([0x01, 0x71, 0x12, 0x20]) + digest
    return "b" + base64.b32encode(raw).decode().lower().rstrip("=")


def _tid(micros: int) -> str:
    value = (micros << 10) | secrets.randbelow(1024)
    chars = []
    for _ in range(13):
        chars.append(_TID_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


class FakePds(SimulatorServer):
    """One account on a scriptable PDS: `async with FakePds(handle=..., password=...) as pds`."""

    what: ClassVar[str] = "the fake PDS"

    def __init__(
        self,
        *,
        handle: str = "status.example.com",
        password: str = "abcd-efgh-ijkl-mnop",
        access_ttl_seconds: int = 7200,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.handle = handle
        self.password = password
        self.did = "did:plc:" + hashlib.sha256(handle.encode()).hexdigest()[:24]
        self.access_ttl_seconds = access_ttl_seconds
        super().__init__(host=host, port=port)
        self.create_session_calls = 0
        self.refresh_session_calls = 0
        self.records: list[PdsRecord] = []
        self.calls: list[Call] = []
        self._access: set[str] = set()
        self._refresh: set[str] = set()
        self._scripts: dict[str, deque[XrpcFailure]] = {}
        self._last_micros = 0

    # --- lifecycle -----------------------------------------------------------------

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/xrpc/{method}", self._handle)
        return app

    # --- scripting and assertions ------------------------------------------------------

    def fail(self, method: str, *failures: XrpcFailure) -> None:
        """Answer the next calls of an XRPC method (its NSID) with these errors, in order."""
        queue = self._scripts.setdefault(method, deque())
        for failure in failures:
            queue.extend([failure] * failure.times)

    def revoke_tokens(self) -> None:
        """Forget every issued token, as after a password change."""
        self._access.clear()
        self._refresh.clear()

    @property
    def posts(self) -> list[PdsRecord]:
        """The posts that exist (created, not deleted)."""
        return [r for r in self.records if not r.deleted and r.collection == "app.bsky.feed.post"]

    def calls_of(self, method: str) -> list[Call]:
        return [c for c in self.calls if c.method == method]

    # --- XRPC ---------------------------------------------------------------------

    def _tokens(self) -> dict[str, Any]:
        now = int(time.time())
        access = _jwt(
            {
                "scope": "com.atproto.appPass",
                "sub": self.did,
                "aud": "did:web:pds.invalid",
                "iat": now,
                "exp": now + self.access_ttl_seconds,
            }
        )
        refresh = _jwt(
            {
                "scope": "com.atproto.refresh",
                "sub": self.did,
                "aud": "did:web:pds.invalid",
                "jti": secrets.token_urlsafe(16),
                "iat": now,
                "exp": now + 90 * 86400,
            }
        )
        self._access.add(access)
        self._refresh.add(refresh)
        return {
            "accessJwt": access,
            "refreshJwt": refresh,
            "handle": self.handle,
            "did": self.did,
            "active": True,
        }

    def _error(self, method: str, failure: XrpcFailure) -> web.Response:
        headers: dict[str, str] = {}
        if failure.reset_in is not None:
            reset = time.time() + failure.reset_in
            headers = {
                "ratelimit-limit": "5000",
                "ratelimit-remaining": "0",
                "ratelimit-reset": str(int(reset + 0.999)),  # whole seconds, rounded up
                "ratelimit-policy": "5000;w=3600",
            }
        self.calls.append(Call(method, time.time(), failure.status, headers))
        return web.json_response(
            {"error": failure.error, "message": failure.message or failure.error},
            status=failure.status,
            headers=headers,
        )

    def _bearer(self, request: web.Request) -> str:
        return request.headers.get("Authorization", "").removeprefix("Bearer ").strip()

    async def _handle(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        script = self._scripts.get(method)
        if script:
            return self._error(method, script.popleft())
        body: dict[str, Any] = {}
        if request.method == "POST" and request.can_read_body:
            body = await request.json()
        handler = {
            "com.atproto.server.createSession": self._create_session,
            "com.atproto.server.refreshSession": self._refresh_session,
            "com.atproto.server.getSession": self._get_session,
            "app.bsky.actor.getProfile": self._get_profile,
            "com.atproto.repo.createRecord": self._create_record,
            "com.atproto.repo.deleteRecord": self._delete_record,
        }.get(method)
        if handler is None:
            return self._error(method, XrpcFailure(501, "MethodNotImplemented"))
        if method not in _UNAUTHENTICATED and self._bearer(request) not in self._access:
            return self._error(method, XrpcFailure(401, "AuthenticationRequired", "Invalid token"))
        answer = handler(request, body)
        if isinstance(answer, XrpcFailure):
            return self._error(method, answer)
        self.calls.append(Call(method, time.time(), 200))
        return web.json_response(answer)

    def _create_session(self, _request: web.Request, body: dict[str, Any]) -> Any:
        self.create_session_calls += 1
        identifier = str(body.get("identifier", "")).lower()
        if identifier not in (self.handle.lower(), self.did) or body.get("password") != (
            self.password
        ):
            return XrpcFailure(401, "AuthenticationRequired", "Invalid identifier or password")
        return self._tokens()

    def _refresh_session(self, request: web.Request, _body: dict[str, Any]) -> Any:
        self.refresh_session_calls += 1
        token = self._bearer(request)
        if token not in self._refresh:
            return XrpcFailure(400, "ExpiredToken", "Token has been revoked")
        self._refresh.discard(token)  # refresh tokens are single-use
        return self._tokens()

    def _get_session(self, _request: web.Request, _body: dict[str, Any]) -> Any:
        return {"handle": self.handle, "did": self.did, "active": True}

    def _get_profile(self, request: web.Request, _body: dict[str, Any]) -> Any:
        actor = request.query.get("actor", "")
        if actor.lower() not in (self.handle.lower(), self.did):
            return XrpcFailure(400, "InvalidRequest", "Profile not found")
        return {"did": self.did, "handle": self.handle, "displayName": "Status"}

    def _create_record(self, _request: web.Request, body: dict[str, Any]) -> Any:
        if body.get("repo") not in (self.did, self.handle):
            return XrpcFailure(400, "InvalidRequest", "Could not find repo")
        record = body.get("record")
        collection = str(body.get("collection", ""))
        if not isinstance(record, dict) or record.get("$type") != collection:
            return XrpcFailure(400, "InvalidRequest", "Invalid record")
        # TIDs must increase even when two posts share a microsecond.
        self._last_micros = max(self._last_micros + 1, int(time.time() * 1_000_000))
        rkey = str(body.get("rkey") or _tid(self._last_micros))
        cid = _cid(record)
        uri = f"at://{self.did}/{collection}/{rkey}"
        self.records.append(PdsRecord(uri, cid, collection, rkey, record, time.time()))
        return {
            "uri": uri,
            "cid": cid,
            "commit": {"cid": _cid({"commit": uri}), "rev": _tid(self._last_micros)},
            "validationStatus": "valid",
        }

    def _delete_record(self, _request: web.Request, body: dict[str, Any]) -> Any:
        uri = f"at://{body.get('repo')}/{body.get('collection')}/{body.get('rkey')}"
        for record in self.records:
            if record.uri == uri:
                record.deleted = True
        return {"commit": {"cid": _cid({"delete": uri}), "rev": _tid(int(time.time() * 1e6))}}
