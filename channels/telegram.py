"""Telegram: each update posted by a bot to channels, groups or private chats.

On python-telegram-bot (`telegram.Bot`, async), imported inside methods. Text goes in
HTML parse mode, escaped; a follow-up replies to the incident's first message in that
chat. Every SDK failure is classified here into the contract's three error classes.

With `support_bot = true` the same bot also answers users in private chats
(`TelegramSupportBot`): `/status` gets the current state, by webhook inside `serve`
(`POST /inbound/<channel>`) or by long polling (`broadcaster telegram-bot`).
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
import warnings
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

from pydantic import AnyHttpUrl, Field, field_validator

from broadcaster.models import (
    Capabilities,
    ChannelFamily,
    ChannelLimits,
    RateLimit,
    Receipt,
    Thread,
)
from channels.base import (
    Channel,
    ChannelBrokenError,
    ChannelConfig,
    ChannelContext,
    DeliveryError,
    InboundEndpoint,
    InboundReply,
    InboundRequest,
    Message,
    PermanentError,
    Recipient,
    SecretRef,
    TransientError,
)

if TYPE_CHECKING:
    from telegram import Bot, Update
    from telegram import Message as TelegramMessage
    from telegram.request import HTTPXRequest

    from broadcaster.support import CurrentState, SupportDesk

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_API = "https://api.telegram.org"
MAX_MESSAGE_CHARS = 4096  # sendMessage: "1-4096 characters after entities parsing"
# A chat-family template marks its heading line as *bold* (Slack's mrkdwn); in HTML mode
# the asterisks would show, so the line becomes <b>…</b>.
_BOLD_LINE = re.compile(r"\*([^*\n]+)\*")
_CHAT = re.compile(r"@[A-Za-z][A-Za-z0-9_]{3,}|-?[0-9]+")
# setWebhook's secret_token: "1-256 characters. Only characters A-Z, a-z, 0-9, _ and -".
_WEBHOOK_SECRET = re.compile(r"[A-Za-z0-9_-]{1,256}")


class TelegramConfig(ChannelConfig):
    token: SecretRef = Field(description="the bot token from @BotFather, from env or file")
    chats: list[str] = Field(
        min_length=1, description="chat ids (-100… for channels) or @channelusernames"
    )
    base_url: AnyHttpUrl | None = Field(
        default=None,
        description="a self-hosted Bot API server's root (default https://api.telegram.org)",
    )
    support_bot: bool = Field(
        default=False,
        description="the bot also answers users in private chats: /status (and /start) get "
        "the current state, anything else a short help; `serve` receives them at "
        "/inbound/<channel> (or run `broadcaster telegram-bot` to poll instead)",
    )
    webhook_secret: SecretRef | None = Field(
        default=None,
        description="the secret_token Telegram sends with each webhook call "
        "(X-Telegram-Bot-Api-Secret-Token): 1-256 of A-Z a-z 0-9 _ -; needed by support_bot "
        "under `serve`",
    )

    @field_validator("chats", mode="before")
    @classmethod
    def _ids_as_text(cls, value: Any) -> Any:
        # TOML gives numeric chat ids as integers.
        if isinstance(value, list):
            return [str(item) if isinstance(item, int) else item for item in value]
        return value

    @field_validator("chats")
    @classmethod
    def _valid_chats(cls, value: list[str]) -> list[str]:
        for chat in value:
            if not _CHAT.fullmatch(chat):
                raise ValueError(
                    f"'{chat}' is not a chat id (-1001234567890) or a @channelusername"
                )
        return value


def telegram_html(text: str) -> str:
    """The rendered plain text as Bot API HTML: `< > &` escaped, *heading lines* bold."""
    lines = []
    for line in text.split("\n"):
        bold = _BOLD_LINE.fullmatch(line)
        # Telegram's HTML knows only &lt; &gt; &amp; &quot;: quotes stay as they are.
        escaped = html.escape(bold[1] if bold else line, quote=False)
        lines.append(f"<b>{escaped}</b>" if bold else escaped)
    return "\n".join(lines)


def is_private_chat(chat: str) -> bool:
    """User ids are positive; groups and channels are negative or @usernames."""
    return chat.isdigit()


def retry_after_of(error: Any) -> float:
    """RetryAfter's delay in seconds, whether PTB gives it as int or timedelta."""
    from telegram.warnings import PTBDeprecationWarning

    with warnings.catch_warnings():
        # PTB 22 warns that the int form will become a timedelta; we accept both.
        warnings.simplefilter("ignore", PTBDeprecationWarning)
        value = error.retry_after
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


class TelegramChannel(Channel):
    """Post through a Telegram bot to each configured chat, one delivery per chat."""

    family: ClassVar[ChannelFamily] = ChannelFamily.CHAT
    limits: ClassVar[ChannelLimits] = ChannelLimits(max_chars=MAX_MESSAGE_CHARS)
    capabilities: ClassVar[Capabilities] = Capabilities(
        threads=True, edits=True, deletes=True, per_recipient=True
    )
    # Bot FAQ: no more than one message per second in a chat, about 30 per second in all
    # (a group's 20 per minute is far above an incident's pace; RetryAfter covers it).
    default_rate_limit: ClassVar[RateLimit] = RateLimit(
        per_target_per_second=1, global_per_second=30
    )
    default_concurrency: ClassVar[int] = 8
    config_model: ClassVar[type[ChannelConfig]] = TelegramConfig
    request_timeout_seconds: ClassVar[float] = 10.0

    config: TelegramConfig

    def __init__(self, name: str, config: ChannelConfig, context: ChannelContext) -> None:
        super().__init__(name, config, context)
        self._bot: Bot | None = None
        self._request: HTTPXRequest | None = None
        self._token: str | None = None
        # A group upgraded to a supergroup has a new id: configured id -> where it went.
        self._migrated: dict[str, str] = {}

    def recipients(self) -> list[Recipient]:
        return [Recipient(id=chat) for chat in self.config.chats]

    def secrets(self) -> Mapping[str, SecretRef]:
        secrets = {"token": self.config.token}
        if self.config.webhook_secret is not None:
            secrets["webhook_secret"] = self.config.webhook_secret
        return secrets

    def inbound(self) -> TelegramSupportBot | None:
        """With `support_bot = true`: the bot answering users, for `serve` to mount."""
        if not self.config.support_bot or self.context.support_desk is None:
            return None
        return self.support_bot()

    def support_bot(self) -> TelegramSupportBot:
        """A new support bot on this channel's bot (its own HTTP client)."""
        desk = self.context.support_desk
        if desk is None:
            raise ChannelBrokenError(f"{self.name}: no support desk: open it with a Broadcaster")
        return TelegramSupportBot(self, desk)

    def account_key(self) -> str:
        # Channels sharing one bot share its global limit; the bot id is not secret.
        token = self.secret(self.config.token)
        if token is None:
            return self.name
        return "telegram:" + token.get_secret_value().split(":", 1)[0]

    def _api_root(self) -> str:
        return str(self.config.base_url or DEFAULT_API).rstrip("/")

    def _new_bot(self, token: str) -> tuple[Bot, HTTPXRequest]:
        from telegram import Bot
        from telegram.request import HTTPXRequest

        # HTTPXRequest never retries (httpx's transport makes no retries by default):
        # the core owns retries, so a send is tried once per attempt and never doubled.
        timeout = self.request_timeout_seconds
        request = HTTPXRequest(
            connection_pool_size=self.concurrency,
            read_timeout=timeout,
            write_timeout=timeout,
            connect_timeout=timeout,
            pool_timeout=timeout,
        )
        root = self._api_root()
        bot = Bot(
            token,
            base_url=f"{root}/bot",
            base_file_url=f"{root}/file/bot",
            request=request,
            get_updates_request=request,  # one HTTP client for everything
        )
        return bot, request

    async def start(self) -> None:
        """Open the bot's HTTP client; no network call (a bad token shows on first send)."""
        if self._bot is not None:
            return
        secret = self.secret(self.config.token)
        if secret is None:
            return  # send() reports it as channel-broken
        self._token = secret.get_secret_value()
        self._bot, self._request = self._new_bot(self._token)
        # Not Bot.initialize(): its getMe would run before every other channel starts,
        # and its InvalidToken message quotes the token.
        await self._request.initialize()

    async def close(self) -> None:
        if self._request is not None:
            await self._request.shutdown()
        self._bot = self._request = None

    def _bot_or_broken(self) -> Bot:
        if self._bot is None:
            raise ChannelBrokenError(
                f"{self.name}: bot token not found in {self.config.token.describe()}"
            )
        return self._bot

    def _chat_for(self, recipient: str, thread: Thread | None) -> str:
        """Where a recipient's messages go now: after a migration, the new chat id."""
        if recipient in self._migrated:
            return self._migrated[recipient]
        if thread is not None and thread.parent.data.get("chat_id"):
            # Recorded by an earlier post, maybe by another process after a migration.
            return thread.parent.data["chat_id"]
        return recipient

    def _scrub(self, text: str) -> str:
        return text.replace(self._token, "<token>") if self._token else text

    def classify(self, error: Exception, what: str, chat: str) -> DeliveryError:
        """Translate a python-telegram-bot error into the contract's classes."""
        from telegram.error import (
            BadRequest,
            ChatMigrated,
            Forbidden,
            InvalidToken,
            NetworkError,
            RetryAfter,
            TelegramError,
            TimedOut,
        )

        detail = self._scrub(str(error))
        if isinstance(error, RetryAfter):
            return TransientError(f"{what}: flood control", retry_after=retry_after_of(error))
        if isinstance(error, InvalidToken):
            return ChannelBrokenError(
                f"{what}: the bot token was refused ({detail}) — check it with @BotFather"
            )
        if isinstance(error, Forbidden):
            if is_private_chat(chat):  # the user blocked the bot: that recipient only
                return PermanentError(f"{what}: {detail}")
            return ChannelBrokenError(
                f"{what}: {detail} — add the bot to {chat} again "
                "(as an administrator allowed to post, for a channel)"
            )
        if isinstance(error, ChatMigrated):  # a second migration in a row: try again later
            return TransientError(f"{what}: chat moved to {error.new_chat_id}")
        # BadRequest subclasses NetworkError: caught before it, and never retried.
        if isinstance(error, BadRequest):
            return PermanentError(f"{what}: {detail}")
        if isinstance(error, TimedOut):
            return TransientError(f"{what}: timed out")
        if isinstance(error, NetworkError | TelegramError):
            return TransientError(f"{what}: {type(error).__name__}: {detail}")
        return TransientError(f"{what}: {type(error).__name__}")

    async def _call(
        self, recipient: str, chat: str, call: Callable[[str], Awaitable[T]]
    ) -> tuple[str, T]:
        """Run one Bot API call for a recipient, following a chat migration once."""
        from telegram.error import ChatMigrated, TelegramError

        what = f"{self.name} → {recipient}"
        try:
            try:
                return chat, await call(chat)
            except ChatMigrated as moved:
                # "group chat was upgraded to a supergroup chat": same people, new id.
                chat = str(moved.new_chat_id)
                self._migrated[recipient] = chat
                log.warning("%s: chat %s moved to %s", self.name, recipient, chat)
                return chat, await call(chat)
        except TelegramError as error:
            raise self.classify(error, what, chat) from error

    def _text(self, message: Message) -> str:
        render = message.render
        return telegram_html(render.text(None if render.joined else message.recipient.language))

    def _receipt(self, chat: str, sent: TelegramMessage) -> Receipt:
        username = sent.chat.username
        return Receipt(
            provider_id=str(sent.message_id),
            permalink=f"https://t.me/{username}/{sent.message_id}" if username else None,
            data={"chat_id": str(sent.chat.id or chat)},
            delivered=True,  # the Bot API answers once the message is in the chat
        )

    async def send(self, message: Message) -> Receipt:
        from telegram import ReplyParameters
        from telegram.constants import ParseMode

        bot = self._bot_or_broken()
        recipient = message.recipient.id
        text = self._text(message)
        reply = None
        if message.thread is not None:
            # Every follow-up answers the first post, so the chat shows one thread; still
            # sent if that post was deleted (or left behind by a migration).
            reply = ReplyParameters(
                message_id=int(message.thread.root.provider_id),
                allow_sending_without_reply=True,
            )

        async def post(chat: str) -> TelegramMessage:
            return await bot.send_message(
                chat_id=chat, text=text, parse_mode=ParseMode.HTML, reply_parameters=reply
            )

        chat, sent = await self._call(recipient, self._chat_for(recipient, message.thread), post)
        return self._receipt(chat, sent)

    async def edit(self, provider_id: str, message: Message) -> Receipt:
        """Replace a posted message's text (editMessageText)."""
        from telegram import Message as TelegramMessage
        from telegram.constants import ParseMode

        bot = self._bot_or_broken()
        recipient = message.recipient.id
        text = self._text(message)

        async def edit(chat: str) -> TelegramMessage | bool:
            return await bot.edit_message_text(
                text, chat_id=chat, message_id=int(provider_id), parse_mode=ParseMode.HTML
            )

        chat, edited = await self._call(recipient, self._chat_for(recipient, message.thread), edit)
        if isinstance(edited, TelegramMessage):
            return self._receipt(chat, edited)
        return Receipt(provider_id=provider_id, data={"chat_id": chat}, delivered=True)

    async def delete(self, provider_id: str, recipient: Recipient) -> None:
        """Delete a posted message (deleteMessage), for a retraction."""
        bot = self._bot_or_broken()

        async def delete(chat: str) -> bool:
            return await bot.delete_message(chat_id=chat, message_id=int(provider_id))

        await self._call(recipient.id, self._chat_for(recipient.id, None), delete)

    async def check_config(self) -> list[str]:
        """The token is there and the Bot API accepts it (getMe); a support bot has a
        usable webhook secret."""
        problems = await super().check_config()
        if self.config.support_bot:
            ref = self.config.webhook_secret
            value = self.secret(ref) if ref is not None else None
            if ref is None:
                problems.append(
                    f"{self.name}: support_bot needs webhook_secret (1-256 of A-Z a-z 0-9 _ -), "
                    "or `serve` refuses every webhook call — run `broadcaster telegram-bot` "
                    "to answer by polling instead"
                )
            elif value is not None and not _WEBHOOK_SECRET.fullmatch(value.get_secret_value()):
                problems.append(
                    f"{self.name}: webhook_secret in {ref.describe()} must be 1-256 characters "
                    "of A-Z a-z 0-9 _ - (Telegram refuses others)"
                )
        secret = self.secret(self.config.token)
        if secret is None:
            return problems
        from telegram.error import TelegramError

        token = secret.get_secret_value()
        previous, self._token = self._token, token
        bot, request = self._new_bot(token)
        try:
            await request.initialize()
            await bot.get_me()
        except TelegramError as error:
            problem = self.classify(error, f"{self.name}: getMe at {self._api_root()}", "")
            problems.append(str(problem))
        finally:
            await request.shutdown()
            self._token = previous or token
        return problems


# -- the support bot: answering users in private chats -------------------------------------

SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"
# Only messages: edits, channel posts and the rest are never sent to the bot.
ALLOWED_UPDATES = ["message"]
STATUS_COMMANDS = frozenset({"status", "start"})  # /start: what Telegram sends first
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


def help_reply(labels: Mapping[str, str]) -> str:
    """The short help, as Bot API HTML."""
    return _escape(labels["unknown_command"])


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
    user's `language_code` (else the channel's first language); anything else the help.

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
        channel._token = channel._token or token.get_secret_value()
        bot, request = channel._new_bot(token.get_secret_value())
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
        except (KeyError, TypeError, ValueError):
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
                    f"telegram-bot`) — Telegram said: {self.channel._scrub(str(error))}"
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
            else:
                text = help_reply(self.desk.labels(self.name, language))
                chosen = None
            sent = await self._send(message.chat.id, text)
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
