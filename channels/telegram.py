"""Telegram: each update posted by a bot to channels, groups or private chats.

On python-telegram-bot (`telegram.Bot`, async), imported inside methods. Text goes in
HTML parse mode, escaped; a follow-up replies to the incident's first message in that
chat. Every SDK failure is classified here into the contract's three error classes.

With `support_bot = true` the same bot also answers users in private chats
(`channels.telegram_support`): `/status` gets the current state, by webhook inside
`serve` (`POST /inbound/<channel>`) or by long polling (`broadcaster telegram-bot`).

With `subscribers = true` the instance is a subscriber channel instead (`address_kind =
telegram`): users subscribe themselves with the bot's `/subscribe`, and the core fans each
update out to them, privately, one tracked delivery each, in their language. A user who
blocked the bot is opted out, as Twilio's STOP is for SMS.
"""

from __future__ import annotations

import html
import logging
import re
import warnings
from collections.abc import Awaitable, Callable, Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any, ClassVar, Self, TypeVar

from pydantic import AnyHttpUrl, Field, field_validator, model_validator

from broadcaster.models import (
    AddressKind,
    Capabilities,
    ChannelFamily,
    ChannelLimits,
    RateLimit,
    Receipt,
    Thread,
)
from broadcaster.text import heading_words
from channels.base import (
    Channel,
    ChannelBrokenError,
    ChannelConfig,
    ChannelContext,
    DeliveryError,
    InboundEndpoint,
    Message,
    PermanentError,
    PostGoneError,
    Recipient,
    SecretRef,
    TransientError,
)

if TYPE_CHECKING:
    from telegram import Bot
    from telegram import Message as TelegramMessage
    from telegram.request import HTTPXRequest

    from channels.telegram_support import TelegramSupportBot


log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_API = "https://api.telegram.org"
# sendMessage: "1-4096 characters after entities parsing", counted in code points (the
# Bot API server's TDLib checks utf8_length), as Python's len() counts.
MAX_MESSAGE_CHARS = 4096
# 20 a minute per group: a bucket of 3 refilled at 17 a minute, so no 60-second window
# holds more than 3 + 17 = 20; the Bot FAQ allows such short bursts over 1 a second.
GROUP_RATE_LIMIT = RateLimit(
    per_target_per_second=17 / 60, per_target_burst=3, global_per_second=30
)
# BadRequest texts saying the message to change is gone (deleted, or too old to touch).
_GONE = re.compile(r"message to (delete|edit) not found|message can't be deleted", re.I)
_CHAT = re.compile(r"@[A-Za-z][A-Za-z0-9_]{3,}|-?[0-9]+")
# Forbidden texts saying the user left the bot (blocked it, or deleted their account).
_USER_LEFT = re.compile(r"blocked by the user|user is deactivated", re.I)
# setWebhook's secret_token: "1-256 characters. Only characters A-Z, a-z, 0-9, _ and -".
_WEBHOOK_SECRET = re.compile(r"[A-Za-z0-9_-]{1,256}")


class TelegramConfig(ChannelConfig):
    token: SecretRef = Field(description="the bot token from @BotFather, from env or file")
    chats: list[str] = Field(
        default_factory=list,
        description="chat ids (-100… for channels) or @channelusernames; none when "
        "subscribers = true",
    )
    subscribers: bool = Field(
        default=False,
        description="a subscriber channel: each update goes privately to every user who "
        "sent the bot /subscribe (the support bot's command, so turn support_bot on too), "
        "in their language, one tracked delivery each; `chats` must then be empty",
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

    @model_validator(mode="after")
    def _one_audience(self) -> Self:
        # Its own chats, or its subscribers: a subscriber channel's fan-out never reads
        # `chats`, so chats given with it would silently get nothing.
        if self.subscribers and self.chats:
            raise ValueError(
                "chats: a channel with subscribers = true sends to each subscribed user "
                "privately and posts to no chat — remove chats, or post to them from "
                "another telegram channel (the same token may serve both)"
            )
        if not self.subscribers and not self.chats:
            raise ValueError(
                "chats: name at least one chat to post to (-1001234567890 for a channel "
                "or group, or @channelusername), or set subscribers = true"
            )
        return self


def telegram_html(text: str) -> str:
    """The rendered plain text as Bot API HTML: `< > &` escaped, *heading lines* bold."""
    lines = []
    for line in text.split("\n"):
        heading = heading_words(line)
        # Telegram's HTML knows only &lt; &gt; &amp; &quot;: quotes stay as they are.
        escaped = html.escape(heading or line, quote=False)
        lines.append(f"<b>{escaped}</b>" if heading else escaped)
    return "\n".join(lines)


def is_private_chat(chat: str) -> bool:
    """User ids are positive; groups and channels are negative or @usernames."""
    return chat.isascii() and chat.isdigit()


def retry_after_of(error: Any) -> float:
    """RetryAfter's delay in seconds, whether PTB gives it as int or timedelta."""
    from telegram.warnings import PTBDeprecationWarning

    with warnings.catch_warnings():
        # PTB 22 warns that the int form will become a timedelta; we accept both.
        warnings.simplefilter("ignore", PTBDeprecationWarning)
        value = error.retry_after
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


# A subscriber's own language; no edits: a fan-out makes new posts, so a correction
# reaches subscribers as a follow-up under the update it corrects.
SUBSCRIBER_CAPABILITIES = Capabilities(
    threads=True, edits=False, deletes=True, per_recipient=True, languages="each"
)


class TelegramChannel(Channel):
    """Post through a Telegram bot to each configured chat, one delivery per chat; or,
    with `subscribers = true`, to each subscribed user's private chat."""

    family: ClassVar[ChannelFamily] = ChannelFamily.CHAT
    limits: ClassVar[ChannelLimits] = ChannelLimits(max_chars=MAX_MESSAGE_CHARS)
    capabilities: Capabilities = Capabilities(
        threads=True, edits=True, deletes=True, per_recipient=True
    )
    # Bot FAQ: no more than one message per second in a chat, about 30 per second in all;
    # groups and channels get GROUP_RATE_LIMIT (see rate_limit_for).
    default_rate_limit: ClassVar[RateLimit] = RateLimit(
        per_target_per_second=1, global_per_second=30
    )
    default_concurrency: ClassVar[int] = 8
    config_model: ClassVar[type[ChannelConfig]] = TelegramConfig
    request_timeout_seconds: ClassVar[float] = 10.0

    config: TelegramConfig

    def __init__(self, name: str, config: ChannelConfig, context: ChannelContext) -> None:
        super().__init__(name, config, context)
        if self.config.subscribers:
            self.address_kind = AddressKind.TELEGRAM
            # Each subscriber reads their own language, not every language joined.
            self.capabilities = SUBSCRIBER_CAPABILITIES
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

    def inbound(self) -> InboundEndpoint | None:
        """With `support_bot = true`: the bot answering users, for `serve` to mount."""
        if not self.config.support_bot or self.context.support_desk is None:
            return None
        return self.support_bot()

    def inbound_key(self) -> str | None:
        """A bot has one webhook (or one poller): one support bot per token."""
        return self.account_key() if self.config.support_bot else None

    def support_bot(self) -> TelegramSupportBot:
        """A new support bot on this channel's bot (its own HTTP client)."""
        desk = self.context.support_desk
        if desk is None:
            raise ChannelBrokenError(f"{self.name}: no support desk: open it with a Broadcaster")
        from channels.telegram_support import TelegramSupportBot

        return TelegramSupportBot(self, desk)

    def rate_limit_for(self, recipient: str) -> RateLimit:
        """1 message a second in a private chat (every subscriber's); 20 a minute in a
        group or channel (Bot FAQ), unless the config sets its own limits."""
        private = self.address_kind is not None or is_private_chat(recipient)
        if self.config.rate_limit is not None or private:
            return self.rate_limit
        return GROUP_RATE_LIMIT

    def account_key(self) -> str:
        # Channels sharing one bot share its global limit; the bot id is not secret.
        token = self.secret(self.config.token)
        if token is None:
            return self.name
        return "telegram:" + token.get_secret_value().split(":", 1)[0]

    def _api_root(self) -> str:
        return str(self.config.base_url or DEFAULT_API).rstrip("/")

    def new_bot(self, token: str) -> tuple[Bot, HTTPXRequest]:
        """A Bot and its HTTP client (not yet initialised) on this channel's API root;
        its token is scrubbed from Telegram's error messages from now on."""
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
        self._token = self._token or token
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
        self._bot, self._request = self.new_bot(self._token)
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

    def _target(self, recipient: Recipient, thread: Thread | None) -> tuple[str, str]:
        """(who, chat): how errors name the recipient, and the chat to call. A subscriber
        is named by id and reached at their address, the private chat with them (their
        user id stays out of errors, logs and delivery rows)."""
        if self.address_kind is None:
            return recipient.id, self._chat_for(recipient.id, thread)
        who = f"subscriber #{recipient.id}"
        if not recipient.address:
            raise PermanentError(f"{self.name} → {who}: no Telegram user id")
        return who, recipient.address

    def _chat_for(self, recipient: str, thread: Thread | None) -> str:
        """Where a recipient's messages go now: after a migration, the new chat id."""
        if recipient in self._migrated:
            return self._migrated[recipient]
        if thread is not None and thread.parent.data.get("chat_id"):
            # Recorded by an earlier post, maybe by another process after a migration.
            return thread.parent.data["chat_id"]
        return recipient

    def scrub(self, text: str) -> str:
        """Telegram's error text without the bot token (some errors quote the URL)."""
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

        detail = self.scrub(str(error))
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
            if _GONE.search(detail):
                return PostGoneError(f"{what}: {detail}")
            return PermanentError(f"{what}: {detail}")
        if isinstance(error, TimedOut):
            return TransientError(f"{what}: timed out")
        if isinstance(error, NetworkError | TelegramError):
            return TransientError(f"{what}: {type(error).__name__}: {detail}")
        return TransientError(f"{what}: {type(error).__name__}")

    async def _call(
        self, recipient: str, chat: str, call: Callable[[str], Awaitable[T]]
    ) -> tuple[str, T]:
        """Run one Bot API call for a recipient, following a chat migration once; a
        subscriber who blocked the bot is opted out."""
        from telegram.error import ChatMigrated, Forbidden, TelegramError

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
            problem = self.classify(error, what, chat)
            if (
                isinstance(error, Forbidden)
                and self.address_kind is not None
                and _USER_LEFT.search(str(error))
            ):
                # "bot was blocked by the user" or "user is deactivated": they left, and
                # every later update would fail the same way — as an SMS STOP does. Not
                # any Forbidden: "can't initiate conversation" is what every user says
                # to a wrong bot token, and must not unsubscribe everyone.
                await self.opt_out(chat, "telegram blocked")
            raise problem from error

    def _text(self, message: Message) -> str:
        render = message.render
        return telegram_html(render.text(None if render.joined else message.recipient.language))

    def _receipt(self, chat: str, sent: TelegramMessage) -> Receipt:
        if self.address_kind is not None:
            # A private chat: no link to it, and no chat id (the subscriber's address) in
            # the delivery row; the next message finds their chat by their address again.
            return Receipt(provider_id=str(sent.message_id), delivered=True)
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
        recipient, chat = self._target(message.recipient, message.thread)
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

        chat, sent = await self._call(recipient, chat, post)
        return self._receipt(chat, sent)

    async def edit(self, provider_id: str, message: Message) -> Receipt:
        """Replace a posted message's text (editMessageText)."""
        from telegram import Message as TelegramMessage
        from telegram.constants import ParseMode

        bot = self._bot_or_broken()
        recipient, chat = self._target(message.recipient, message.thread)
        text = self._text(message)

        async def edit(chat: str) -> TelegramMessage | bool:
            return await bot.edit_message_text(
                text, chat_id=chat, message_id=int(provider_id), parse_mode=ParseMode.HTML
            )

        chat, edited = await self._call(recipient, chat, edit)
        if isinstance(edited, TelegramMessage):
            return self._receipt(chat, edited)
        data = {"chat_id": chat} if self.address_kind is None else {}
        return Receipt(provider_id=provider_id, data=data, delivered=True)

    async def delete(self, provider_id: str, recipient: Recipient) -> None:
        """Delete a posted message (deleteMessage), for a retraction."""
        bot = self._bot_or_broken()
        who, chat = self._target(recipient, None)

        async def delete(chat: str) -> bool:
            return await bot.delete_message(chat_id=chat, message_id=int(provider_id))

        await self._call(who, chat, delete)

    async def check_config(self) -> list[str]:
        """The token is there and the Bot API accepts it (getMe); a support bot has a
        usable webhook secret."""
        problems = await super().check_config()
        if self.config.subscribers and not self.config.support_bot:
            problems.append(
                f"{self.name}: subscribers = true but support_bot = false — users subscribe "
                "with the bot's /subscribe, so nobody can; turn support_bot on"
            )
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
        bot, request = self.new_bot(token)
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
