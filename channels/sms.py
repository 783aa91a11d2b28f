"""SMS through Twilio: each update to every subscribed subscriber, in their language.

A subscriber channel (`address_kind = phone`): the core fans an update out to one
delivery per subscribed subscriber who follows a touched component, and hands each to
`send` with the subscriber's E.164 number and language. One message per subscriber, in
the channel language closest to theirs.

On twilio-python's `AsyncTwilioHttpClient` (aiohttp), imported lazily and created inside
the running loop. Its retries stay off (no `max_retries`): the core owns retries. A send
is accepted by Twilio as `queued`, so the delivery is `sent` with the Message SID; the
status callback Twilio POSTs to `/inbound/<channel>` moves it to `delivered`,
`undelivered` or `failed`. The same endpoint takes the messages users send to the number
(the Messaging webhook "A message comes in"): STOP and its synonyms opt them out of the
channel, START opts them back in, STATUS and HELP are answered (TwiML), and anything else
is forwarded to the team's channel (`subscribers.replies_to`) and recorded.

**Decision (where StatusCallback points):** `status_callback_url` when set (Twilio
reaches `serve` at another address than `serve.public_url`), else
`<serve.public_url>/inbound/<channel>` (lent by the core in `ChannelContext.public_url`,
so a CLI publish without `serve` asks for callbacks too), else the URL `serve` opened the
endpoint at; none of them: no callback, deliveries stay `sent`. The same URLs are what
the inbound endpoint checks `X-Twilio-Signature` against.
"""

from __future__ import annotations

import asyncio
import logging
import re
import unicodedata
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import parse_qsl, quote

from pydantic import Field, field_validator, model_validator

from broadcaster.models import (
    AddressKind,
    Capabilities,
    ChannelFamily,
    ChannelLimits,
    DeliveryState,
    RateLimit,
    Receipt,
)
from broadcaster.subscribers import mask
from broadcaster.support import pick_language
from broadcaster.text import (
    SmsEncoding,
    measure_sms,
    sms_encoding,
    split_graphemes,
    to_gsm7,
    truncate,
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
    SecretRef,
    TransientError,
)

if TYPE_CHECKING:
    from multidict import MultiDict

    from broadcaster.support import CurrentState, SupportDesk

__all__ = [
    "HELP_KEYWORDS",
    "OPT_IN_KEYWORDS",
    "OPT_OUT_KEYWORDS",
    "STATUS_KEYWORDS",
    "SmsChannel",
    "SmsConfig",
    "SmsInbound",
    "consent_keyword",
    "help_sms",
    "status_sms",
    "support_keyword",
]

log = logging.getLogger(__name__)
# twilio-python logs every request and response at INFO (six lines a message): quiet
# unless asked for. It never logs the body (numbers, text) or the Authorization header.
_SDK_LOG = logging.getLogger("channels.sms.twilio")
_SDK_LOG.setLevel(logging.WARNING)

DEFAULT_BASE_URL = "https://api.twilio.com"
TWIML_EMPTY = b'<?xml version="1.0" encoding="UTF-8"?><Response/>'
SIGNATURE_HEADER = "X-Twilio-Signature"

_E164 = re.compile(r"\+[1-9][0-9]{6,14}")
_ACCOUNT_SID = re.compile(r"AC[0-9a-fA-F]{32}")
_SERVICE_SID = re.compile(r"MG[0-9a-fA-F]{32}")
# A phone number inside a provider's error text ("The 'To' number +15005550001 is not…").
_NUMBER_IN_TEXT = re.compile(r"(?<![0-9A-Za-z])\+?[0-9]{7,15}(?![0-9A-Za-z])")
_SDK_PREFIX = re.compile(r"^Unable to (create|fetch|update) record: ")

# Languages written in another script than Latin (ISO 639-1): GSM-7 transliteration
# would turn their text into Latin letters, so it is off by default for them.
_NON_LATIN_SCRIPT = frozenset(
    {
        *("am", "ar", "be", "bg", "bn", "el", "fa", "gu", "he", "hi", "hy", "ja", "ka"),
        *("kk", "km", "kn", "ko", "ky", "lo", "mk", "ml", "mn", "mr", "my", "ne", "pa"),
        *("ru", "si", "sr", "ta", "te", "tg", "th", "uk", "ur", "yi", "zh"),
    }
)

# Twilio's limits on sending: a US/CA long code sends 1 segment a second, toll-free 3,
# a short code 100; what a sender cannot send at once waits in Twilio's queue (up to
# ValidityPeriod). Pacing here keeps that wait in our store instead, where a newer update
# supersedes an older one (Twilio's queue would still send "investigating" after
# "resolved"). One message a second per number; a Messaging Service spreads over its
# sender pool, 10 a second here (a pool of ~10 long codes, or a toll-free number with
# its 3 MPS plus bursts). Set `rate_limit` to your real throughput (short code: 100).
LONG_CODE_RATE = RateLimit(per_target_per_second=1, per_target_burst=1)
SERVICE_RATE = RateLimit(per_target_per_second=10, per_target_burst=10)

# Default opt-out and opt-in keywords Twilio acts on for long codes and toll-free numbers
# ("Twilio support for opt-out keywords"): the whole message, any case, spaces trimmed.
OPT_OUT_KEYWORDS = frozenset(
    {"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "REVOKE", "OPTOUT"}
)
OPT_IN_KEYWORDS = frozenset({"START", "YES", "UNSTOP"})
# What we answer ourselves: the whole message, any case, accents and a trailing ".!?"
# ignored (ÉTAT = ETAT). HELP and INFO are Twilio's default help keywords, which it
# also answers itself on long codes (see `support_keyword`); ETAT and AIDE are French.
STATUS_KEYWORDS = frozenset({"STATUS", "ETAT"})
HELP_KEYWORDS = frozenset({"HELP", "INFO", "AIDE"})

# Twilio error codes (https://www.twilio.com/docs/api/errors) that no recipient can fix:
# every send of the channel would fail the same way until the config is fixed.
_BROKEN_CODES: dict[int, str] = {
    20003: "check account_sid and auth_token in the Twilio Console",
    20005: "the Twilio account is not active",
    21212: "from_number is not a valid sender — check it",
    21606: "from_number is not an SMS-capable number of this account — check it",
    21659: "from_number is not a Twilio number or sender ID of this account — check it",
}
_TOO_MANY_REQUESTS = 20429
_UNSUBSCRIBED = 21610  # the recipient sent STOP: Twilio refuses to send to them
# Titles of the errors a status callback most often carries, for the delivery's
# last_error (callbacks carry only the code).
_ERROR_TITLES: dict[int, str] = {
    21610: "the recipient has opted out (STOP)",
    30001: "queue overflow",
    30002: "account suspended",
    30003: "unreachable destination handset",
    30004: "message blocked",
    30005: "unknown destination handset",
    30006: "landline or unreachable carrier",
    30007: "message filtered by the carrier",
    30008: "unknown error",
    30032: "toll-free number not verified",
    30034: "US A2P 10DLC: message from an unregistered number",
    30036: "validity period expired",
}
# MessageStatus of a status callback -> the delivery's state; queued, sending, sent,
# accepted and scheduled change nothing (the delivery is `sent` already).
_RECEIPT_STATES = {
    "delivered": DeliveryState.DELIVERED,
    "read": DeliveryState.DELIVERED,  # RCS/WhatsApp senders of a Messaging Service
    "undelivered": DeliveryState.UNDELIVERED,
    "failed": DeliveryState.FAILED,
}


class SmsConfig(ChannelConfig):
    account_sid: str = Field(description="the Account SID (AC…), from the Twilio Console")
    auth_token: SecretRef = Field(description="the account's Auth Token, from env or file")
    from_number: str | None = Field(
        default=None, description="the Twilio number to send from, E.164 (+15017122661)"
    )
    messaging_service_sid: str | None = Field(
        default=None,
        description="or a Messaging Service (MG…) that picks a sender from its pool",
    )
    max_segments: int = Field(
        default=2,
        ge=1,
        le=10,
        description="refuse to publish an update longer than this many SMS segments "
        "(each is billed; a 10-segment, 1,600-character body is Twilio's maximum)",
    )
    validity_seconds: int = Field(
        default=3600,
        ge=1,
        le=36000,
        description="Twilio's ValidityPeriod: a message still in Twilio's queue after this "
        "long is not sent (failed, error 30036) instead of arriving after the incident is over",
    )
    gsm7: bool = Field(
        default=True,
        description="transliterate to the GSM-7 alphabet (ê -> e): 160 characters a segment "
        "instead of 70; on by default unless a language is written in another script",
    )
    status_callback: bool = Field(
        default=True,
        description="ask Twilio for delivery receipts at <serve.public_url>/inbound/<channel>",
    )
    status_callback_url: str | None = Field(
        default=None,
        description="the URL Twilio reaches this channel's /inbound/<channel> at, when it is "
        "not under serve.public_url (a proxy path); receipts and STOP are checked against it",
    )
    base_url: str | None = Field(
        default=None,
        description="the API root (default https://api.twilio.com; a regional one such as "
        "https://api.dublin.ie1.twilio.com, or a fake in tests); TWILIO_REGION and "
        "TWILIO_EDGE are ignored",
    )

    @field_validator("account_sid")
    @classmethod
    def _account_sid(cls, value: str) -> str:
        if not _ACCOUNT_SID.fullmatch(value):
            raise ValueError(
                f"'{value}' is not an Account SID (AC followed by 32 hex digits, from the "
                "Twilio Console); API keys (SK…) are not supported"
            )
        return value

    @field_validator("from_number")
    @classmethod
    def _from_number(cls, value: str | None) -> str | None:
        if value is not None and not _E164.fullmatch(value):
            raise ValueError(f"'{value}' is not an E.164 number — write it like +15017122661")
        return value

    @field_validator("messaging_service_sid")
    @classmethod
    def _service_sid(cls, value: str | None) -> str | None:
        if value is not None and not _SERVICE_SID.fullmatch(value):
            raise ValueError(f"'{value}' is not a Messaging Service SID (MG + 32 hex digits)")
        return value

    @field_validator("status_callback_url", "base_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        scheme, _, rest = value.partition("://")
        if scheme not in ("http", "https") or not rest.strip("/"):
            raise ValueError(f"'{value}' is not an http(s) URL")
        return value

    @model_validator(mode="after")
    def _one_sender(self) -> SmsConfig:
        if (self.from_number is None) == (self.messaging_service_sid is None):
            raise ValueError("set exactly one of from_number and messaging_service_sid")
        return self

    @model_validator(mode="after")
    def _gsm7_for_latin_script(self) -> SmsConfig:
        # GSM-7 by default: a French "ê" alone makes a whole SMS UCS-2, and the shipped
        # French templates then cost 3-4 segments instead of 1-2. But transliterating
        # Cyrillic or Greek would send Latin gibberish, so not for those languages.
        if "gsm7" not in self.model_fields_set and any(
            language.lower().split("-", 1)[0] in _NON_LATIN_SCRIPT for language in self.languages
        ):
            self.gsm7 = False
        return self


def api_errors() -> tuple[type[Exception], ...]:
    """twilio-python's API errors: TwilioRestException, and the RFC 9457 problem details
    of newer APIs (TwilioServiceException)."""
    from twilio.base.exceptions import (
        TwilioRestException,
        TwilioServiceException,
    )

    return (TwilioRestException, TwilioServiceException)


def consent_keyword(body: str, opt_out_type: str | None) -> bool | None:
    """What an incoming text asks for: False to opt out, True to opt in, None otherwise.

    Twilio's Advanced Opt-Out names the keyword's kind in `OptOutType` (STOP, START,
    HELP), custom and localised keywords included; without it, Twilio's defaults."""
    if opt_out_type:
        return {"STOP": False, "START": True}.get(opt_out_type.strip().upper())
    word = body.strip().upper()
    if word in OPT_OUT_KEYWORDS:
        return False
    if word in OPT_IN_KEYWORDS:
        return True
    return None


def support_keyword(body: str, opt_out_type: str | None) -> str | None:
    """`status` or `help` when an incoming text asks for it, else None.

    With Advanced Opt-Out, Twilio names a help keyword in `OptOutType` and has already
    answered it with the Messaging Service's own HELP text: None then, so the sender does
    not get two answers. Without it, Twilio still sends its generic reply to HELP and INFO
    on long codes and toll-free numbers ("Twilio support for opt-out keywords"), and ours,
    with the support contact, follows it."""
    if opt_out_type:
        return None
    decomposed = unicodedata.normalize("NFKD", body.strip().rstrip(".!?").strip())
    word = "".join(c for c in decomposed if not unicodedata.combining(c)).upper()
    if word in STATUS_KEYWORDS:
        return "status"
    if word in HELP_KEYWORDS:
        return "help"
    return None


def _fill(label: str, **values: str) -> str:
    """A label with its `{name}`s filled (not str.format: labels are user files)."""
    for key, value in values.items():
        label = label.replace("{" + key + "}", value)
    return label


def _ellipsis(text: str) -> str:
    # "…" is not GSM-7: in a GSM-7 text it would make the whole SMS UCS-2.
    return "..." if sms_encoding(text) is SmsEncoding.GSM7 else "…"


def fit_sms(text: str, max_segments: int, *, gsm7: bool) -> str:
    """`text` as sent (transliterated to GSM-7 when `gsm7`), cut to `max_segments`."""
    sent = to_gsm7(text) if gsm7 else text
    if measure_sms(sent).segments <= max_segments:
        return sent
    # No segment holds more than 160 characters: start there, then shorten.
    keep = min(len(split_graphemes(sent)), max_segments * 160)
    while keep > 0:
        cut = truncate(sent, keep, ellipsis=_ellipsis(sent))
        if measure_sms(cut).segments <= max_segments:
            return cut
        keep -= 1
    return ""


def status_sms(
    state: CurrentState, words: Mapping[str, str], *, max_segments: int, gsm7: bool
) -> str:
    """The answer to STATUS: how many incidents are open, the latest one's title and
    status, and the status page — or the all-clear — within `max_segments`. The title is
    shortened first; the link is never cut (a message too long even so is cut whole).

    `state.labels` are the `[bot]` words (all_clear, status_page), `words` the `[sms]`
    ones, both in `state.language`."""
    url = state.status_page_url
    link = _fill(state.labels["status_page"], url=url) if url else ""

    def text(title: str) -> str:
        if not state.incidents:
            head = state.labels["all_clear"]
        else:
            latest, count = state.incidents[0], len(state.incidents)
            label = words["open_one"] if count == 1 else words["open_many"]
            head = _fill(label, count=str(count), title=title, status=latest.status_label)
        return f"{head} {link}".strip()

    def sent(title: str) -> str:
        return to_gsm7(text(title)) if gsm7 else text(title)

    title = state.incidents[0].title if state.incidents else ""
    for keep in range(len(split_graphemes(title)), 0, -1):
        candidate = sent(truncate(title, keep, ellipsis=_ellipsis(title)))
        if measure_sms(candidate).segments <= max_segments:
            return candidate
    return fit_sms(text(title), max_segments, gsm7=gsm7)


def help_sms(
    words: Mapping[str, str], contact: str | None, *, max_segments: int, gsm7: bool
) -> str:
    """The answer to HELP: the keywords, then the support contact when one is set."""
    parts = [words["help"]]
    if contact:
        parts.append(_fill(words["contact"], contact=contact))
    return fit_sms(" ".join(parts), max_segments, gsm7=gsm7)


def mask_numbers(text: str) -> str:
    """Provider text with every phone number in it masked (+1500•••••01)."""
    return _NUMBER_IN_TEXT.sub(lambda match: mask(match[0]), text)


def twilio_error(code: int | None, message: str | None = None) -> str:
    """`Twilio error 30007: message filtered by the carrier`, numbers masked."""
    text = mask_numbers(message or "") or (_ERROR_TITLES.get(code, "") if code else "")
    if code is None:
        return f"Twilio error: {text or 'no details'}"
    return f"Twilio error {code}: {text or f'see https://www.twilio.com/docs/errors/{code}'}"


class SmsChannel(Channel):
    """Send each update by SMS through Twilio, one message per subscribed subscriber."""

    family: ClassVar[ChannelFamily] = ChannelFamily.SHORT
    # Each segment is billed and long concatenations arrive out of order on some handsets:
    # 2 by default (306 GSM-7 or 134 UCS-2 characters); `max_segments` sets it per channel.
    limits: ClassVar[ChannelLimits] = ChannelLimits(max_sms_segments=2)
    capabilities: Capabilities = Capabilities(
        per_recipient=True, delivery_receipts=True, languages="each"
    )
    default_rate_limit: ClassVar[RateLimit] = LONG_CODE_RATE
    default_concurrency: ClassVar[int] = 8
    config_model: ClassVar[type[ChannelConfig]] = SmsConfig
    address_kind: AddressKind | None = AddressKind.PHONE
    request_timeout_seconds: ClassVar[float] = 10.0

    config: SmsConfig

    def __init__(self, name: str, config: ChannelConfig, context: ChannelContext) -> None:
        super().__init__(name, config, context)
        self._client: Any = None  # twilio.rest.Client
        self._http: Any = None  # its AsyncTwilioHttpClient
        self._served_url: str | None = None  # given by `serve` opening the endpoint

    # -- what the core asks ---------------------------------------------------------------

    @property
    def instance_limits(self) -> ChannelLimits:
        return ChannelLimits(max_sms_segments=self.config.max_segments)

    def secrets(self) -> Mapping[str, SecretRef]:
        return {"auth_token": self.config.auth_token}

    @property
    def sender(self) -> str:
        """Who sends: the number, or the Messaging Service."""
        return self.config.from_number or str(self.config.messaging_service_sid)

    def rate_limit_for(self, recipient: str) -> RateLimit:
        """One message a second from a number, ten through a Messaging Service, unless
        the config sets `rate_limit`."""
        if self.config.rate_limit is not None:
            return self.config.rate_limit
        return LONG_CODE_RATE if self.config.from_number else SERVICE_RATE

    def rate_limit_target(self, recipient: str) -> str:
        # Twilio limits (and queues) per sender, not per recipient.
        return self.sender

    def account_key(self) -> str:
        return f"twilio:{self.config.account_sid}"

    def inbound(self) -> InboundEndpoint | None:
        """Receipts and STOP/START at `/inbound/<channel>`, when a support desk is lent."""
        desk = self.context.support_desk
        return SmsInbound(self, desk) if desk is not None else None

    # -- URLs ---------------------------------------------------------------------------------

    def _base_url(self) -> str:
        return (self.config.base_url or DEFAULT_BASE_URL).rstrip("/")

    def _public_inbound_url(self) -> str | None:
        public = self.context.public_url
        return f"{public.rstrip('/')}/inbound/{quote(self.name, safe='')}" if public else None

    def served_at(self, url: str | None) -> None:
        """The URL `serve` opened this channel's endpoint at (None: public_url unset)."""
        self._served_url = url

    def inbound_urls(self) -> list[str]:
        """Every URL Twilio may call this channel's endpoint at (signatures cover it)."""
        urls = [self.config.status_callback_url, self._public_inbound_url(), self._served_url]
        return list(dict.fromkeys(url for url in urls if url))

    def status_callback_url(self) -> str | None:
        """Where Twilio reports each message's status (see the module's decision)."""
        if not self.config.status_callback:
            return None
        return self.config.status_callback_url or self._public_inbound_url() or self._served_url

    # -- the client ---------------------------------------------------------------------------

    def auth_token(self) -> str | None:
        token = self.secret(self.config.auth_token)
        return token.get_secret_value() if token is not None else None

    def _new_client(self, token: str) -> tuple[Any, Any]:
        """A twilio Client on its own AsyncTwilioHttpClient, pointed at `base_url`."""
        from twilio.http.async_http_client import (
            AsyncTwilioHttpClient,
        )
        from twilio.rest import Client

        # No max_retries: the SDK would wrap the session in aiohttp_retry's RetryClient,
        # which retries a dropped POST and may send the same SMS twice.
        http = AsyncTwilioHttpClient(logger=_SDK_LOG)
        client = Client(self.config.account_sid, token, http_client=http)
        # TWILIO_REGION and TWILIO_EDGE in the environment make the SDK rewrite every
        # request's host (ClientBase.get_hostname): requests go to base_url, always.
        client.region = None
        client.edge = None
        client.api.base_url = self._base_url()
        return client, http

    async def start(self) -> None:
        """Open the HTTP client inside the loop; no network call."""
        if self._client is not None:
            return
        token = self.auth_token()
        if token is None:
            return  # send() reports it as channel-broken
        self._client, self._http = self._new_client(token)
        if self.config.status_callback and self.status_callback_url() is None:
            log.warning(
                "%s: no delivery receipts — set serve.public_url (or status_callback_url) "
                "so Twilio can report each message's status; deliveries stay 'sent'",
                self.name,
                extra={"channel": self.name},
            )

    async def close(self) -> None:
        http, self._client, self._http = self._http, None, None
        if http is not None:
            await http.close()

    def _client_or_broken(self) -> Any:
        if self._client is None:
            raise ChannelBrokenError(
                f"{self.name}: auth_token not found in {self.config.auth_token.describe()}"
            )
        return self._client

    # -- sending ------------------------------------------------------------------------------

    @staticmethod
    def body(message: Message) -> str:
        """The recipient's language variant, exactly as rendered (and transliterated to
        GSM-7 by the core when the channel's `gsm7` is on)."""
        render = message.render
        if not render.variants:
            raise PermanentError(f"{render.channel}: the update has no rendered text")
        language = pick_language(message.recipient.language, [v.language for v in render.variants])
        return render.variant(language).text

    def classify(self, error: Exception, what: str) -> DeliveryError:
        """Translate a twilio-python API error (TwilioRestException, or the RFC 9457
        TwilioServiceException) into the contract's classes. Neither carries the
        response's headers, so a 429 has no retry_after: the core's backoff applies."""
        status = int(getattr(error, "status", 0) or 0)
        raw_code = getattr(error, "code", None)
        code = raw_code if isinstance(raw_code, int) and raw_code != status else None
        if hasattr(error, "title"):  # TwilioServiceException
            parts = (getattr(error, "title", None), getattr(error, "detail", None))
            message = " — ".join(str(part) for part in parts if part)
        else:
            message = _SDK_PREFIX.sub("", str(getattr(error, "msg", "") or ""))
        detail = twilio_error(code, message) if code else f"HTTP {status}: {mask_numbers(message)}"
        if code == _TOO_MANY_REQUESTS or status == 429:
            return TransientError(f"{what}: {detail}")
        if code in _BROKEN_CODES:
            return ChannelBrokenError(f"{what}: {detail} — {_BROKEN_CODES[code]}")
        if status in (401, 403):
            return ChannelBrokenError(
                f"{what}: {detail} — Twilio refused the credentials: check account_sid and "
                "auth_token"
            )
        if status == 404:  # the account's Messages resource: wrong account or base_url
            return ChannelBrokenError(f"{what}: {detail} — check account_sid and base_url")
        if status == 408 or status >= 500:
            return TransientError(f"{what}: {detail}")
        return PermanentError(f"{what}: {detail}")

    async def send(self, message: Message) -> Receipt:
        import aiohttp

        client = self._client_or_broken()
        recipient = message.recipient
        what = f"{self.name} → subscriber #{recipient.id}"
        to = recipient.address
        if not to:
            raise PermanentError(f"{what}: no phone number")
        params: dict[str, Any] = {
            "to": to,
            "body": self.body(message),
            "validity_period": self.config.validity_seconds,
        }
        if self.config.from_number:
            params["from_"] = self.config.from_number
        else:
            params["messaging_service_sid"] = self.config.messaging_service_sid
        callback = self.status_callback_url()
        if callback:
            params["status_callback"] = callback
        try:
            # The SDK's async client sets no timeout of its own (aiohttp's total=None).
            async with asyncio.timeout(self.request_timeout_seconds):
                sent = await client.messages.create_async(**params)
        except TimeoutError:
            raise TransientError(
                f"{what}: no answer from Twilio within {self.request_timeout_seconds:.0f} s"
            ) from None
        except api_errors() as exc:
            error = self.classify(exc, what)
            if getattr(exc, "code", None) == _UNSUBSCRIBED:
                await self.opt_out(to, f"twilio {_UNSUBSCRIBED}")
            raise error from None
        except aiohttp.ClientError as exc:
            # A dropped connection may or may not have sent it: retried (Twilio takes no
            # idempotency key, so this is where a duplicate SMS can come from).
            raise TransientError(f"{what}: {type(exc).__name__}") from None
        status = str(sent.status or "")
        if status in ("failed", "undelivered"):
            code = sent.error_code
            raise PermanentError(f"{what}: {twilio_error(code, sent.error_message)}")
        return Receipt(provider_id=str(sent.sid), delivered=False)

    async def send_notice(self, to: str, text: str, *, validity_seconds: int | None = None) -> str:
        """Send one text that is not an update (a sign-up's confirmation code) from this
        channel's sender: no status callback (no delivery tracks it). Its Message SID,
        or the contract's errors. `validity_seconds` caps Twilio's ValidityPeriod, so a
        code is not delivered after it has expired."""
        import aiohttp

        await self.start()
        client = self._client_or_broken()
        what = f"{self.name} → {mask(to)}"
        validity = self.config.validity_seconds
        params: dict[str, Any] = {
            "to": to,
            "body": text,
            "validity_period": min(validity, validity_seconds or validity),
        }
        if self.config.from_number:
            params["from_"] = self.config.from_number
        else:
            params["messaging_service_sid"] = self.config.messaging_service_sid
        try:
            async with asyncio.timeout(self.request_timeout_seconds):
                sent = await client.messages.create_async(**params)
        except TimeoutError:
            raise TransientError(f"{what}: no answer from Twilio") from None
        except api_errors() as exc:
            raise self.classify(exc, what) from None
        except aiohttp.ClientError as exc:
            raise TransientError(f"{what}: {type(exc).__name__}") from None
        if str(sent.status or "") in ("failed", "undelivered"):
            raise PermanentError(f"{what}: {twilio_error(sent.error_code, sent.error_message)}")
        log.info("%s: notice %s sent to %s", self.name, sent.sid, mask(to))
        return str(sent.sid)

    # -- doctor ---------------------------------------------------------------------------------

    async def check_config(self) -> list[str]:
        """The secret is there, receipts have a URL, and Twilio accepts the credentials
        (the account is fetched, and must be active)."""
        import aiohttp

        problems = await super().check_config()
        if self.config.status_callback and self.status_callback_url() is None:
            problems.append(
                f"{self.name}: status_callback is on but serve.public_url and "
                "status_callback_url are unset — Twilio cannot report deliveries (they stay "
                "'sent'): set one, or status_callback = false"
            )
        token = self.auth_token()
        if token is None:
            return problems
        sid, base = self.config.account_sid, self._base_url()
        client, http = self._new_client(token)
        try:
            async with asyncio.timeout(self.request_timeout_seconds):
                account = await client.api.accounts(sid).fetch_async()
            if account.status not in (None, "active"):
                problems.append(
                    f"{self.name}: the Twilio account {sid} is {account.status} — "
                    "reactivate it in the Twilio Console"
                )
        except api_errors() as exc:
            problems.append(f"{self.classify(exc, self.name)} (fetching account {sid} at {base})")
        except (TimeoutError, aiohttp.ClientError) as exc:
            problems.append(f"{self.name}: Twilio unreachable at {base} ({type(exc).__name__})")
        finally:
            await http.close()
        return problems


class SmsInbound(InboundEndpoint):
    """`POST /inbound/<channel>` of an SMS channel: Twilio's status callbacks and the
    messages users send to the number.

    Every request is authenticated first: `X-Twilio-Signature` must be Twilio's
    HMAC-SHA1, keyed with the auth token, of one of the URLs Twilio is given for this
    channel followed by the form's parameters; otherwise 401 and nothing changes. Then
    it is answered at once, with empty TwiML (`<Response/>`: Twilio's own opt-out
    handling sends the STOP/START confirmations), and acted on after the answer —
    except STATUS and HELP, answered in the TwiML itself (`<Message>`), in the sender's
    language when they are a subscriber.

    **Decision (answers in TwiML):** the reply rides on the webhook's answer, so it costs
    no API call and needs no tracking; it is not a delivery (no row, no retry). Twilio
    sends it from the number that was texted, through the same sender queue as updates.
    """

    def __init__(self, channel: SmsChannel, desk: SupportDesk) -> None:
        self.channel = channel
        self.desk = desk
        self.name = channel.name

    async def open(self, url: str | None) -> None:
        """Remember the URL `serve` is reached at; Twilio is configured in its Console
        (the "A message comes in" webhook) and per message (StatusCallback)."""
        self.channel.served_at(url)
        if not self.channel.inbound_urls():
            log.warning(
                "%s: serve.public_url is not set, so Twilio's status callbacks and STOP/START "
                "cannot be checked and are refused — set serve.public_url (https, reachable by "
                "Twilio) or status_callback_url",
                self.name,
                extra={"channel": self.name},
            )

    async def handle(self, request: InboundRequest) -> InboundReply:
        from multidict import MultiDict
        from twilio.request_validator import RequestValidator

        token = self.channel.auth_token()
        if token is None:
            return InboundReply.refusal(404, f"{self.name}: auth_token is not configured")
        urls = self.channel.inbound_urls()
        if not urls:
            return InboundReply.refusal(
                404, f"{self.name}: set serve.public_url or status_callback_url"
            )
        signature = request.headers.get(SIGNATURE_HEADER.lower())
        if not signature:
            return InboundReply.refusal(401, f"missing {SIGNATURE_HEADER}")
        # The signature covers the form's parameters, so they are parsed to check it; an
        # undecodable body simply fails the check.
        text = request.body.decode("utf-8", errors="replace")
        params: MultiDict[str] = MultiDict(parse_qsl(text, keep_blank_values=True))
        validator = RequestValidator(token)
        if not any(validator.validate(url, params, signature) for url in urls):
            return InboundReply.refusal(401, f"wrong {SIGNATURE_HEADER}")
        status = params.get("MessageStatus")
        if status is not None and status not in ("received", "receiving"):
            return self._receipt(params, status)
        if "Body" in params and params.get("From"):
            return await self._incoming(params)
        return self._twiml()

    @staticmethod
    def _twiml(then: Any = None) -> InboundReply:
        return InboundReply(status=200, body=TWIML_EMPTY, content_type="text/xml", then=then)

    def _receipt(self, params: MultiDict[str], status: str) -> InboundReply:
        """A status callback: delivered/undelivered/failed moves the delivery on."""
        state = _RECEIPT_STATES.get(status)
        sid = params.get("MessageSid") or params.get("SmsSid")
        if state is None or not sid:
            return self._twiml()
        raw_code = params.get("ErrorCode") or ""
        code = int(raw_code) if raw_code.isdigit() and int(raw_code) else None
        error = twilio_error(code, params.get("ErrorMessage")) if code else None
        recipient = params.get("To")

        async def record() -> None:
            try:
                found = await self.desk.record_receipt(self.name, sid, state, error)
            except Exception:
                log.exception("%s: could not record the receipt of %s", self.name, sid)
                return
            if not found:
                log.warning(
                    "%s: status callback for %s, which no delivery of this channel sent",
                    self.name,
                    sid,
                    extra={"channel": self.name},
                )
            if code == _UNSUBSCRIBED and recipient:
                await self.channel.opt_out(recipient, f"twilio {_UNSUBSCRIBED}")

        return self._twiml(record)

    async def _incoming(self, params: MultiDict[str]) -> InboundReply:
        """A message from a user: STOP and START (Twilio's keywords) change their consent;
        STATUS and HELP are answered; anything else goes to the team."""
        body, number = params.get("Body", ""), params.get("From", "")
        subscribed = consent_keyword(body, params.get("OptOutType"))
        if subscribed is None:
            return await self._support(params)
        keyword = body.strip().upper()[:40] or str(params.get("OptOutType"))

        async def change() -> None:
            try:
                # The desk logs the change, with the number masked.
                await self.desk.set_subscribed(
                    self.name, number, subscribed=subscribed, source=f"sms {keyword}"
                )
            except Exception:
                log.exception("%s: could not record %s from %s", self.name, keyword, mask(number))

        return self._twiml(change)

    async def _support(self, params: MultiDict[str]) -> InboundReply:
        """STATUS and HELP answered in TwiML; other text forwarded after the answer."""
        body, number = params.get("Body", ""), params.get("From", "")
        opt_out_type = params.get("OptOutType")
        keyword = support_keyword(body, opt_out_type)
        if keyword is None:
            if opt_out_type or not body.strip():
                return self._twiml()  # Twilio answered HELP; or a picture without text
            reference = params.get("MessageSid") or params.get("SmsSid") or ""

            async def forward() -> None:
                try:
                    # The desk records it and logs the outcome, with the number masked.
                    await self.desk.forward_reply(self.name, number, body, reference)
                except Exception:
                    log.exception("%s: could not record the reply of %s", self.name, mask(number))

            return self._twiml(forward)
        config = self.channel.config
        try:
            language = await self.desk.language_of(self.name, number)
            if keyword == "status":
                state = await self.desk.current_state(self.name, language)
                words = self.desk.labels(self.name, state.language, "sms")
                text = status_sms(state, words, max_segments=config.max_segments, gsm7=config.gsm7)
            else:
                words = self.desk.labels(self.name, language, "sms")
                contact = self.desk.support_contact()
                text = help_sms(words, contact, max_segments=config.max_segments, gsm7=config.gsm7)
        except Exception:
            # Twilio retries nothing on an error answer: say nothing rather than fail.
            log.exception("%s: could not answer %s", self.name, keyword.upper())
            return self._twiml()
        log.info(
            "%s: %s answered to %s",
            self.name,
            keyword.upper(),
            mask(number),
            extra={"channel": self.name},
        )
        return self._answer(text)

    @staticmethod
    def _answer(text: str) -> InboundReply:
        """TwiML that sends `text` back to the sender (escaped by twilio-python)."""
        from twilio.twiml.messaging_response import MessagingResponse

        response = MessagingResponse()
        response.message(text)
        return InboundReply(status=200, body=str(response).encode(), content_type="text/xml")
