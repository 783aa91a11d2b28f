"""A fake of Teams' Power Automate Workflows webhooks on 127.0.0.1, for `broadcaster demo`,
drills and tests.

Each workflow has a URL shaped like the ones Teams hands out,
`/workflows/<id>/triggers/manual/paths/invoke?api-version=1&sp=…&sv=1.0&sig=<signature>`,
and answers like the trigger of the "Post to a channel when a webhook request is received"
template: 202 Accepted with an empty body; 401 for a missing or wrong `sig`; 404 for a
workflow that does not exist (deleted); errors as `{"error": {"code", "message"}}`.

Stricter than the real thing on one point: a body that is not a message with an Adaptive
Card attachment is answered 400 here, where Workflows would accept it and the flow run
would fail out of sight — so tests catch a malformed card. A card over Teams' size limit is
accepted (202) and not posted, as in Teams. Failures are scripted (429 with Retry-After,
5xx, 404, dropped connections); every call and every posted card is recorded.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import quote

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from broadcaster.sandbox.server import ScriptedSimulator, dropped, retry_after_header

__all__ = ["FakeTeamsWorkflow", "PostedCard", "WorkflowCall", "WorkflowFailure"]

CARD_CONTENT_TYPE = "application/vnd.microsoft.card.adaptive"
TEAMS_MAX_MESSAGE_BYTES = 28 * 1024  # what Teams takes in one message, envelope included
_PATH = "/workflows/{workflow}/triggers/manual/paths/invoke"
_EVERY_WORKFLOW = "*"  # one script for all calls, whatever the workflow


class WorkflowFailure(BaseModel):
    """How to fail one call: an HTTP status (with Retry-After), or no answer at all."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    status: int = Field(default=500, ge=400, le=599)
    retry_after: float | None = Field(default=None, ge=0, description="Retry-After, seconds")
    drop: bool = Field(default=False, description="close the connection without a response")
    times: int | None = Field(default=1, ge=1, description="None: every call from then on")


@dataclass
class WorkflowCall:
    """One request the fake saw, and what it answered (status None: dropped)."""

    workflow: str
    sig: str | None
    body: Any
    at: float
    status: int | None
    error: str | None = None  # the error code answered, None on 202
    posted: bool = False  # the flow run put the card in the channel


@dataclass
class PostedCard:
    """A card the flow posted to its Teams channel."""

    workflow: str
    card: dict[str, Any]
    at: float
    message: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def body(self) -> list[dict[str, Any]]:
        return list(self.card.get("body", []))

    @property
    def texts(self) -> list[str]:
        """The TextBlocks' text, in order (the heading first)."""
        return [b["text"] for b in self.body if b.get("type") == "TextBlock"]

    @property
    def facts(self) -> dict[str, str]:
        """The FactSet's rows, title -> value."""
        return {
            fact["title"]: fact["value"]
            for block in self.body
            if block.get("type") == "FactSet"
            for fact in block.get("facts", [])
        }

    @property
    def links(self) -> list[str]:
        """Where the card's Action.OpenUrl buttons go."""
        return [a["url"] for a in self.card.get("actions", []) if a.get("type") == "Action.OpenUrl"]


def card_shape_problem(body: Any) -> str | None:
    """Why a request body is not a Teams message carrying an Adaptive Card, or None."""
    if not isinstance(body, dict) or body.get("type") != "message":
        return 'the body is not {"type": "message", …}'
    attachments = body.get("attachments")
    if not isinstance(attachments, list) or not attachments:
        return "the message has no attachments"
    for attachment in attachments:
        if not isinstance(attachment, dict):
            return "an attachment is not an object"
        if attachment.get("contentType") != CARD_CONTENT_TYPE:
            return f"an attachment's contentType is not {CARD_CONTENT_TYPE}"
        content = attachment.get("content")
        if not isinstance(content, dict) or content.get("type") != "AdaptiveCard":
            return "an attachment's content is not an AdaptiveCard"
        if not isinstance(content.get("version"), str):
            return "the AdaptiveCard has no version"
        if not isinstance(content.get("body"), list):
            return "the AdaptiveCard has no body"
    return None


class FakeTeamsWorkflow(ScriptedSimulator[WorkflowFailure, WorkflowCall]):
    """Scriptable Workflows webhooks: `async with FakeTeamsWorkflow() as teams: ...`.

    `add_workflow()` creates one and returns its URL (a secret, as in Teams);
    `delete_workflow()` makes it answer 404; `fail()` scripts the next answers."""

    what: ClassVar[str] = "the Teams Workflows fake"

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(host=host, port=port)
        self._lock = threading.Lock()
        self._workflows: dict[str, str] = {}  # id -> sig
        self._cards: list[PostedCard] = []

    def _app(self) -> web.Application:
        app = web.Application(client_max_size=4 * 1024 * 1024)
        app.router.add_route("*", _PATH, self._handle)
        return app

    # --- workflows -----------------------------------------------------------------

    def add_workflow(self, workflow: str | None = None, *, sig: str | None = None) -> str:
        """Create a workflow (random id and signature unless given); return its URL."""
        workflow = workflow or secrets.token_hex(16)
        with self._lock:
            self._workflows[workflow] = sig or secrets.token_urlsafe(32)
        return self.webhook_url(workflow)

    def webhook_url(self, workflow: str, *, sig: str | None = None) -> str:
        """The URL Teams would give for `workflow` (with another `sig`, to test refusals)."""
        with self._lock:
            signature = sig if sig is not None else self._workflows.get(workflow, "")
        query = f"api-version=1&sp={quote('/triggers/manual/run', safe='')}&sv=1.0"
        return f"{self.url}{_PATH.format(workflow=workflow)}?{query}&sig={signature}"

    def delete_workflow(self, workflow: str) -> None:
        """Delete a workflow: its URL answers 404 from now on."""
        with self._lock:
            self._workflows.pop(workflow, None)

    # --- scripting and inspection --------------------------------------------------

    def fail(self, *failures: WorkflowFailure) -> None:
        """Fail the next calls, in this order (before the signature is even checked)."""
        self._failures.add(_EVERY_WORKFLOW, *failures)

    @property
    def cards(self) -> list[PostedCard]:
        """Every card posted to a channel, oldest first (a snapshot)."""
        with self._lock:
            return list(self._cards)

    async def wait_for_cards(self, count: int, timeout: float) -> list[PostedCard]:
        """Wait until `count` cards were posted."""
        deadline = time.monotonic() + timeout
        while len(self.cards) < count:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"Teams fake: fewer than {count} cards in {timeout} s")
            await asyncio.sleep(0.01)
        return self.cards

    def _forget(self) -> None:
        with self._lock:
            self._cards.clear()

    # --- the trigger ---------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        workflow = request.match_info["workflow"]
        sig = request.query.get("sig")
        raw = await request.read()
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = None
        call = WorkflowCall(workflow, sig, body, time.time(), status=202)
        self._calls.record(call)
        with self._lock:
            expected = self._workflows.get(workflow)
        failure = self._failures.next(_EVERY_WORKFLOW)
        if failure is not None:
            return self._failure(request, failure, call)
        if expected is None:
            return self._error(call, 404, "WorkflowNotFound", "The workflow does not exist.")
        if request.method != "POST":
            return self._error(call, 405, "TriggerRequestMethodNotValid", "Use POST.")
        if not request.query.get("api-version"):
            return self._error(call, 400, "MissingApiVersionParameter", "api-version is missing.")
        if not sig:
            return self._error(
                call, 401, "DirectApiAuthorizationRequired", "The request must be signed."
            )
        if not secrets.compare_digest(sig, expected):
            return self._error(
                call,
                401,
                "DirectApiInvalidAuthorizationSignature",
                "The provided signature is not valid.",
            )
        problem = "the body is not JSON" if body is None else card_shape_problem(body)
        if problem:
            return self._error(call, 400, "TriggerInputSchemaMismatch", problem)
        # The flow run: posts every card, unless the message is over Teams' limit.
        if len(raw) <= TEAMS_MAX_MESSAGE_BYTES:
            with self._lock:
                call.posted = True
                self._cards.extend(
                    PostedCard(workflow, attachment["content"], call.at, message=body)
                    for attachment in body["attachments"]
                )
        return web.Response(status=202)

    def _failure(
        self, request: web.Request, failure: WorkflowFailure, call: WorkflowCall
    ) -> web.StreamResponse:
        if failure.drop:
            call.status = None
            return dropped(request)
        headers = {}
        if failure.retry_after is not None:
            headers["Retry-After"] = retry_after_header(failure.retry_after)
        code = {429: "TooManyRequests", 404: "WorkflowNotFound"}.get(
            failure.status, "ServiceUnavailable" if failure.status >= 500 else "BadRequest"
        )
        return self._error(call, failure.status, code, "Scripted failure.", headers)

    @staticmethod
    def _error(
        call: WorkflowCall,
        status: int,
        code: str,
        message: str,
        headers: dict[str, str] | None = None,
    ) -> web.Response:
        call.status, call.error = status, code
        return web.json_response(
            {"error": {"code": code, "message": message}}, status=status, headers=headers
        )
