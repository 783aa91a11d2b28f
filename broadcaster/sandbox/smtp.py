"""A real SMTP server on 127.0.0.1 for the email channel's demo and tests.

aiosmtpd's `Controller` runs it on a thread and event loop of its own, so the code under
test talks to it over a socket like to any relay. It keeps every message it accepted
(with the connection that brought it, so a test can count connections), answers scripted
4xx/5xx replies per recipient (to RCPT TO or to the DATA of a message for them), and can
offer STARTTLS or implicit TLS with a self-signed certificate (`ca_file` trusts it), ask
for a login, refuse every login, or refuse commands until STARTTLS.

aiosmtpd is a dev dependency: it is imported when a server starts, not with this module.
"""

from __future__ import annotations

import email
import email.policy
import ipaddress
import itertools
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self, cast

from broadcaster.sandbox.server import CallLog, FailureScript

if TYPE_CHECKING:
    import asyncio
    import ssl

    from aiosmtpd.controller import Controller

__all__ = ["FakeSmtp", "ReceivedMail", "SmtpReply", "self_signed_certificate"]

Security = Literal["none", "starttls", "tls"]


@dataclass(frozen=True)
class SmtpReply:
    """A scripted answer for one recipient: to its RCPT TO, or to the DATA of a message
    for it; used for its next `times` matching commands (None: every one)."""

    code: int
    text: str = ""
    at: Literal["rcpt", "data"] = "rcpt"
    times: int | None = 1

    def line(self) -> str:
        if self.text:
            return f"{self.code} {self.text}"
        default = {4: "4.3.0 Try again later", 5: "5.1.1 Mailbox unavailable"}
        return f"{self.code} {default.get(self.code // 100, 'Scripted reply')}"


@dataclass(frozen=True)
class ReceivedMail:
    """One message the server accepted, as the client sent it."""

    connection: int  # the connection that brought it: 1, 2, … in the order they opened
    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes  # the message as sent (CRLF line ends, DKIM signature included)
    login: str | None  # who logged in on that connection
    tls: bool

    @property
    def message(self) -> EmailMessage:
        """The message parsed (`email.policy.default`: headers decoded)."""
        return email.message_from_bytes(self.data, policy=email.policy.default)


def self_signed_certificate(folder: Path, host: str = "127.0.0.1") -> tuple[Path, Path]:
    """(certificate, key) PEM files of a new self-signed certificate for `host` and
    localhost; the certificate is also the CA file a client trusts it with."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.now(UTC)
    try:
        names: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(host))]
    except ValueError:
        names = [x509.DNSName(host)]
    names.append(x509.DNSName("localhost"))
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "smtp-cert.pem", folder / "smtp-key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


class FakeSmtp:
    """An SMTP server on 127.0.0.1: `with FakeSmtp() as smtp:` or `async with`.

    `security`: "none" (plain), "starttls" (offered; `require_tls` refuses mail until it
    is used) or "tls" (implicit, the port-465 way). `users` (login -> password) turns on
    AUTH and requires it; `refuse_auth` answers every login 535.
    """

    def __init__(
        self,
        *,
        security: Security = "none",
        require_tls: bool = False,
        users: Mapping[str, str] | None = None,
        refuse_auth: bool = False,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.security = security
        self.require_tls = require_tls
        self.users = dict(users or {})
        self.refuse_auth = refuse_auth
        self.host = host
        self._port = port
        self.mail: CallLog[ReceivedMail] = CallLog()
        self._replies: FailureScript[SmtpReply] = FailureScript()
        self._lock = threading.Lock()
        self._connections = itertools.count(1)
        self._opened = 0
        self._sessions: list[Any] = []  # aiosmtpd SMTP protocol instances
        self._controller: Controller | None = None
        self._folder: tempfile.TemporaryDirectory[str] | None = None
        self.ca_file: Path | None = None  # the certificate to trust, when TLS is on

    # --- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        """Listen (port 0: an ephemeral port, see `port`); returns once it answers."""
        from aiosmtpd.controller import Controller

        if self._controller is not None:
            raise RuntimeError("the SMTP fake is already running")
        tls = self._tls_context() if self.security != "none" else None
        fake = self

        class _Controller(Controller):
            def factory(self) -> Any:
                return fake._session_factory(self.handler, self.SMTP_kwargs)

            def _trigger_server(self) -> None:
                # Port 0: learn the port the OS chose before the readiness probe.
                server = cast("asyncio.Server", self.server)
                self.port = server.sockets[0].getsockname()[1]
                super()._trigger_server()  # type: ignore[no-untyped-call]

        kwargs: dict[str, Any] = {
            "decode_data": False,
            "require_starttls": self.require_tls and self.security == "starttls",
            "auth_require_tls": self.security != "none",
        }
        if self.security == "starttls":
            kwargs["tls_context"] = tls
        if self.users or self.refuse_auth:
            kwargs["authenticator"] = self._authenticate
            kwargs["auth_required"] = True
        controller = _Controller(
            _Handler(self),
            hostname=self.host,
            port=self._port,
            ssl_context=tls if self.security == "tls" else None,
            server_hostname="smtp.sandbox.test",
            **kwargs,
        )
        controller.start()
        self._controller = controller
        with self._lock:  # the readiness probe is not a client
            self._opened = 0
            self._sessions.clear()
        self._connections = itertools.count(1)

    def stop(self) -> None:
        controller, self._controller = self._controller, None
        if controller is not None:
            controller.stop()
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        import asyncio

        # start() waits for the server thread: not on the caller's event loop.
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        import asyncio

        await asyncio.to_thread(self.stop)

    @property
    def port(self) -> int:
        if self._controller is None:
            raise RuntimeError("the SMTP fake is not running")
        return int(self._controller.port)

    # --- scripting and inspection --------------------------------------------------

    def reply(self, address: str, *replies: SmtpReply) -> None:
        """Answer commands for `address` with these replies, in order, before accepting."""
        self._replies.add(address.lower(), *replies)

    @property
    def received(self) -> list[ReceivedMail]:
        """Every message accepted so far, oldest first."""
        return self.mail.snapshot()

    def to(self, address: str) -> list[ReceivedMail]:
        """The messages accepted for `address`."""
        return [m for m in self.received if address.lower() in (r.lower() for r in m.rcpt_tos)]

    @property
    def connections_opened(self) -> int:
        """Client connections accepted since start."""
        with self._lock:
            return self._opened

    def drop_connections(self) -> None:
        """Close every open client connection, the way a server's idle timeout does."""
        controller = self._controller
        if controller is None:
            return
        with self._lock:
            sessions = list(self._sessions)
        done = threading.Event()

        def close() -> None:
            for session in sessions:
                if session.transport is not None:
                    session.transport.close()
            done.set()

        controller.loop.call_soon_threadsafe(close)
        done.wait(5)

    # --- the server ----------------------------------------------------------------

    def _tls_context(self) -> ssl.SSLContext:
        import ssl

        self._folder = tempfile.TemporaryDirectory(prefix="fake-smtp-")
        cert, key = self_signed_certificate(Path(self._folder.name), self.host)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        self.ca_file = cert
        return context

    def _session_factory(self, handler: _Handler, kwargs: dict[str, Any]) -> Any:
        from aiosmtpd.smtp import SMTP

        session = SMTP(handler, **kwargs)
        session.connection_number = next(self._connections)  # type: ignore[attr-defined]
        with self._lock:
            self._opened += 1
            self._sessions.append(session)
        return session

    def _authenticate(
        self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> Any:
        from aiosmtpd.smtp import AuthResult, LoginPassword

        if self.refuse_auth or not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        login, password = auth_data.login.decode(), auth_data.password.decode()
        # handled=False: aiosmtpd answers 535 itself when the login is wrong.
        return AuthResult(
            success=self.users.get(login) == password, handled=False, auth_data=auth_data
        )

    def _scripted(self, address: str, at: str) -> SmtpReply | None:
        return self._replies.next(address.lower(), lambda r: r.at == at)


class _Handler:
    """aiosmtpd's handler hooks: scripted replies, then accept and record."""

    def __init__(self, fake: FakeSmtp) -> None:
        self.fake = fake

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        scripted = self.fake._scripted(address, "rcpt")
        if scripted is not None:
            return scripted.line()
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        for address in envelope.rcpt_tos:
            scripted = self.fake._scripted(address, "data")
            if scripted is not None:
                return scripted.line()
        login = getattr(session.auth_data, "login", None)
        self.fake.mail.record(
            ReceivedMail(
                connection=getattr(server, "connection_number", 0),
                mail_from=envelope.mail_from,
                rcpt_tos=tuple(envelope.rcpt_tos),
                data=bytes(envelope.original_content or envelope.content or b""),
                login=login.decode() if isinstance(login, bytes) else login,
                tls=server.transport.get_extra_info("ssl_object") is not None,
            )
        )
        return "250 2.0.0 Message accepted"
