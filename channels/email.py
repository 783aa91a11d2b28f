"""Email over SMTP: each subscriber gets the `long` variant in their language, as a
multipart/alternative message (the text as rendered, and a simple HTML copy of it),
follow-ups threaded under the first email with In-Reply-To and References.

Built on aiosmtplib. A small pool of logged-in SMTP sessions (`max_connections`) is
reused message after message, so a list of thousands costs a few logins, not thousands;
a session the server closed, or one that failed, is replaced by a new one.

SMTP acceptance only means the relay took the message: a delivery ends `sent`, never
`delivered`. The Message-ID is derived from the delivery key, so a retry after a dropped
connection carries the same Message-ID as the first try (mail clients show one copy).
"""

from __future__ import annotations

import asyncio
import email.policy
import html
import importlib
import logging
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid, parseaddr
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal
from urllib.parse import quote

from pydantic import Field, PositiveFloat, PositiveInt, field_validator, model_validator

from broadcaster.models import (
    AddressKind,
    Capabilities,
    ChannelFamily,
    ChannelLimits,
    PostRef,
    RateLimit,
    Receipt,
)
from broadcaster.subscribers import mask
from channels.base import (
    Channel,
    ChannelBrokenError,
    ChannelConfig,
    ChannelContext,
    DeliveryError,
    Message,
    PermanentError,
    SecretRef,
    TransientError,
)

if TYPE_CHECKING:
    from aiosmtplib import SMTP, SMTPSenderRefused

__all__ = [
    "EmailChannel",
    "EmailConfig",
    "SmtpPool",
    "html_body",
    "message_id_for",
]

log = logging.getLogger(__name__)

# The footer line of every update when the subscriber has a manage page (self-service).
MANAGE_FOOTER = {
    "en": "Manage or stop these emails: ",
    "fr": "Gérer ou arrêter ces e-mails\u00a0: ",
}
SUBJECT_MAX_CHARS = 150  # RFC 5322 folds longer ones; mail clients show ~60-80 in a list
# A pooled session idle longer than this is asked NOOP before it carries a message: the
# server may have timed it out (RFC 5321 4.5.3.2: at least 5 minutes) without us noticing.
NOOP_AFTER_IDLE_SECONDS = 10.0
QUIT_TIMEOUT_SECONDS = 2.0
# After the server refuses us (login, TLS), sends already waiting for a session fail with
# that answer for this long instead of trying again; the dispatcher stops the channel.
REFUSAL_HOLD_SECONDS = 5.0
# Headers the DKIM signature covers when present. RFC 8058 requires List-Unsubscribe and
# List-Unsubscribe-Post to be signed for one-click unsubscribe to be honoured.
DKIM_HEADERS = (
    "From",
    "To",
    "Subject",
    "Date",
    "Message-ID",
    "Reply-To",
    "In-Reply-To",
    "References",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
    "Auto-Submitted",
    "Content-Language",
    "MIME-Version",
    "Content-Type",
)
Security = Literal["starttls", "tls", "none"]


def _parse_address(value: str, what: str) -> Address:
    """'Acme Status <status@acme.com>' or 'status@acme.com' as an Address."""
    name, addr = parseaddr(value)
    local, at, domain = addr.rpartition("@")
    if not at or not local or "." not in domain:
        raise ValueError(
            f"{what} '{value}' is not an email address (e.g. 'Acme <status@acme.com>')"
        )
    return Address(display_name=name, addr_spec=addr)


class EmailConfig(ChannelConfig):
    host: str = Field(description="the SMTP relay (smtp.example.com); tests: 127.0.0.1")
    port: PositiveInt = Field(
        default=587, description="587 for starttls, 465 for tls, 25 for a local relay"
    )
    security: Security = Field(
        default="starttls",
        description="starttls: upgrade a plain connection (required, never skipped); "
        "tls: TLS from the first byte; none: plain text (a relay on a trusted network)",
    )
    username: str | None = Field(default=None, description="login; None: no AUTH")
    password: SecretRef | None = Field(default=None, description="from env or file")
    from_address: str = Field(description="who it is from: 'Acme Status <status@acme.com>'")
    reply_to: str | None = Field(default=None, description="where replies go, if not From")
    unsubscribe_url: str | None = Field(
        default=None,
        description="one-click unsubscribe link, {subscriber} = the subscriber's id; "
        "None: a mailto: to from_address with subject 'unsubscribe'",
    )
    max_connections: PositiveInt = Field(
        default=4, description="SMTP sessions kept open and reused at once"
    )
    messages_per_connection: PositiveInt = Field(
        default=100, description="messages one session carries before it is renewed"
    )
    timeout_seconds: PositiveFloat = Field(default=30.0, description="per SMTP command")
    ca_file: Path | None = Field(
        default=None, description="certificate(s) to trust for a relay with a private CA"
    )
    helo_hostname: str | None = Field(
        default=None, description="the name said in EHLO; default: this machine's FQDN"
    )
    dkim_selector: str | None = Field(
        default=None, description="DKIM selector (s1 in s1._domainkey)"
    )
    dkim_private_key: SecretRef | None = Field(
        default=None, description="the DKIM RSA private key (PEM), from env or file"
    )
    dkim_domain: str | None = Field(
        default=None, description="the signing domain (d=); default: from_address's domain"
    )

    @field_validator("from_address")
    @classmethod
    def _from_is_an_address(cls, value: str) -> str:
        return str(_parse_address(value, "from_address"))

    @field_validator("reply_to")
    @classmethod
    def _reply_to_is_an_address(cls, value: str | None) -> str | None:
        return None if value is None else str(_parse_address(value, "reply_to"))

    @field_validator("unsubscribe_url")
    @classmethod
    def _unsubscribe_is_a_link(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith(("https://", "http://", "mailto:")):
            raise ValueError("unsubscribe_url must be an https:// (or mailto:) link")
        if re.search(r"[{}]", value.replace("{subscriber}", "")):
            raise ValueError("unsubscribe_url may only use the placeholder {subscriber}")
        return value

    @model_validator(mode="after")
    def _pairs(self) -> EmailConfig:
        if (self.password is None) != (self.username is None):
            raise ValueError("set both username and password, or neither")
        if (self.dkim_selector is None) != (self.dkim_private_key is None):
            raise ValueError("set both dkim_selector and dkim_private_key, or neither")
        return self


def message_id_for(delivery_key: str, domain: str) -> str:
    """The Message-ID of one delivery: the same on every try of it."""
    return f"<{delivery_key}@{domain}>"


def _msg_id(provider_id: str) -> str:
    return provider_id if provider_id.startswith("<") else f"<{provider_id}>"


# A link in rendered text: http(s) up to whitespace or a character that cannot end one.
LINK = re.compile(r"https?://[^\s<>\"']+", re.IGNORECASE)
# Punctuation that ends the sentence around a link, not the link.
LINK_TRAILING = ".,;:!?)]}"


def _linkify(line: str) -> str:
    """One line of text as HTML: escaped, with its http(s) links made clickable."""
    out: list[str] = []
    position = 0
    for match in LINK.finditer(line):
        url = match.group(0).rstrip(LINK_TRAILING)
        out.append(html.escape(line[position : match.start()]))
        escaped = html.escape(url, quote=True)
        out.append(f'<a href="{escaped}">{escaped}</a>')
        position = match.start() + len(url)
    out.append(html.escape(line[position:]))
    return "".join(out)


def html_body(text: str, *, language: str, title: str) -> str:
    """The HTML copy of a rendered text: escaped, a paragraph per blank-line-separated
    block, line breaks kept, links clickable — nothing the text does not say."""
    paragraphs = [p for p in re.split(r"\n[ \t]*\n", text.strip()) if p.strip()]
    body = "\n".join(
        "<p>" + "<br>\n".join(_linkify(line) for line in paragraph.split("\n")) + "</p>"
        for paragraph in paragraphs
    )
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="{html.escape(language, quote=True)}">\n'
        '<head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title></head>\n"
        '<body style="font-family: system-ui, -apple-system, Segoe UI, Roboto, sans-serif; '
        'line-height: 1.5; max-width: 40em; margin: 0 auto; padding: 1em;">\n'
        f"{body}\n</body>\n</html>\n"
    )


@dataclass
class _Session:
    smtp: SMTP
    sent: int = 0
    idle_since: float = field(default_factory=time.monotonic)


def _session_survives(exc: BaseException) -> bool:
    """After this error, is the SMTP session still usable for the next message? (The
    server answered and aiosmtplib reset the envelope with RSET; 421 closes it.)"""
    from aiosmtplib import SMTPNotSupported, SMTPRecipientsRefused, SMTPResponseException

    if isinstance(exc, SMTPResponseException):
        return exc.code != 421
    return isinstance(exc, SMTPRecipientsRefused | SMTPNotSupported | ValueError)


class SmtpPool:
    """At most `size` logged-in SMTP sessions, each reused for message after message."""

    def __init__(
        self,
        open_session: Callable[[], Awaitable[SMTP]],
        *,
        size: int,
        messages_per_session: int,
    ) -> None:
        self._open = open_session
        self._slots = asyncio.Semaphore(size)
        self._idle: list[_Session] = []
        self._per_session = messages_per_session
        self.opened = 0  # sessions opened since start: how well they are reused
        self._closed = False
        self._opening = asyncio.Lock()
        self._refused: tuple[float, str] | None = None  # (until, why)

    async def send(self, sender: str, recipient: str, data: bytes, options: list[str]) -> None:
        """Send one message on a pooled session (opened when none is idle)."""
        async with self._slots:
            session = await self._take()
            try:
                await session.smtp.sendmail(sender, [recipient], data, mail_options=options)
            except BaseException as exc:
                if _session_survives(exc) and session.smtp.is_connected:
                    self._keep(session)
                else:
                    session.smtp.close()  # state unknown (timeout, drop): never reuse it
                raise
            session.sent += 1
            if session.sent < self._per_session and session.smtp.is_connected:
                self._keep(session)
            else:
                await _quit(session.smtp)

    async def _take(self) -> _Session:
        from aiosmtplib import SMTPException

        while self._idle:
            session = self._idle.pop()  # the most recently used: the likeliest alive
            if not session.smtp.is_connected:
                continue
            if time.monotonic() - session.idle_since > NOOP_AFTER_IDLE_SECONDS:
                try:
                    await session.smtp.noop()
                except (SMTPException, OSError):
                    session.smtp.close()
                    continue
            return session
        return _Session(await self._open_one())

    async def _open_one(self) -> SMTP:
        """Open one session at a time; after a refusal of the channel (a wrong password),
        the sends waiting for a session get the same answer without trying again: a relay
        locks an account out after a few failed logins."""
        async with self._opening:
            refused = self._refused
            if refused is not None and time.monotonic() < refused[0]:
                raise ChannelBrokenError(refused[1])
            try:
                smtp = await self._open()
            except ChannelBrokenError as exc:
                self._refused = (time.monotonic() + REFUSAL_HOLD_SECONDS, str(exc))
                raise
            self._refused = None
            self.opened += 1
            return smtp

    def _keep(self, session: _Session) -> None:
        if self._closed:  # a send that outlived close(): nobody will reuse it
            session.smtp.close()
            return
        session.idle_since = time.monotonic()
        self._idle.append(session)

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        await asyncio.gather(*(_quit(s.smtp) for s in idle))


async def _quit(smtp: SMTP) -> None:
    """Say goodbye politely, but never wait long for it."""
    from aiosmtplib import SMTPException

    try:
        if smtp.is_connected:
            await smtp.quit(timeout=QUIT_TIMEOUT_SECONDS)
    except (SMTPException, OSError, TimeoutError):
        pass
    finally:
        smtp.close()


def _reply(code: int, text: str, address: str | None) -> str:
    """A server's reply on one line, short, the recipient's address masked."""
    line = " ".join(str(text).split())
    if address:
        line = re.sub(re.escape(address), mask(address), line, flags=re.IGNORECASE)
    if len(line) > 200:
        line = line[:199] + "…"
    return f"{code} {line}".strip()


class EmailChannel(Channel):
    """Email each subscriber over SMTP, in their language, threaded per incident."""

    family: ClassVar[ChannelFamily] = ChannelFamily.LONG
    address_kind: AddressKind | None = AddressKind.EMAIL
    limits: ClassVar[ChannelLimits] = ChannelLimits(max_subject_chars=SUBJECT_MAX_CHARS)
    # No edits or deletes: a sent email stays sent; a correction goes out as a follow-up.
    capabilities: Capabilities = Capabilities(threads=True, per_recipient=True, languages="each")
    # Relays limit per account (Amazon SES starts at 14 messages/s): set
    # rate_limit = {global_per_second = …} to your relay's quota.
    default_rate_limit: ClassVar[RateLimit] = RateLimit()
    config_model: ClassVar[type[ChannelConfig]] = EmailConfig

    config: EmailConfig

    def __init__(self, name: str, config: ChannelConfig, context: ChannelContext) -> None:
        super().__init__(name, config, context)
        self._from = _parse_address(self.config.from_address, "from_address")
        self._pool: SmtpPool | None = None
        self._tls: ssl.SSLContext | None = None
        self._helo: str | None = self.config.helo_hostname

    @property
    def concurrency(self) -> int:
        # Twice the sessions: a message is ready whenever a session frees up.
        return self.config.concurrency or 2 * self.config.max_connections

    @property
    def domain(self) -> str:
        """The sender's domain: in Message-IDs, and DKIM's d= by default."""
        return self._from.domain

    def secrets(self) -> Mapping[str, SecretRef]:
        found = {"password": self.config.password, "dkim_private_key": self.config.dkim_private_key}
        return {key: ref for key, ref in found.items() if ref is not None}

    @property
    def where(self) -> str:
        return f"{self.config.host}:{self.config.port} ({self.config.security})"

    # --- sessions ----------------------------------------------------------------------

    async def start(self) -> None:
        if self._pool is None:
            self._pool = SmtpPool(
                self._open_session,
                size=self.config.max_connections,
                messages_per_session=self.config.messages_per_connection,
            )

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            cafile = self.config.ca_file
            if cafile is not None and not cafile.is_absolute():
                cafile = self.context.base_dir / cafile
            self._tls = ssl.create_default_context(cafile=str(cafile) if cafile else None)
        return self._tls

    async def _open_session(self) -> SMTP:
        """Connect, EHLO, STARTTLS and log in as configured; errors classified."""
        from aiosmtplib import SMTP

        password: str | None = None
        if self.config.password is not None:
            secret = self.secret(self.config.password)
            if secret is None:
                raise ChannelBrokenError(
                    f"{self.name}: password not found in {self.config.password.describe()}"
                )
            password = secret.get_secret_value()
        if self._helo is None:
            import socket

            # Once: aiosmtplib would look the name up again for every session.
            self._helo = await asyncio.to_thread(socket.getfqdn)
        security = self.config.security
        smtp = SMTP(
            hostname=self.config.host,
            port=self.config.port,
            username=self.config.username,
            password=password,
            use_tls=security == "tls",
            # True: STARTTLS or fail. aiosmtplib's default (None) silently stays in
            # plain text when the server does not offer it.
            start_tls=security == "starttls",
            tls_context=self._tls_context() if security != "none" else None,
            timeout=self.config.timeout_seconds,
            local_hostname=self._helo,
        )
        try:
            await smtp.connect()
        except Exception as exc:
            smtp.close()
            raise self._session_error(exc) from exc
        log.debug("%s: SMTP session opened to %s", self.name, self.where)
        return smtp

    def _session_error(self, exc: BaseException) -> DeliveryError:
        """What failing to open a session means: the relay is down (transient), or we
        cannot use it as configured (channel-broken)."""
        import aiosmtplib as smtp

        what = f"{self.name}: {self.where}"
        if isinstance(exc, DeliveryError):
            return exc
        if isinstance(exc, smtp.SMTPAuthenticationError):
            return ChannelBrokenError(
                f"{self.name}: the server refused the login as '{self.config.username}' "
                f"({_reply(exc.code, exc.message, None)}) — check username and password"
            )
        if isinstance(exc, smtp.SMTPResponseException):
            reply = _reply(exc.code, exc.message, None)
            if exc.code == 530:
                return ChannelBrokenError(_must_secure(what, reply))
            if 400 <= exc.code < 500:
                return TransientError(f"{what}: {reply}")
            return ChannelBrokenError(f"{what}: the server refused the session ({reply})")
        if isinstance(exc, ssl.SSLError) or isinstance(exc.__cause__, ssl.SSLError):
            return ChannelBrokenError(_tls_failure(what, exc, self.config.security))
        if isinstance(exc, smtp.SMTPTimeoutError | TimeoutError):
            hint = ""
            if self.config.port == 465 and self.config.security != "tls":
                hint = ' — port 465 expects security = "tls"'
            return TransientError(
                f"{what}: no answer within {self.config.timeout_seconds:g} s{hint}"
            )
        if isinstance(exc, smtp.SMTPServerDisconnected):
            hint = ""
            if self.config.security == "tls":
                hint = ' — if this port expects STARTTLS, set security = "starttls"'
            return TransientError(f"{what}: the server closed the connection{hint}")
        if isinstance(exc, smtp.SMTPConnectError | OSError):
            reason = exc.__cause__ or exc
            return TransientError(f"{what}: cannot connect ({_os_reason(reason)})")
        if isinstance(exc, smtp.SMTPException):
            text = str(exc)
            if "STARTTLS" in text:
                return ChannelBrokenError(
                    f'{what}: the server does not offer STARTTLS — use security = "tls" '
                    '(port 465), or "none" only with a relay on a trusted network'
                )
            if "AUTH" in text or "authentication" in text.lower():
                return ChannelBrokenError(
                    f"{what}: the server offers no login on this connection — remove "
                    "username/password, or use the relay's submission port"
                )
            return TransientError(f"{what}: {text}")
        return TransientError(f"{what}: {type(exc).__name__}")

    # --- messages ----------------------------------------------------------------------

    def compose(self, message: Message) -> tuple[EmailMessage, str]:
        """The email of one delivery and its Message-ID."""
        recipient = message.recipient
        if not recipient.address:
            raise PermanentError(f"{self.name} → subscriber #{recipient.id}: no email address")
        render = message.render
        variant = render.variant(recipient.language or render.variants[0].language)
        title = str(render.facts.get("title") or "")
        subject = variant.subject or title or "Status update"
        message_id = message_id_for(message.delivery_key, self.domain)
        policy = email.policy.SMTP if recipient.address.isascii() else email.policy.SMTPUTF8
        mail = EmailMessage(policy=policy)
        mail["Subject"] = subject
        mail["From"] = self.config.from_address
        mail["To"] = recipient.address
        if self.config.reply_to:
            mail["Reply-To"] = self.config.reply_to
        mail["Date"] = format_datetime(datetime.now(UTC), usegmt=True)
        mail["Message-ID"] = message_id
        if message.thread is not None:
            root, parent = message.thread.root, message.thread.parent
            mail["In-Reply-To"] = _msg_id(parent.provider_id)
            mail["References"] = " ".join(_references(root, parent))
        manage = self._manage_url(recipient.id)
        unsubscribe = self._unsubscribe(recipient.id, manage)
        mail["List-Unsubscribe"] = f"<{unsubscribe}>"
        if unsubscribe.startswith("https://"):
            # RFC 8058 one-click: the link is POSTed to, without a page to confirm on.
            mail["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
        # RFC 3834: no vacation or out-of-office replies to a machine; Exchange's own
        # header says the same to Outlook.
        mail["Auto-Submitted"] = "auto-generated"
        mail["X-Auto-Response-Suppress"] = "OOF, AutoReply"
        text = variant.text
        if manage is not None:
            footer = MANAGE_FOOTER.get(variant.language.split("-")[0], MANAGE_FOOTER["en"])
            text = f"{text}\n\n{footer}{manage}"
        mail.set_content(text)
        mail.add_alternative(
            html_body(text, language=variant.language, title=subject), subtype="html"
        )
        # After the parts: making them moves every Content-* header into the first part.
        mail["Content-Language"] = variant.language
        return mail, message_id

    def _manage_url(self, subscriber: str) -> str | None:
        """The subscriber's manage page (self-service), when the core lends one."""
        manage_url = self.context.manage_url
        return manage_url(subscriber) if manage_url is not None else None

    def _unsubscribe(self, subscriber: str, manage: str | None = None) -> str:
        """List-Unsubscribe: `unsubscribe_url` when set, else the manage page's one-click
        endpoint, else a mailto: to the sender."""
        if self.config.unsubscribe_url:
            return self.config.unsubscribe_url.replace("{subscriber}", quote(subscriber, safe=""))
        if manage is not None:
            return f"{manage}/unsubscribe"
        return f"mailto:{self._from.addr_spec}?subject=unsubscribe"

    async def send_notice(self, to: str, subject: str, text: str, *, language: str) -> str:
        """Send one email that is not an update (a sign-up's confirmation link) from this
        channel's sender, as text and HTML: no thread, no unsubscribe header (the person
        is not subscribed). Its Message-ID, or the contract's errors."""
        policy = email.policy.SMTP if to.isascii() else email.policy.SMTPUTF8
        mail = EmailMessage(policy=policy)
        mail["Subject"] = subject
        mail["From"] = self.config.from_address
        mail["To"] = to
        if self.config.reply_to:
            mail["Reply-To"] = self.config.reply_to
        mail["Date"] = format_datetime(datetime.now(UTC), usegmt=True)
        message_id = make_msgid(domain=self.domain)
        mail["Message-ID"] = message_id
        mail["Auto-Submitted"] = "auto-generated"
        mail["X-Auto-Response-Suppress"] = "OOF, AutoReply"
        mail.set_content(text)
        mail.add_alternative(html_body(text, language=language, title=subject), subtype="html")
        mail["Content-Language"] = language
        data = mail.as_bytes()
        if self.signs:
            data = await asyncio.to_thread(self.sign, data, list(mail.keys()))
        await self.start()
        assert self._pool is not None
        try:
            await self._pool.send(
                self._from.addr_spec, to, data, [] if to.isascii() else ["SMTPUTF8"]
            )
        except DeliveryError:
            raise
        except Exception as exc:
            import aiosmtplib as smtp

            what = f"{self.name} → {mask(to)}"
            if isinstance(exc, smtp.SMTPRecipientsRefused):
                refused = exc.recipients[0]
                raise _refusal(
                    what, refused.code, _reply(refused.code, refused.message, to)
                ) from None
            raise TransientError(f"{what}: notice not sent ({type(exc).__name__})") from None
        log.info("%s: notice %s sent to %s", self.name, message_id, mask(to))
        return message_id

    @property
    def signs(self) -> bool:
        """DKIM-signs what it sends."""
        return self.config.dkim_selector is not None

    def sign(self, data: bytes, headers: list[str]) -> bytes:
        """`data` with a DKIM-Signature in front covering these of its `headers`.

        dkimpy computes RSA in Python (about 10 ms a message): `send` runs it on a
        thread so the event loop keeps serving the other channels meanwhile."""
        if self.config.dkim_selector is None or self.config.dkim_private_key is None:
            return data
        try:
            dkim = importlib.import_module("dkim")  # dkimpy: an optional extra
        except ImportError:
            raise ChannelBrokenError(
                f"{self.name}: DKIM is configured but dkimpy is not installed "
                "(pip install 'incident-broadcaster[dkim]')"
            ) from None
        key = self.secret(self.config.dkim_private_key)
        if key is None:
            raise ChannelBrokenError(
                f"{self.name}: DKIM key not found in {self.config.dkim_private_key.describe()}"
            )
        present = {h.lower() for h in headers}
        signed = [h.lower().encode() for h in DKIM_HEADERS if h.lower() in present]
        try:
            signature = dkim.sign(
                data,
                self.config.dkim_selector.encode(),
                (self.config.dkim_domain or self.domain).encode(),
                key.get_secret_value().encode(),
                # relaxed/relaxed: survives relays that re-fold headers or re-wrap lines.
                canonicalize=(b"relaxed", b"relaxed"),
                include_headers=signed,
                linesep=b"\r\n",
            )
        except dkim.DKIMException as exc:
            raise ChannelBrokenError(
                f"{self.name}: cannot sign with the DKIM key ({type(exc).__name__}: {exc})"
            ) from None
        return bytes(signature) + data

    async def send(self, message: Message) -> Receipt:
        mail, message_id = self.compose(message)
        address = str(message.recipient.address)
        data = mail.as_bytes()
        if self.signs:
            data = await asyncio.to_thread(self.sign, data, list(mail.keys()))
        options = [] if address.isascii() else ["SMTPUTF8"]
        if self._pool is None:
            await self.start()
        assert self._pool is not None
        try:
            await self._pool.send(self._from.addr_spec, address, data, options)
        except Exception as exc:
            raise self._send_error(exc, message) from exc
        log.debug("%s: sent %s to %s", self.name, message_id, mask(address))
        return Receipt(provider_id=message_id)

    def _send_error(self, exc: BaseException, message: Message) -> DeliveryError:
        """What the server's answer to one message means for it, its channel, or both."""
        import aiosmtplib as smtp

        if isinstance(exc, DeliveryError):
            return exc  # opening a session failed, already classified
        address = message.recipient.address
        what = f"{self.name} → subscriber #{message.recipient.id}"
        if isinstance(exc, smtp.SMTPRecipientsRefused):
            refused = exc.recipients[0]
            return _refusal(what, refused.code, _reply(refused.code, refused.message, address))
        if isinstance(exc, smtp.SMTPSenderRefused):
            return self._sender_refused(exc, what)
        if isinstance(exc, smtp.SMTPResponseException):  # DATA, or a 421 at any point
            return _refusal(what, exc.code, _reply(exc.code, exc.message, address))
        if isinstance(exc, smtp.SMTPNotSupported):
            return PermanentError(f"{what}: {exc} (the address needs SMTPUTF8)")
        if isinstance(exc, ValueError):
            reason = _reply(0, str(exc), address).removeprefix("0 ")
            return PermanentError(f"{what}: the address cannot be sent to ({reason})")
        # Dropped or timed out mid-message: it may have gone through. The retry carries
        # the same Message-ID, which lets mail clients show one copy.
        if isinstance(exc, smtp.SMTPTimeoutError | TimeoutError):
            return TransientError(f"{what}: no answer within {self.config.timeout_seconds:g} s")
        if isinstance(exc, smtp.SMTPServerDisconnected | OSError):
            return TransientError(f"{what}: connection lost ({type(exc).__name__})")
        if isinstance(exc, smtp.SMTPException):
            return TransientError(f"{what}: {exc}")
        return TransientError(f"{what}: {type(exc).__name__}")

    def _sender_refused(self, exc: SMTPSenderRefused, what: str | None) -> DeliveryError:
        """MAIL FROM refused: a refusal of our sender is the whole channel's problem."""
        reply = _reply(exc.code, exc.message, None)
        if exc.code == 530:
            return ChannelBrokenError(_must_secure(f"{self.name}: {self.where}", reply))
        if 400 <= exc.code < 500:
            return TransientError(f"{what or self.name}: {reply}")
        return ChannelBrokenError(
            f"{self.name}: the server refused the sender {self._from.addr_spec} ({reply}) "
            "— from_address must be an address this account may send as"
        )

    # --- doctor ------------------------------------------------------------------------

    async def check_config(self) -> list[str]:
        """Connect, EHLO, STARTTLS and log in as configured; sign a sample if DKIM is
        on. No mail is sent."""
        problems = await super().check_config()
        if problems:
            return problems
        if self.config.security == "none" and self.config.username:
            problems.append(
                f'{self.name}: security = "none" would send the password unencrypted — '
                'use "starttls" (port 587) or "tls" (port 465)'
            )
        unsubscribe = self.config.unsubscribe_url
        if unsubscribe is not None and unsubscribe.startswith("http://"):
            problems.append(
                f"{self.name}: unsubscribe_url is http:// — one-click unsubscribe (RFC 8058), "
                "which Gmail and Yahoo require of bulk senders, needs https://"
            )
        if self.config.dkim_selector is not None:
            try:
                self.sign(b"From: <check@example.com>\r\n\r\ncheck\r\n", ["From"])
            except DeliveryError as exc:
                problems.append(str(exc))
        try:
            smtp = await self._open_session()
        except DeliveryError as exc:
            problems.append(f"{exc} — connecting to {self.where} failed")
            return problems
        from aiosmtplib import SMTPException, SMTPSenderRefused

        try:
            # MAIL FROM, then RSET: is our sender accepted (530 "authentication
            # required", 553 "sender not owned")? Nothing is sent.
            await smtp.mail(self._from.addr_spec)
            await smtp.rset()
        except SMTPSenderRefused as exc:
            problems.append(str(self._sender_refused(exc, None)))
        except (SMTPException, OSError) as exc:
            problems.append(str(self._session_error(exc)))
        finally:
            await _quit(smtp)
        return problems


def _references(root: PostRef, parent: PostRef) -> list[str]:
    ids = [_msg_id(root.provider_id), _msg_id(parent.provider_id)]
    return ids[:1] if ids[0] == ids[1] else ids


def _refusal(what: str, code: int, reply: str) -> DeliveryError:
    """A server's refusal of one message: 4xx try again, 5xx never (for this recipient),
    unless it says we may not send at all."""
    if code == 530:
        return ChannelBrokenError(_must_secure(what, reply))
    if 400 <= code < 500:
        return TransientError(f"{what}: {reply}")
    # "554 5.7.1 Relay access denied": not this recipient's fault but ours (not logged
    # in, wrong relay); every recipient would fail the same way.
    if code >= 500 and "relay" in reply.lower() and "5.7." in reply:
        return ChannelBrokenError(
            f"{what}: the server will not relay for us ({reply}) — log in, or use the "
            "relay this account may send through"
        )
    if code >= 500:
        return PermanentError(f"{what}: {reply}")
    return TransientError(f"{what}: {reply}")


def _must_secure(what: str, reply: str) -> str:
    return (
        f"{what}: the server requires STARTTLS or a login first ({reply}) — set "
        'security = "starttls" (or "tls") and username/password'
    )


def _tls_failure(what: str, exc: BaseException, security: Security) -> str:
    error = exc if isinstance(exc, ssl.SSLError) else exc.__cause__
    reason = getattr(error, "verify_message", None) or getattr(error, "reason", None) or error
    if isinstance(error, ssl.SSLCertVerificationError):
        return (
            f"{what}: TLS failed, the server's certificate is not trusted ({reason}) — "
            "check host, or set ca_file if the relay uses a private CA"
        )
    hint = ""
    if security == "tls":
        hint = ' — if this port expects STARTTLS (587, 25), set security = "starttls"'
    return f"{what}: TLS failed ({reason}){hint}"


def _os_reason(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    text = str(exc)
    return text.rsplit(": ", 1)[-1] if text else type(exc).__name__
