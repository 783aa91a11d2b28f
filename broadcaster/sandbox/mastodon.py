"""A fake Mastodon instance on 127.0.0.1: the REST endpoints Mastodon.py calls to post.

It answers `POST /api/v1/statuses` (form-encoded, as Mastodon.py sends it, or JSON; an
`Idempotency-Key` already seen returns the status it created, as Mastodon does for an
hour), `PUT` and `DELETE /api/v1/statuses/:id`, and `GET
/api/v1/accounts/verify_credentials`, for one account. Tokens are Bearer tokens with
OAuth scopes: an unknown token gets 401 `The access token is invalid`, a token without
the scope an endpoint needs gets 403 `This action is outside the authorized scopes`
(`write:statuses` cannot read the profile, as on Mastodon). Text is validated the way
Mastodon's StatusLengthValidator counts it: grapheme clusters, each link as 23. Failures
are scripted per endpoint: 429 with `X-RateLimit-Reset`, 5xx, 422, a dropped connection,
or an answer lost after the work was done. It imports no provider SDK.
"""

from __future__ import annotations

import html
import itertools
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar

import regex
from aiohttp import web

from broadcaster.sandbox.server import ScriptedSimulator, dropped, request_params

__all__ = ["FakeMastodon", "MastodonCall", "MastodonFailure", "MastodonStatus"]

DEFAULT_TOKEN = "sandbox-mastodon-token"
# Endpoint names for `fail` and `calls_to`.
POST_STATUS = "post_status"
EDIT_STATUS = "edit_status"
DELETE_STATUS = "delete_status"
VERIFY_CREDENTIALS = "verify_credentials"

INVALID_TOKEN = "The access token is invalid"
OUT_OF_SCOPE = "This action is outside the authorized scopes"
URL_PLACEHOLDER_CHARS = 23  # StatusLengthValidator: every URL counts as 23 characters
_WRITE_STATUSES = ("write", "write:statuses")
_READ_ACCOUNT = ("read", "read:accounts", "profile")
_GRAPHEME = regex.compile(r"\X")
_URL = regex.compile(r"https?://\S+", regex.IGNORECASE)
_URL_TRAILING = ".,;:!?'\")]"  # sentence punctuation after a link is not part of it
_REASONS = {
    404: "Record not found",
    422: "Validation failed",
    429: "Too many requests",
    500: "We're sorry, but something went wrong on our end.",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


@dataclass(frozen=True)
class MastodonFailure:
    """How to fail the next call(s) of an endpoint.

    `reset_in` (429) sends `X-RateLimit-Reset` that many seconds ahead; `drop` closes the
    connection without an answer; `applied` does the work first, then fails the answer
    (a proxy's 504 after the instance posted), so only the idempotency key prevents a
    second post."""

    status: int = 500
    error: str | None = None
    reset_in: float | None = None
    drop: bool = False
    applied: bool = False
    times: int = 1


@dataclass
class MastodonStatus:
    """A status as the fake keeps it; `history` holds the texts before each edit."""

    id: str
    text: str
    visibility: str
    language: str | None
    in_reply_to_id: str | None
    idempotency_key: str | None
    url: str
    at: float
    history: list[str] = field(default_factory=list)
    edited_at: float | None = None
    deleted: bool = False

    @property
    def edited(self) -> bool:
        return bool(self.history)


@dataclass
class MastodonCall:
    """One request the fake saw; `status` None when the connection was dropped."""

    endpoint: str
    at: float
    status: int | None
    token: str | None
    params: dict[str, Any]
    idempotency_key: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


class _Refused(Exception):
    def __init__(self, status: int, error: str) -> None:
        super().__init__(error)
        self.status, self.error = status, error


def countable_length(text: str) -> int:
    """The length Mastodon checks against its limit: graphemes, each URL as 23."""
    spans = []
    for match in _URL.finditer(text):
        url = match.group().rstrip(_URL_TRAILING)
        spans.append((match.start(), match.start() + len(url)))
    outside = sum(
        1
        for grapheme in _GRAPHEME.finditer(text)
        if not any(start <= grapheme.start() < end for start, end in spans)
    )
    return outside + URL_PLACEHOLDER_CHARS * len(spans)


class FakeMastodon(ScriptedSimulator[MastodonFailure, MastodonCall]):
    """One account on a scriptable instance: `async with FakeMastodon() as mastodon`.

    `tokens` maps each accepted access token to its scopes ("write:statuses",
    "read write"); point a Mastodon channel's `base_url` at `url`."""

    what: ClassVar[str] = "the Mastodon fake"

    def __init__(
        self,
        *,
        tokens: Mapping[str, str] | None = None,
        username: str = "status",
        max_characters: int = 500,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        super().__init__(host=host, port=port)
        self.tokens = {
            t: set(s.split()) for t, s in (tokens or {DEFAULT_TOKEN: "read write"}).items()
        }
        self.username = username
        self.max_characters = max_characters
        self.statuses: list[MastodonStatus] = []
        self._by_key: dict[str, MastodonStatus] = {}
        self._sequence = itertools.count(1)

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/api/v1/statuses", self._post_status)
        app.router.add_put("/api/v1/statuses/{id}", self._edit_status)
        app.router.add_delete("/api/v1/statuses/{id}", self._delete_status)
        app.router.add_get("/api/v1/accounts/verify_credentials", self._verify_credentials)
        return app

    # --- scripting and inspection --------------------------------------------------

    def fail(self, endpoint: str, *failures: MastodonFailure) -> None:
        """Fail the next calls of an endpoint (`post_status`, `edit_status`,
        `delete_status`, `verify_credentials`) with these failures, in order."""
        self._failures.add(endpoint, *failures)

    def _forget(self) -> None:
        self.statuses.clear()
        self._by_key.clear()

    @property
    def posts(self) -> list[MastodonStatus]:
        """The statuses that exist (posted, not deleted), oldest first."""
        return [s for s in self.statuses if not s.deleted]

    def status(self, status_id: str) -> MastodonStatus | None:
        return next((s for s in self.statuses if s.id == status_id), None)

    def calls_to(self, endpoint: str) -> list[MastodonCall]:
        return [c for c in self.calls if c.endpoint == endpoint]

    # --- the REST API --------------------------------------------------------------

    async def _post_status(self, request: web.Request) -> web.StreamResponse:
        async def create(params: dict[str, Any]) -> dict[str, Any]:
            key = request.headers.get("Idempotency-Key")
            if key and key in self._by_key:
                return self._entity(self._by_key[key])
            text = self._valid_text(params.get("status"))
            reply_to = params.get("in_reply_to_id") or None
            if reply_to is not None and self._existing(str(reply_to)) is None:
                raise _Refused(404, "Record not found")
            visibility = str(params.get("visibility") or "public")
            if visibility not in ("public", "unlisted", "private", "direct"):
                raise _Refused(422, "Validation failed: Visibility is not included in the list")
            # Mastodon ids are snowflakes: milliseconds << 16, plus a sequence.
            status_id = str((int(time.time() * 1000) << 16) + next(self._sequence))
            status = MastodonStatus(
                id=status_id,
                text=text,
                visibility=visibility,
                language=params.get("language") or None,
                in_reply_to_id=str(reply_to) if reply_to is not None else None,
                idempotency_key=key,
                url=f"{self.url}/@{self.username}/{status_id}",
                at=time.time(),
            )
            self.statuses.append(status)
            if key:
                self._by_key[key] = status
            return self._entity(status)

        return await self._handle(request, POST_STATUS, _WRITE_STATUSES, create)

    async def _edit_status(self, request: web.Request) -> web.StreamResponse:
        async def edit(params: dict[str, Any]) -> dict[str, Any]:
            status = self._own(request.match_info["id"])
            text = self._valid_text(params.get("status"))
            status.history.append(status.text)
            status.text, status.edited_at = text, time.time()
            return self._entity(status)

        return await self._handle(request, EDIT_STATUS, _WRITE_STATUSES, edit)

    async def _delete_status(self, request: web.Request) -> web.StreamResponse:
        async def delete(_params: dict[str, Any]) -> dict[str, Any]:
            status = self._own(request.match_info["id"])
            status.deleted = True
            return {**self._entity(status), "text": status.text}  # for delete-and-redraft

        return await self._handle(request, DELETE_STATUS, _WRITE_STATUSES, delete)

    async def _verify_credentials(self, request: web.Request) -> web.StreamResponse:
        async def verify(_params: dict[str, Any]) -> dict[str, Any]:
            source = {"privacy": "public", "sensitive": False, "language": "", "note": ""}
            return {**self._account(), "source": source}

        return await self._handle(request, VERIFY_CREDENTIALS, _READ_ACCOUNT, verify)

    async def _handle(
        self,
        request: web.Request,
        endpoint: str,
        scopes: tuple[str, ...],
        work: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]],
    ) -> web.StreamResponse:
        """Record the call, follow the script, check the token and its scopes, then work."""
        params = await request_params(request)
        auth = request.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else None
        call = MastodonCall(
            endpoint,
            time.time(),
            200,
            token,
            params,
            idempotency_key=request.headers.get("Idempotency-Key"),
        )
        self._calls.record(call)
        failure = self._failures.next(endpoint)
        answer: dict[str, Any] | None = None
        try:
            if failure is None or failure.applied:
                if token is None or token not in self.tokens:
                    raise _Refused(401, INVALID_TOKEN)
                if not self.tokens[token] & set(scopes):
                    raise _Refused(403, OUT_OF_SCOPE)
                answer = await work(params)
        except _Refused as refused:
            if failure is None:
                call.status = refused.status
                return web.json_response({"error": refused.error}, status=refused.status)
        if failure is None:
            return web.json_response(answer)
        return self._failure(request, failure, call)

    def _failure(
        self, request: web.Request, failure: MastodonFailure, call: MastodonCall
    ) -> web.StreamResponse:
        if failure.drop:
            call.status = None
            return dropped(request)
        call.status = failure.status
        headers: dict[str, str] = {}
        if failure.reset_in is not None:
            # Mastodon sends the reset as an ISO 8601 time (Rack::Attack throttle headers).
            reset = datetime.fromtimestamp(time.time() + failure.reset_in, UTC)
            headers = {
                "X-RateLimit-Limit": "300",
                "X-RateLimit-Remaining": "0",
                "X-RateLimit-Reset": reset.isoformat(timespec="microseconds").replace(
                    "+00:00", "Z"
                ),
            }
            call.headers = headers
        error = failure.error or _REASONS.get(failure.status, "Error")
        return web.json_response({"error": error}, status=failure.status, headers=headers)

    def _valid_text(self, value: Any) -> str:
        text = str(value or "")
        if not text.strip():
            raise _Refused(422, "Validation failed: Text can't be blank")
        if countable_length(text) > self.max_characters:
            raise _Refused(
                422, f"Validation failed: Text character limit of {self.max_characters} exceeded"
            )
        return text

    def _existing(self, status_id: str) -> MastodonStatus | None:
        status = self.status(status_id)
        return status if status is not None and not status.deleted else None

    def _own(self, status_id: str) -> MastodonStatus:
        status = self._existing(status_id)
        if status is None:
            raise _Refused(404, "Record not found")
        return status

    def _account(self) -> dict[str, Any]:
        return {
            "id": "1",
            "username": self.username,
            "acct": self.username,
            "display_name": "Status",
            "locked": False,
            "bot": True,
            "created_at": "2024-01-01T00:00:00.000Z",
            "note": "",
            "url": f"{self.url}/@{self.username}",
            "avatar": f"{self.url}/avatars/original/missing.png",
            "followers_count": 0,
            "following_count": 0,
            "statuses_count": len(self.posts),
            "fields": [],
            "emojis": [],
        }

    def _entity(self, status: MastodonStatus) -> dict[str, Any]:
        """The Status entity of Mastodon's REST API."""
        paragraphs = status.text.split("\n\n")
        content = "".join(
            "<p>" + html.escape(p, quote=False).replace("\n", "<br />") + "</p>" for p in paragraphs
        )

        def iso(at: float | None) -> str | None:
            if at is None:
                return None
            return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"

        return {
            "id": status.id,
            "uri": f"{self.url}/users/{self.username}/statuses/{status.id}",
            "url": status.url,
            "created_at": iso(status.at),
            "edited_at": iso(status.edited_at),
            "account": self._account(),
            "content": content,
            "visibility": status.visibility,
            "sensitive": False,
            "spoiler_text": "",
            "language": status.language,
            "in_reply_to_id": status.in_reply_to_id,
            "in_reply_to_account_id": "1" if status.in_reply_to_id else None,
            "media_attachments": [],
            "mentions": [],
            "tags": [],
            "emojis": [],
            "reblogs_count": 0,
            "favourites_count": 0,
            "replies_count": 0,
            "reblog": None,
            "poll": None,
            "card": None,
        }
