"""Telegram as a support channel: the bot of a `telegram` channel answers users in
private chats. `/status` (and `/start`) get each open incident's latest update as that
channel showed it, in the user's language; on a subscriber channel (`subscribers = true`)
`/subscribe [component …]` and `/unsubscribe` change the user's subscription; anything
else gets the short help; groups and channels are ignored. By webhook inside `broadcaster
serve` (`POST /inbound/<channel>`, Telegram's secret token checked on every call) or by
long polling (`broadcaster telegram-bot`). Replies are not deliveries: they are logged,
not tracked.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import html
import json
import logging
import random
import re
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Literal, TypeVar

from channels.base import (
    ChannelBrokenError,
    DeliveryError,
    InboundEndpoint,
    InboundReply,
    InboundRequest,
    TransientError,
)
from channels.telegram import (
    MAX_MESSAGE_CHARS,
    TelegramChannel,
    telegram_html,
)

if TYPE_CHECKING:
    from telegram import Bot, Update
    from telegram.request import HTTPXRequest

    from broadcaster.support import CurrentState, SupportDesk

log = logging.getLogger(__name__)
T = TypeVar("T")


SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"
# Only messages: edits, channel posts and the rest are never sent to the bot.
ALLOWED_UPDATES = ["message"]
STATUS_COMMANDS = frozenset({"status", "start"})  # /start: what Telegram sends first
SUBSCRIBE, UNSUBSCRIBE = "subscribe", "unsubscribe"
MAX_COMPONENT_NAME, MAX_COMPONENTS = 64, 20  # what /subscribe takes when none are configured
POLL_TIMEOUT_SECONDS = 30  # getUpdates long poll ("should be positive, short polling
# should be used for testing purposes only")
REPLY_ATTEMPTS = 3
REPLY_MAX_WAIT_SECONDS = 30.0  # a reply still waiting after this is not worth sending
_RECENT_UPDATES = 1024  # update ids remembered, so a redelivered update is answered once
_BOLD_TAG = re.compile(r"</?b>")


def _fill(label: str, **values: str) -> str:
    """A `[bot]` label with its `{name}`s filled (not str.format: labels are user files)."""
    for key, value in values.items():
        label = label.replace("{" + key + "}", value)
    return label


def _escape(text: str) -> str:
    return html.escape(text, quote=False)


def _shown_length(text: str) -> int:
    """Characters of our reply HTML "after entities parsing": it holds only <b> and
    the escapes of `telegram_html`."""
    return len(html.unescape(_BOLD_TAG.sub("", text)))


def help_reply(labels: Mapping[str, str], *, subscriptions: bool = False) -> str:
    """The short help, as Bot API HTML; with `subscriptions`, /subscribe's too."""
    lines = [labels["unknown_command"]]
    if subscriptions:
        lines.append(labels["subscribe_help"])
    return _escape("\n".join(lines))


def _arguments(text: str | None) -> list[str]:
    """The words after a command: `/subscribe api, Web` -> ["api", "Web"]."""
    words = (text or "").replace(",", " ").split()
    return words[1:]


def match_components(words: Sequence[str], known: Mapping[str, str]) -> tuple[list[str], list[str]]:
    """(component names, words matching none) for what a user typed: a configured name
    or the name shown to users, in any case. With no components configured, every word
    is taken as it is (the core takes any name then)."""
    if not known:  # any name, within reason
        long = [w for w in words if len(w) > MAX_COMPONENT_NAME]
        short = [w for w in dict.fromkeys(words) if len(w) <= MAX_COMPONENT_NAME]
        return short[:MAX_COMPONENTS], long
    by_word = {name.lower(): name for name in known}
    by_word.update({shown.lower(): name for name, shown in known.items() if shown})
    names: list[str] = []
    unknown: list[str] = []
    for word in words:
        name = by_word.get(word.lower())
        if name is None:
            unknown.append(word)
        elif name not in names:
            names.append(name)
    return names, unknown


def _component_list(known: Mapping[str, str]) -> str:
    """`api (Public API), web` — what a user may type, with the name shown beside it."""
    return ", ".join(
        name if not shown or shown == name else f"{name} ({shown})" for name, shown in known.items()
    )


def status_reply(state: CurrentState) -> str:
    """`/status` as Bot API HTML: each open incident (title in bold; status and impact;
    the latest update's text as the channel showed it), or the all-clear; then the status
    page unless the text links it. Incidents that do not fit one message are counted,
    not cut (only a first one filling the message alone is shortened)."""
    from broadcaster.text import truncate

    labels = state.labels
    url = state.status_page_url
    footer = []
    # The updates' own text usually ends with the link already: not twice.
    if url and not any(url in incident.text for incident in state.incidents):
        footer.append(_escape(_fill(labels["status_page"], url=url)))
    if not state.incidents:
        return "\n\n".join([_escape(labels["all_clear"]), *footer])

    def block(title: str, facts: str, text: str) -> str:
        lines = [f"<b>{_escape(title)}</b>", _escape(facts)]
        return "\n".join([*lines, telegram_html(text)] if text else lines)

    def tail(omitted: int) -> list[str]:
        more = [_escape(_fill(labels["more"], count=str(omitted)))] if omitted else []
        return more + footer

    def fits(parts: list[str]) -> bool:
        return _shown_length("\n\n".join(parts)) <= MAX_MESSAGE_CHARS

    pieces = [
        (i.title, _fill(labels["facts"], status=i.status_label, impact=i.impact_label), i.text)
        for i in state.incidents
    ]
    blocks = [block(*piece) for piece in pieces]
    shown: list[str] = []
    for candidate in blocks:
        if not fits([*shown, candidate, *tail(len(blocks) - len(shown) - 1)]):
            break
        shown.append(candidate)
    if not shown:
        # The first update alone (up to 4,096 characters itself) fills the message.
        title, facts, text = pieces[0]
        rest = tail(len(blocks) - 1)
        budget = MAX_MESSAGE_CHARS - _shown_length("\n\n".join([block(title, facts, ""), *rest]))
        while budget > 0 and not fits([block(title, facts, truncate(text, budget)), *rest]):
            budget -= 16
        shown = [block(title, facts, truncate(text, budget) if budget > 0 else "")]
    return "\n\n".join([*shown, *tail(len(blocks) - len(shown))])


def _command(text: str | None) -> str | None:
    """`/status@acme_bot now` -> `status`; None for text that is not a command."""
    if not text or not text.startswith("/"):
        return None
    word = text[1:].split(maxsplit=1)[0] if text[1:].strip() else ""
    return word.split("@", 1)[0].lower() or None


class TelegramSupportBot(InboundEndpoint):
    """A channel's bot answering users in private chats; messages in groups and channels
    are ignored. `/status` and `/start` get the current state (`SupportDesk`) in the
    user's `language_code` (else the channel's first language); `/subscribe` and
    `/unsubscribe` change their subscription when the channel is a subscriber channel
    (else they are told none is offered); anything else the help.

    Two ways in, one way of answering: `serve` mounts it at `POST /inbound/<channel>`
    (`open` registers the webhook with `setWebhook`, `handle` takes each call), or `poll`
    long-polls `getUpdates` (`broadcaster telegram-bot`). It has its own HTTP client, so
    it lives independently of the dispatcher starting and closing the channel.

    **Decision (replies by sendMessage, after the webhook's answer):** Telegram lets a
    webhook answer carry a method call, which saves a request, but its outcome is never
    known: a blocked user or flood control would go unseen, and polling cannot use it.
    Here the webhook is answered 200 as soon as the call is authenticated and parsed, then
    the state is read and sent with `sendMessage` (`InboundReply.then`): one code path for
    both modes, failures classified like deliveries (flood control and network errors
    retried a few times, a blocked user given up), and Telegram — which redelivers an
    update whose call is slow or fails — never waits on our store or its own API.
    Replies are not deliveries: no rows, no retries after a restart.
    """

    def __init__(self, channel: TelegramChannel, desk: SupportDesk) -> None:
        self.channel = channel
        self.desk = desk
        self.name = channel.name
        self._bot: Bot | None = None
        self._request: HTTPXRequest | None = None
        self._recent: OrderedDict[int, None] = OrderedDict()
        self._replies: set[asyncio.Task[None]] = set()

    # -- the bot's HTTP client ------------------------------------------------------------

    async def _open_bot(self) -> Bot:
        if self._bot is not None:
            return self._bot
        channel = self.channel
        token = channel.secret(channel.config.token)
        if token is None:
            raise ChannelBrokenError(
                f"{self.name}: bot token not found in {channel.config.token.describe()}"
            )
        # The channel's classify() scrubs the token from Telegram's messages with it.
        bot, request = channel.new_bot(token.get_secret_value())
        await request.initialize()
        self._bot, self._request = bot, request
        return bot

    async def close(self) -> None:
        """Let replies in flight finish (briefly), then close the HTTP client."""
        if self._replies:
            _done, pending = await asyncio.wait(self._replies, timeout=5)
            for task in pending:
                task.cancel()
        if self._request is not None:
            await self._request.shutdown()
        self._bot = self._request = None

    def _webhook_secret(self) -> str | None:
        ref = self.channel.config.webhook_secret
        value = self.channel.secret(ref) if ref is not None else None
        return value.get_secret_value() if value is not None and value.get_secret_value() else None

    def _refusal(self, error: Exception, what: str) -> DeliveryError:
        return self.channel.classify(error, f"{self.name}: {what}", "")

    # -- webhook mode -------------------------------------------------------------------------

    async def open(self, url: str | None) -> None:
        """Register `url` as the bot's webhook (setWebhook with the secret token, messages
        only); without a URL or a secret, say how to get one. Never raises: `serve` runs
        on without the bot."""
        from telegram.error import TelegramError

        secret = self._webhook_secret()
        if secret is None:
            log.warning(
                "%s: support_bot is on but webhook_secret is not set — /inbound/%s refuses "
                "every call; set it, or answer by polling with `broadcaster telegram-bot "
                "--channel %s`",
                self.name,
                self.name,
                self.name,
                extra={"channel": self.name},
            )
            return
        if url is None:
            log.warning(
                "%s: serve.public_url is not set, so the support bot's webhook was not "
                "registered — set serve.public_url (https, reachable by Telegram), or call "
                "setWebhook yourself with url=<public https URL>/inbound/%s, "
                'secret_token=<webhook_secret>, allowed_updates=["message"]',
                self.name,
                self.name,
                extra={"channel": self.name},
            )
            return
        try:
            bot = await self._open_bot()
            await bot.set_webhook(url=url, secret_token=secret, allowed_updates=ALLOWED_UPDATES)
        except ChannelBrokenError as error:
            log.error("%s: webhook not registered: %s", self.name, error)
        except TelegramError as error:
            problem = self._refusal(error, f"setWebhook {url}")
            log.error("%s — the support bot will not hear users", problem)
        else:
            log.info(
                "%s: support bot webhook registered at %s",
                self.name,
                url,
                extra={"channel": self.name},
            )

    async def handle(self, request: InboundRequest) -> InboundReply:
        """One webhook call: the secret token first (401, the body unread), then the
        Update (400 if it is none); answered 200 at once, the reply sent after."""
        expected = self._webhook_secret()
        if expected is None:
            return InboundReply.refusal(404, f"{self.name}: webhook_secret is not configured")
        given = request.headers.get(SECRET_HEADER.lower())
        if given is None:
            return InboundReply.refusal(401, f"missing {SECRET_HEADER}")
        if not hmac.compare_digest(given.encode(), expected.encode()):
            return InboundReply.refusal(401, f"wrong {SECRET_HEADER}")
        try:
            data = json.loads(request.body)
        except ValueError:
            return InboundReply.refusal(400, "malformed JSON")
        update = self._update(data)
        if update is None:
            return InboundReply.refusal(400, "not a Telegram Update")

        async def reply() -> None:
            await self._answer(update, "webhook")

        return InboundReply(status=200, then=reply)

    def _update(self, data: object) -> Update | None:
        from telegram import Update

        if not isinstance(data, dict) or not isinstance(data.get("update_id"), int):
            return None
        try:
            return Update.de_json(data, self._bot)
        except (AttributeError, KeyError, TypeError, ValueError):  # what PTB raises on bad shapes
            return None

    # -- polling mode ---------------------------------------------------------------------------

    async def poll(self, stop: asyncio.Event, *, timeout: int = POLL_TIMEOUT_SECONDS) -> None:
        """Long-poll getUpdates and answer until `stop` is set (after deleteWebhook:
        Telegram refuses getUpdates while a webhook is set). Network errors, 5xx and
        flood control wait (backoff, or Telegram's delay) and retry; a refused token, or
        another poller or a webhook taking the updates, raises ChannelBrokenError."""
        bot = await self._open_bot()
        offset: int | None = None
        confirmed: int | None = None
        try:
            info = await self._retrying(stop, "getWebhookInfo", bot.get_webhook_info)
            if info is not None and info.url:
                log.warning(
                    "%s: deleting the webhook %s so that polling gets the messages — "
                    "`broadcaster serve` sets it again when it starts",
                    self.name,
                    info.url,
                    extra={"channel": self.name},
                )
            if (
                info is None
                or await self._retrying(stop, "deleteWebhook", bot.delete_webhook) is None
            ):
                return
            log.info("%s: answering users by polling", self.name, extra={"channel": self.name})
            while not stop.is_set():

                def fetch(since: int | None = offset) -> Awaitable[tuple[Update, ...]]:
                    return bot.get_updates(
                        offset=since, timeout=timeout, allowed_updates=ALLOWED_UPDATES
                    )

                updates = await self._retrying(stop, "getUpdates", fetch)
                if updates is None:
                    break
                confirmed = offset
                for update in updates:
                    offset = update.update_id + 1
                    self._spawn(self._answer(update, "polling"))
        finally:
            if offset is not None and offset != confirmed:
                # Tell Telegram what was taken (it confirms up to `offset` on the next
                # call), or a restart would answer those messages again.
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(bot.get_updates(offset=offset, timeout=0, limit=1), 5)
            await self.close()

    async def _retrying(
        self, stop: asyncio.Event, what: str, call: Callable[[], Awaitable[T]]
    ) -> T | None:
        """`call()` until it succeeds (its result) or `stop` is set (None)."""
        from telegram.error import Conflict, TelegramError

        failures = 0
        while not stop.is_set():
            task = asyncio.ensure_future(call())
            stopping = asyncio.ensure_future(stop.wait())
            await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
                return None
            try:
                return task.result()
            except Conflict as error:
                raise ChannelBrokenError(
                    f"{self.name}: {what}: another program takes this bot's updates (a "
                    "webhook set by `broadcaster serve`, or a second `broadcaster "
                    f"telegram-bot`) — Telegram said: {self.channel.scrub(str(error))}"
                ) from error
            except TelegramError as error:
                problem = self._refusal(error, what)
                if not isinstance(problem, TransientError):
                    raise ChannelBrokenError(str(problem)) from error
                failures += 1
                delay = max(problem.retry_after or 0.0, self._backoff(failures))
                log.warning(
                    "%s — retrying in %.1f s",
                    problem,
                    delay,
                    extra={"channel": self.name, "attempt": failures},
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
        return None

    def _backoff(self, failures: int) -> float:
        """Exponential from the channel's backoff_seconds, capped at a minute, jittered."""
        config = self.channel.config
        ceiling = min(
            config.backoff_seconds * 2.0 ** (failures - 1), config.backoff_max_seconds, 60.0
        )
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    def _spawn(self, reply: Awaitable[None]) -> None:
        task = asyncio.ensure_future(reply)
        self._replies.add(task)
        task.add_done_callback(self._replies.discard)

    # -- answering ------------------------------------------------------------------------------

    def _first_time(self, update_id: int) -> bool:
        """False for an update answered already (Telegram redelivers after a failed call)."""
        if update_id in self._recent:
            return False
        self._recent[update_id] = None
        if len(self._recent) > _RECENT_UPDATES:
            self._recent.popitem(last=False)
        return True

    async def _answer(self, update: Update, mode: Literal["webhook", "polling"]) -> None:
        """Reply to one update when it is a private message; never raises."""
        from telegram.constants import ChatType

        message = update.message
        if message is None or message.chat.type != ChatType.PRIVATE:
            return  # groups, channels, edits: not a conversation with the bot
        if not self._first_time(update.update_id):
            return
        language = message.from_user.language_code if message.from_user else None
        command = _command(message.text)
        try:
            if command in STATUS_COMMANDS:
                state = await self.desk.current_state(self.name, language)
                text = status_reply(state)
                chosen = state.language
                if command == "start" and self.channel.address_kind is not None:
                    # Their first words with the bot: say how to be told of what comes.
                    hint = self.desk.labels(self.name, language)["subscribe_help"]
                    with_hint = f"{text}\n\n{_escape(hint)}"
                    if _shown_length(with_hint) <= MAX_MESSAGE_CHARS:
                        text = with_hint
            elif command in (SUBSCRIBE, UNSUBSCRIBE):
                # A private chat's id is the user's id: where their updates will go.
                address = str(message.chat.id)
                text = await self._subscription(command, address, language, message.text)
                chosen = None
            else:
                subscriptions = self.channel.address_kind is not None
                text = help_reply(
                    self.desk.labels(self.name, language), subscriptions=subscriptions
                )
                chosen = None
            sent = await self._send(message.chat.id, text)
        except ChannelBrokenError as error:  # no token: said once per message, no traceback
            log.error("%s (reply not sent)", error, extra={"channel": self.name})
            return
        except Exception:
            log.exception("%s: the support bot could not answer", self.name)
            return
        if sent and chosen is not None:
            # Who asked and what they wrote stay out of the logs.
            log.info(
                "%s: answered /%s in %s (%d open incidents, %s)",
                self.name,
                command,
                chosen,
                len(state.incidents),
                mode,
                extra={
                    "channel": self.name,
                    "language": chosen,
                    "open_incidents": len(state.incidents),
                    "mode": mode,
                },
            )

    async def _subscription(
        self, command: str, address: str, language: str | None, text: str | None
    ) -> str:
        """/subscribe [component …] or /unsubscribe for the user at `address`; the reply,
        in their language (the core logs and audits the change, the user id masked)."""
        labels = self.desk.labels(self.name, language)
        if self.channel.address_kind is None:
            return _escape(labels["no_subscriptions"])
        if command == UNSUBSCRIBE:
            found = await self.desk.unsubscribe(self.name, address, source="telegram /unsubscribe")
            return _escape(labels["unsubscribed" if found else "not_subscribed"])
        known = self.desk.components()
        names, unknown = match_components(_arguments(text), known)
        if unknown:
            refusal = _fill(
                labels["unknown_component"],
                unknown=", ".join(unknown),
                components=_component_list(known),
            )
            return _escape(refusal)
        subscriber = await self.desk.subscribe(
            self.name,
            address,
            language=language,
            components=names or None,
            source="telegram /subscribe",
        )
        labels = self.desk.labels(self.name, subscriber.language)
        if subscriber.components is None:
            return _escape(labels["subscribed"])
        shown = ", ".join(known.get(name) or name for name in subscriber.components)
        return _escape(_fill(labels["subscribed_components"], components=shown))

    async def _send(self, chat_id: int, text: str) -> bool:
        """sendMessage, retried a few times on flood control and network errors."""
        from telegram.constants import ParseMode
        from telegram.error import TelegramError

        bot = await self._open_bot()
        for attempt in range(1, REPLY_ATTEMPTS + 1):
            try:
                await bot.send_message(chat_id=chat_id, text=text, parse_mode=ParseMode.HTML)
                return True
            except TelegramError as error:
                problem = self.channel.classify(error, f"{self.name}: reply", str(chat_id))
                delay = (
                    max(problem.retry_after or 0.0, self._backoff(attempt))
                    if isinstance(problem, TransientError)
                    else None
                )
                if delay is None or attempt == REPLY_ATTEMPTS or delay > REPLY_MAX_WAIT_SECONDS:
                    log.warning("%s (reply not sent)", problem, extra={"channel": self.name})
                    return False
                await asyncio.sleep(delay)
        return False
