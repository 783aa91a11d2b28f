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

from broadcaster.errors import BroadcasterError, ConfigError, NotFoundError
from broadcaster.models import (
    FAILED_STATES,
    DeliveryState,
    Impact,
    IncidentStatus,
    Subscriber,
)
from broadcaster.subscribers import mask
from broadcaster.team import team_channel_problem, tell_team

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from broadcaster.core import Broadcaster

__all__ = [
    "BOT_LABELS",
    "SMS_LABELS",
    "CurrentState",
    "OpenIncident",
    "StoreSupportDesk",
    "SupportDesk",
    "pick_language",
    "run_telegram_bot",
]

log = logging.getLogger("broadcaster.support")

# The `[bot]` words of `_labels/<language>.toml` (a user's folder may override each).
BOT_LABELS = (
    "all_clear",
    "unknown_command",
    "facts",
    "status_page",
    "more",
    # /subscribe and /unsubscribe, on a bot whose channel is a subscriber channel
    "subscribe_help",
    "subscribed",
    "subscribed_components",
    "unknown_component",
    "unsubscribed",
    "not_subscribed",
    "no_subscriptions",
)
# The `[sms]` words: what an SMS channel answers to STATUS and HELP, and how a reply
# forwarded to the team reads.
SMS_LABELS = (
    "open_one",
    "open_many",
    "help",
    "contact",
    "forwarded",
    "subscriber",
    "not_subscriber",
)
_LABEL_TABLES = {"bot": BOT_LABELS, "sms": SMS_LABELS}
# A reply is one chat message (4,096 characters on Telegram): more incidents than this
# would not fit anyway; the adapter says how many it left out.
MAX_INCIDENTS = 20
# How long a delivery receipt waits for the dispatcher's record of the send it is about.
RECEIPT_WAIT_SECONDS = 30.0
# A reply forwarded to the team is one try (not a tracked delivery): this long at most.


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

    def labels(self, channel: str, language: str | None, table: str = "bot") -> dict[str, str]:
        """Only the words (no store read), in the same language: the `[bot]` table, or
        `[sms]`."""
        ...

    def support_contact(self) -> str | None:
        """Who subscribers reach for help (`subscribers.support_contact`), if set."""
        ...

    async def language_of(self, channel: str, address: str) -> str | None:
        """The language of the subscriber with this address on a subscriber channel;
        None when nobody has it."""
        ...

    async def forward_reply(
        self, from_channel: str, sender: str, text: str, reference: str
    ) -> bool:
        """A message a person sent to a channel's number that no keyword answers: record
        it, and pass it to the team's channel (`subscribers.replies_to`). True when the
        team's channel took it. `reference`: the provider's id of the message."""
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

    def components(self) -> dict[str, str]:
        """The configured components, name -> the name shown to users (empty when none
        are configured: then any name is taken)."""
        ...

    async def subscribe(
        self,
        channel: str,
        address: str,
        *,
        language: str | None,
        components: list[str] | None,
        source: str,
    ) -> Subscriber:
        """A person subscribing themselves to a subscriber channel at this address (a
        Telegram user's /subscribe): added in the channel language closest to
        `language`, or, known already, opted in again with that language and these
        components (names from `components()`; None: all). Audited, by id.
        InvalidSubscriberError for an address or component the channel refuses."""
        ...

    async def unsubscribe(self, channel: str, address: str, *, source: str) -> bool:
        """A person opting themselves out of a subscriber channel (/unsubscribe); it
        stands until they subscribe again. Audited; False when nobody has the address."""
        ...


def _fill(label: str, **values: str) -> str:
    """A label with its `{name}`s filled (not str.format: labels are user files)."""
    for key, value in values.items():
        label = label.replace("{" + key + "}", value)
    return label


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
    """`SupportDesk` on a `Broadcaster`: answers from its store and template labels; it
    writes only consents (STOP/START, /unsubscribe), subscribers who ask themselves
    (/subscribe), receipts, and the record of forwarded replies.

    **Decision (only what the channel was told):** an open incident is listed when one of
    its live (not cancelled or retracted) updates was published to the asking channel,
    and it is shown as that update says (its status, impact and rendered text), like the
    status page shows only what was published to it. An incident the team kept off the
    channel (an internal Slack-only one) is never revealed by the bot.
    """

    def __init__(self, broadcaster: Broadcaster) -> None:
        self.broadcaster = broadcaster
        problem = self._team_channel_problem(broadcaster.settings.subscribers.replies_to)
        if problem is not None:
            raise ConfigError(problem)

    def _team_channel_problem(self, target: str | None) -> str | None:
        """Why `subscribers.replies_to` cannot take people's replies, or None."""
        if target is None:
            return None
        return team_channel_problem(self.broadcaster.channels, target, "subscribers.replies_to")

    def _language(self, channel: str, language: str | None) -> str:
        target = self.broadcaster.channels.get(channel)
        if target is None:
            raise NotFoundError(f"unknown channel '{channel}'")
        return pick_language(language, target.languages)

    def labels(self, channel: str, language: str | None, table: str = "bot") -> dict[str, str]:
        chosen = self._language(channel, language)
        return self._labels(chosen, table)

    def support_contact(self) -> str | None:
        return self.broadcaster.settings.subscribers.support_contact

    async def _subscriber(self, channel: str, address: str) -> tuple[int, str] | None:
        """(id, language) of whoever has this address on a subscriber channel."""
        from sqlalchemy import select

        from broadcaster.store.tables import SUBSCRIBERS, address_column

        kind = self.broadcaster.audience.kinds.get(channel)
        if kind is None or not address:
            return None
        column = address_column(kind)

        def read(session: Session) -> tuple[int, str] | None:
            row = session.execute(
                select(SUBSCRIBERS.c.id, SUBSCRIBERS.c.language).where(column == address)
            ).one_or_none()
            return (int(row.id), str(row.language)) if row is not None else None

        return await self.broadcaster.store.read_session(read)

    async def language_of(self, channel: str, address: str) -> str | None:
        found = await self._subscriber(channel, address)
        return found[1] if found is not None else None

    async def forward_reply(
        self, from_channel: str, sender: str, text: str, reference: str
    ) -> bool:
        """Send the reply to every target of `subscribers.replies_to` (one try each, not
        a tracked delivery), then record it in the audit trail, whatever happened.

        **Decision (what is kept, what is shown):** the audit entry `inbound.reply` keeps
        the text (the team must be able to read what was asked even when the forward
        failed) with the sender masked and their subscriber id: the full number stays in
        the subscribers table only, like everywhere else, and `subscribers export` / the
        id lead to the person. The team's channel (a third party such as Slack) sees the
        masked number and the id, never the full number."""
        b = self.broadcaster
        found = await self._subscriber(from_channel, sender)
        target = b.settings.subscribers.replies_to
        error: str | None = None
        try:
            if target is None:
                error = "subscribers.replies_to is not set"
            else:
                error = await self._send_to_team(
                    target, from_channel, sender, found, text, reference
                )
        except Exception as exc:  # never lose the record over a failed forward
            log.exception("%s: could not forward an SMS reply to %s", from_channel, target)
            error = f"{type(exc).__name__}: {exc}"
        detail = {
            "channel": from_channel,
            "from": mask(sender),
            "subscriber": found[0] if found is not None else None,
            "text": text,
            "forwarded_to": target,
            "forwarded": error is None,
        }
        if error is not None:
            detail["error"] = error
        await b.audience.rows.record(f"inbound:{from_channel}", "inbound.reply", detail)
        if error is None:
            log.info(
                "%s: reply from %s forwarded to %s",
                from_channel,
                mask(sender),
                target,
                extra={"channel": from_channel},
            )
        else:
            log.warning(
                "%s: reply from %s recorded, not forwarded: %s",
                from_channel,
                mask(sender),
                error,
                extra={"channel": from_channel},
            )
        return error is None

    async def _send_to_team(
        self,
        target: str,
        from_channel: str,
        sender: str,
        found: tuple[int, str] | None,
        text: str,
        reference: str,
    ) -> str | None:
        """One message to each target of the team's channel; why it failed, or None."""
        problem = self._team_channel_problem(target)
        if problem is not None:
            return problem
        channel = self.broadcaster.channels[target]
        words = self._labels(channel.languages[0], "sms")
        who = (
            _fill(words["subscriber"], id=str(found[0]))
            if found is not None
            else words["not_subscriber"]
        )
        body = _fill(words["forwarded"], sender=mask(sender), who=who, text=text.strip())
        return await tell_team(channel, body, kind="reply", reference=f"{from_channel}:{reference}")

    async def record_receipt(
        self, channel: str, provider_id: str, state: DeliveryState, error: str | None
    ) -> bool:
        from broadcaster.dispatch.sender import fallbacks_of

        # A late "failed"/"undelivered" re-routes to the fallback, as a failed send does.
        reroute = fallbacks_of(self.broadcaster.channels).get(channel)
        queue = self.broadcaster.queue
        delay = 0.1
        deadline = asyncio.get_running_loop().time() + RECEIPT_WAIT_SECONDS
        while True:
            if await queue.record_receipt(channel, provider_id, state, error, reroute=reroute):
                if reroute is not None and state in FAILED_STATES:
                    self.broadcaster.backend.published()  # the fallback has one to send
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

    def components(self) -> dict[str, str]:
        return dict(self.broadcaster.settings.components)

    async def subscribe(
        self,
        channel: str,
        address: str,
        *,
        language: str | None,
        components: list[str] | None,
        source: str,
    ) -> Subscriber:
        subscriber, _ = await self.broadcaster.audience.subscribe_address(
            channel,
            address,
            language=self._language(channel, language),
            components=components,
            source=source,
            actor=f"inbound:{channel}",
        )
        return subscriber

    async def unsubscribe(self, channel: str, address: str, *, source: str) -> bool:
        return await self.broadcaster.audience.set_subscribed(
            channel, address, subscribed=False, source=source, actor=f"inbound:{channel}"
        )

    def _labels(self, language: str, table: str = "bot") -> dict[str, str]:
        library = self.broadcaster.library
        keys = _LABEL_TABLES.get(table)
        if keys is None:
            raise NotFoundError(f"no label table [{table}] — known: {', '.join(_LABEL_TABLES)}")
        return {key: library.label(key, language, table) for key in keys}

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
