"""The core side of a support bot: "what is the current state?", asked by a channel.

An inbound endpoint (the Telegram support bot) reaches the store only through the
`SupportDesk` protocol it finds in its `ChannelContext`; `StoreSupportDesk` answers it
from a `Broadcaster`. Channels never import the core, and the core never formats a reply:
it hands over facts and words in the user's language, the adapter marks them up.

`run_telegram_bot` is `broadcaster telegram-bot`: the same answers by long polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Protocol

from pydantic import BaseModel, ConfigDict

from broadcaster.errors import BroadcasterError, NotFoundError
from broadcaster.models import DeliveryState, Impact, IncidentStatus

if TYPE_CHECKING:
    from broadcaster.core import Broadcaster

__all__ = [
    "BOT_LABELS",
    "CurrentState",
    "OpenIncident",
    "StoreSupportDesk",
    "SupportDesk",
    "pick_language",
    "run_telegram_bot",
]

log = logging.getLogger("broadcaster.support")

# The `[bot]` words of `_labels/<language>.toml` (a user's folder may override each).
BOT_LABELS = ("all_clear", "unknown_command", "facts", "status_page", "more")
# A reply is one chat message (4,096 characters on Telegram): more incidents than this
# would not fit anyway; the adapter says how many it left out.
MAX_INCIDENTS = 20
# How long a delivery receipt waits for the dispatcher's record of the send it is about.
RECEIPT_WAIT_SECONDS = 30.0


class OpenIncident(BaseModel):
    """One open incident as a channel's audience was told about it, in one language."""

    model_config = ConfigDict(frozen=True)

    id: int
    title: str
    status: IncidentStatus
    impact: Impact
    status_label: str
    impact_label: str
    text: str = ""  # the latest live update, exactly as rendered for the channel
    updated_at: datetime


class CurrentState(BaseModel):
    """What a support bot answers to "/status": open incidents (newest first), the
    bot's words, and where the status page is — all in `language`."""

    model_config = ConfigDict(frozen=True)

    channel: str
    language: str
    incidents: list[OpenIncident]
    labels: dict[str, str]
    status_page_url: str | None = None


class SupportDesk(Protocol):
    """What an inbound endpoint may ask the core (lent through `ChannelContext`)."""

    async def current_state(self, channel: str, language: str | None) -> CurrentState:
        """The open incidents as told on `channel`, in the channel's language closest
        to `language` (a BCP 47 tag such as Telegram's `language_code`)."""
        ...

    def labels(self, channel: str, language: str | None) -> dict[str, str]:
        """Only the bot's words (no store read), in the same language."""
        ...

    async def record_receipt(
        self, channel: str, provider_id: str, state: DeliveryState, error: str | None
    ) -> bool:
        """A provider's delivery receipt (`delivered`, `undelivered`, `failed`): waits a
        little for the delivery's own record of the send, which the receipt can beat.
        False when no delivery of the channel has that provider id."""
        ...

    async def set_subscribed(
        self, channel: str, address: str, *, subscribed: bool, source: str
    ) -> bool:
        """Opt whoever has this address in or out of a channel (SMS STOP/START);
        False when nobody has it."""
        ...


def pick_language(wanted: str | None, available: Sequence[str]) -> str:
    """The channel language for a user's tag: exact, then by primary subtag (`fr-CA` ->
    `fr`, `fr` -> `fr-CA`), else the channel's first language."""
    if wanted:
        tag = wanted.strip().lower().replace("_", "-")
        base = tag.split("-", 1)[0]
        by_tag = {language.lower(): language for language in available}
        if tag in by_tag:
            return by_tag[tag]
        if base in by_tag:
            return by_tag[base]
        for language in available:
            if language.lower().split("-", 1)[0] == base:
                return language
    return available[0]


class StoreSupportDesk:
    """`SupportDesk` on a `Broadcaster`: read-only, from its store and template labels.

    **Decision (only what the channel was told):** an open incident is listed when one of
    its live (not cancelled or retracted) updates was published to the asking channel,
    and it is shown as that update says (its status, impact and rendered text), like the
    status page shows only what was published to it. An incident the team kept off the
    channel (an internal Slack-only one) is never revealed by the bot.
    """

    def __init__(self, broadcaster: Broadcaster) -> None:
        self.broadcaster = broadcaster

    def _language(self, channel: str, language: str | None) -> str:
        target = self.broadcaster.channels.get(channel)
        if target is None:
            raise NotFoundError(f"unknown channel '{channel}'")
        return pick_language(language, target.languages)

    def labels(self, channel: str, language: str | None) -> dict[str, str]:
        chosen = self._language(channel, language)
        return self._labels(chosen)

    async def record_receipt(
        self, channel: str, provider_id: str, state: DeliveryState, error: str | None
    ) -> bool:
        delay = 0.1
        deadline = asyncio.get_running_loop().time() + RECEIPT_WAIT_SECONDS
        while True:
            if await self.broadcaster.queue.record_receipt(channel, provider_id, state, error):
                return True
            if asyncio.get_running_loop().time() + delay > deadline:
                return False
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def set_subscribed(
        self, channel: str, address: str, *, subscribed: bool, source: str
    ) -> bool:
        return await self.broadcaster.audience.set_subscribed(
            channel, address, subscribed=subscribed, source=source
        )

    def _labels(self, language: str) -> dict[str, str]:
        library = self.broadcaster.library
        return {key: library.label(key, language, "bot") for key in BOT_LABELS}

    async def current_state(self, channel: str, language: str | None) -> CurrentState:
        b = self.broadcaster
        chosen = self._language(channel, language)
        library = b.library
        incidents: list[OpenIncident] = []
        for listed in await b.store.list_incidents(open_only=True, limit=MAX_INCIDENTS):
            incident = await b.store.get_incident(listed.id)
            told = next(
                (
                    update
                    for update in reversed(incident.updates)
                    if update.cancelled_at is None and channel in update.channels
                ),
                None,
            )
            if told is None:
                continue
            render = (await b.store.renders(told.id)).get(channel)
            incidents.append(
                OpenIncident(
                    id=incident.id,
                    title=str((render.facts.get("title") if render else None) or incident.title),
                    status=told.status,
                    impact=told.impact,
                    status_label=library.label(told.status, chosen, "status"),
                    impact_label=library.label(told.impact, chosen, "impact"),
                    text=render.text(chosen) if render is not None else "",
                    updated_at=told.created_at,
                )
            )
        return CurrentState(
            channel=channel,
            language=chosen,
            incidents=incidents,
            labels=self._labels(chosen),
            # Where `serve` runs, its live site is the status page.
            status_page_url=b.settings.status_page_url or b.settings.serve.public_url,
        )


def telegram_support_channel(broadcaster: Broadcaster, name: str | None) -> str:
    """The telegram channel whose bot answers: the named one, else the one with
    `support_bot = true` (or the only telegram channel)."""
    telegram = [n for n, c in broadcaster.channels.items() if c.config.type == "telegram"]
    if name is not None:
        if name not in telegram:
            raise BroadcasterError(
                f"'{name}' is not a telegram channel — telegram channels: "
                f"{', '.join(telegram) or 'none'}"
            )
        return name
    support = [n for n in telegram if getattr(broadcaster.channels[n].config, "support_bot", False)]
    candidates = support or telegram
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise BroadcasterError(
            'no telegram channel configured — add one with type = "telegram" and support_bot = true'
        )
    raise BroadcasterError(
        f"several telegram channels ({', '.join(candidates)}) — pick one with --channel"
    )


async def run_telegram_bot(broadcaster: Broadcaster, name: str | None) -> None:
    """`broadcaster telegram-bot`: answer users of a telegram channel's bot by long
    polling (no public URL needed) until SIGINT or SIGTERM; a refused token ends it with
    one line."""
    from broadcaster.logs import configure_logging, configured_secrets
    from channels.base import ChannelBrokenError
    from channels.telegram import TelegramChannel

    channel = broadcaster.channels[telegram_support_channel(broadcaster, name)]
    assert isinstance(channel, TelegramChannel)
    configure_logging(broadcaster.settings.serve.log_format, configured_secrets(broadcaster))
    # httpx logs every request at INFO: one line per long poll, 30 s apart, says nothing.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    bot = channel.support_bot()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        with contextlib.suppress(NotImplementedError):  # no signal handlers on Windows
            loop.add_signal_handler(sig, stop.set)
    try:
        await bot.poll(stop)
    except ChannelBrokenError as exc:
        raise BroadcasterError(str(exc)) from None
    finally:
        for sig in signals:
            with contextlib.suppress(NotImplementedError):
                loop.remove_signal_handler(sig)
    log.info("%s: stopped answering", channel.name, extra={"channel": channel.name})
