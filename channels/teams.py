"""Microsoft Teams: each update as an Adaptive Card, posted through a Power Automate
Workflows webhook (the Teams template "Post to a channel when a webhook request is
received").

Office 365 connectors (incoming webhooks, MessageCard) are retired; a Workflows webhook is
what Teams offers in their place. There is no SDK for it: one JSON POST on the shared
aiohttp session. Workflows answers 202 Accepted, with no body, once it has *queued* a run
of the flow — not once the card is in the channel. So a delivery is `sent`, never
`delivered`, and has no provider id (no thread, edit or delete is possible); a failure
inside the run (card refused, flow owner without access to the channel) shows only in the
flow's run history. That is why the card's size is checked here before posting.

Text: Adaptive Card TextBlocks read a Markdown subset (**bold**, _italic_, lists,
[links](url)); Teams renders no HTML in cards and makes no mention without
`msteams.entities`, which this adapter never sends. Nothing is backslash-escaped: Teams
clients disagree on escapes (Android and iOS show the backslash). Two things are changed:
the chat template's `*heading line*` (Slack's bold) becomes a bold TextBlock, and a masked
link `[text](url)` becomes `text (url)` so a reader always sees where a link goes — the
chat templates never write one (Slack would show it literally), so any comes from a field.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlsplit

from pydantic import Field

from broadcaster.models import (
    Capabilities,
    ChannelFamily,
    ChannelLimits,
    ChannelRender,
    RateLimit,
    Receipt,
)
from broadcaster.text import heading_words
from channels.base import (
    ChannelBrokenError,
    ChannelConfig,
    DeliveryError,
    HttpChannel,
    Message,
    PermanentError,
    SecretRef,
    classify_http_status,
)

__all__ = [
    "TeamsChannel",
    "TeamsConfig",
    "adaptive_card",
    "teams_message",
    "webhook_url_problem",
]

CARD_CONTENT_TYPE = "application/vnd.microsoft.card.adaptive"
CARD_SCHEMA = "http://adaptivecards.io/schemas/adaptive-card.json"
# Version 1.4: what Teams renders on desktop, web and mobile alike.
CARD_VERSION = "1.4"
# Teams refuses a message over about 28 KB (the card's JSON plus Teams' own envelope). A
# card refused there is refused *after* Workflows answered 202, where nobody sees it; the
# adapter refuses it first, keeping 4 KB of the 28 for the envelope.
MAX_MESSAGE_BYTES = 24 * 1024
# Where the text fits: 4,000 characters cost at most 16 KB as UTF-8 JSON (4 bytes for an
# emoji, 3 for most other non-Latin characters, 1-2 for Latin ones), which leaves 8 KB of
# the 24 for the heading, the facts, the per-line TextBlocks around the text and the link.
MAX_TEXT_CHARS = 4000

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
RETIRED_CONNECTOR_HOSTS = ("webhook.office.com", "outlook.office.com", "outlook.office365.com")

_MASKED_LINK = re.compile(r"\[([^\]\n]*)\]\(([^()\s]+)\)")


class TeamsConfig(ChannelConfig):
    webhook_url: SecretRef = Field(
        description="the flow's HTTP URL from Teams Workflows; it carries a signature (sig=), "
        "so it is a secret: from env or file"
    )


def webhook_url_problem(url: str) -> str | None:
    """What is wrong with a Workflows webhook URL, in words that never quote it; None if
    it has the shape Teams gives (…/workflows/<id>/triggers/manual/paths/invoke?…&sig=…)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
    except ValueError:
        return "the webhook URL is not a URL"
    if any(host == h or host.endswith("." + h) for h in RETIRED_CONNECTOR_HOSTS):
        return (
            "the webhook URL is an Office 365 connector's, and connectors are retired — in "
            "Teams, create a Workflows webhook (channel → ⋯ → Workflows → "
            '"Post to a channel when a webhook request is received") and use its URL'
        )
    if parts.scheme != "https" and not (parts.scheme == "http" and host in LOOPBACK_HOSTS):
        return "the webhook URL must start with https://"
    if not host:
        return "the webhook URL has no host"
    if "/workflows/" not in parts.path or not parts.path.endswith("/paths/invoke"):
        return (
            "the webhook URL is not a Workflows trigger URL "
            "(…/workflows/<id>/triggers/manual/paths/invoke?…&sig=…)"
        )
    query = parse_qs(parts.query)
    if not query.get("api-version"):
        return "the webhook URL has no api-version= — copy the whole URL from the flow"
    if not query.get("sig"):
        return (
            "the webhook URL has no signature (sig=) — in the flow's trigger, let "
            '"Anyone" trigger it, then copy its URL again'
        )
    return None


def _plain_link_targets(text: str) -> str:
    return _MASKED_LINK.sub(lambda m: f"{m[1]} ({m[2]})" if m[1] else m[2], text)


def _text_blocks(text: str) -> list[dict[str, Any]]:
    """A TextBlock per line: a single newline inside a TextBlock is not a line break on
    every Teams client. Lines of a paragraph sit close; a blank line opens a new one."""
    blocks: list[dict[str, Any]] = []
    new_paragraph = False
    for line in text.split("\n"):
        if not line.strip():
            new_paragraph = True
            continue
        block: dict[str, Any] = {"type": "TextBlock", "text": "", "wrap": True}
        heading = heading_words(line)
        if heading:
            block["text"] = _plain_link_targets(heading)
            block["weight"] = "Bolder"
        else:
            block["text"] = _plain_link_targets(line)
        if blocks and not new_paragraph:
            block["spacing"] = "None"
        blocks.append(block)
        new_paragraph = False
    return blocks


def _when(value: str) -> str:
    # Adaptive Cards' {{DATE()}}/{{TIME()}} localize only in TextBlocks, not in facts.
    when = datetime.fromisoformat(value)
    return when.strftime("%Y-%m-%d %H:%M %Z").strip()


def _fact_set(render: ChannelRender, language: str) -> dict[str, Any] | None:
    """Status, impact, components, ETA and next update, as Slack shows them in its
    fields."""
    rows = []
    for key, heading, value in render.fact_rows(language):
        if key == "components":
            shown = ", ".join(f"{name}: {state}" for name, state in value.items())
        elif key == "next_update":
            shown = _when(str(value))
        else:
            shown = str(value)
        rows.append({"title": heading, "value": _plain_link_targets(shown)})
    return {"type": "FactSet", "facts": rows} if rows else None


def _status_page_action(facts: Mapping[str, Any], language: str) -> dict[str, Any] | None:
    """A button to the status page when one is configured."""
    url = str(facts.get("status_page_url") or "")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    headings = (facts.get("labels", {}).get(language) or {}).get("headings", {})
    title = headings.get("status_page") or parts.hostname  # labels from before 0.1: none
    return {"type": "Action.OpenUrl", "title": title, "url": url}


def adaptive_card(render: ChannelRender) -> dict[str, Any]:
    """The Adaptive Card of one update: the title as a heading, the rendered chat text a
    TextBlock per line (every language when they are joined), the facts, and a button to
    the status page."""
    body: list[dict[str, Any]] = []
    title = str(render.facts.get("title") or "").strip()
    if title:
        body.append(
            {
                "type": "TextBlock",
                "text": _plain_link_targets(title),
                "weight": "Bolder",
                "size": "Large",
                "wrap": True,
            }
        )
    for index, variant in enumerate(render.variants if render.joined else render.variants[:1]):
        blocks = _text_blocks(variant.text)
        if index and blocks:
            blocks[0] = {**blocks[0], "separator": True, "spacing": "Medium"}
        body.extend(blocks)
    language = render.variants[0].language if render.variants else "en"
    facts = _fact_set(render, language)
    if facts:
        body.append(facts)
    card: dict[str, Any] = {
        "$schema": CARD_SCHEMA,
        "type": "AdaptiveCard",
        "version": CARD_VERSION,
        "body": body,
    }
    action = _status_page_action(render.facts, language)
    if action:
        card["actions"] = [action]
    return card


def teams_message(render: ChannelRender) -> dict[str, Any]:
    """What the Workflows template's trigger expects: a message with one card attachment."""
    return {
        "type": "message",
        "attachments": [
            {"contentType": CARD_CONTENT_TYPE, "contentUrl": None, "content": adaptive_card(render)}
        ],
    }


class TeamsChannel(HttpChannel):
    """Post each update as an Adaptive Card to a Teams channel through a Workflows webhook."""

    family: ClassVar[ChannelFamily] = ChannelFamily.CHAT
    limits: ClassVar[ChannelLimits] = ChannelLimits(max_chars=MAX_TEXT_CHARS)
    # The webhook answers 202 with no message id: nothing to thread under, edit or delete.
    capabilities: Capabilities = Capabilities()
    # Each call starts a flow run that posts as the Flow bot through Graph, which allows
    # about 4 requests a second per channel and fewer channel posts per tenant; one a
    # second with a burst of 4 keeps an incident's updates well clear of 429.
    default_rate_limit: ClassVar[RateLimit] = RateLimit(per_target_per_second=1, per_target_burst=4)
    default_concurrency: ClassVar[int] = 4
    config_model: ClassVar[type[ChannelConfig]] = TeamsConfig

    config: TeamsConfig

    def secrets(self) -> Mapping[str, SecretRef]:
        return {"webhook_url": self.config.webhook_url}

    def _webhook_url(self) -> str:
        # Read on every send: a URL copied again after a refusal is used without a restart.
        secret = self.secret(self.config.webhook_url)
        if secret is None:
            raise ChannelBrokenError(
                f"{self.name}: webhook URL not found in {self.config.webhook_url.describe()}"
            )
        url = secret.get_secret_value()
        problem = webhook_url_problem(url)
        if problem:
            raise ChannelBrokenError(f"{self.name}: {problem}")
        return url

    async def send(self, message: Message) -> Receipt:
        url = self._webhook_url()
        body = json.dumps(
            teams_message(message.render), ensure_ascii=False, separators=(",", ":")
        ).encode()
        if len(body) > MAX_MESSAGE_BYTES:
            raise PermanentError(
                f"{self.name}: card is {len(body)} bytes, Teams takes about "
                f"{MAX_MESSAGE_BYTES} — shorten the summary or list fewer components"
            )
        what = self.name  # never the URL: its sig= is the credential
        where = self.config.webhook_url.describe()

        def classify(status: int, headers: Mapping[str, str], text: str) -> DeliveryError:
            error = classify_http_status(status, headers.get("Retry-After"), what)
            if status in (401, 403):
                return ChannelBrokenError(
                    f"{error} — Workflows refused the URL's signature, or the flow is turned "
                    f"off: turn the flow on, or copy its URL again into {where}"
                )
            if status == 404:
                # The flow deleted (or its URL regenerated): every later update would fail
                # the same way, so the channel stops rather than fail them one by one.
                return ChannelBrokenError(
                    f"{error} — the flow was deleted or its URL changed: "
                    f"copy the current URL into {where}"
                )
            return error

        await self.post_json(url, body, {}, what=what, classify=classify)
        return Receipt()

    async def check_config(self) -> list[str]:
        """The secret is present and has a Workflows URL's shape. Nothing is posted: a
        test card would appear in the channel for everyone."""
        problems = await super().check_config()
        if problems:
            return problems
        secret = self.secret(self.config.webhook_url)
        problem = webhook_url_problem(secret.get_secret_value()) if secret else None
        if problem:
            problems.append(f"{self.name}: {problem} (checked without posting)")
        return problems
