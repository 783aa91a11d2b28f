"""Signed, expiring tokens for self-service subscription (itsdangerous), and the keyed
digests that let the store count and check without holding what it counts.

One key, `subscribers.secret`, with a salt per purpose, so a token made for one purpose
never passes for another: a manage link is not a confirmation link, a form token is
neither. Tokens are signed, not encrypted: their payload (ids, a random nonce) is
readable, so it never holds an address.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets as random
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer
from itsdangerous.timed import TimestampSigner

if TYPE_CHECKING:
    from broadcaster.config import Settings
    from channels.base import Channel

__all__ = [
    "ExpiredToken",
    "InvalidToken",
    "Purpose",
    "TokenError",
    "Tokens",
    "leading_zero_bits",
    "manage_url_maker",
    "proof_of_work_seed",
    "self_service_problems",
    "signing_key",
    "solves",
]

# What a token is for; each is a salt, so a token of one purpose fails for another.
Purpose = Literal["confirm-email", "manage", "verify-sms", "form"]


class TokenError(Exception):
    """A token that cannot be used."""


class InvalidToken(TokenError):
    """Not signed with our key for this purpose: forged, truncated or for something else."""


class ExpiredToken(TokenError):
    """Signed by us, but older than it may be."""


class Tokens:
    """Signs and reads the tokens of one key; `now` is for tests (seconds since epoch)."""

    def __init__(self, key: str, *, now: Callable[[], float] = time.time) -> None:
        if not key:
            raise ValueError("an empty signing key signs nothing")
        self._key = key
        # A second key, derived, for digests: never the signing key itself.
        self._digest_key = hmac.new(key.encode(), b"broadcaster digests", "sha256").digest()

        clock = now

        class _Signer(TimestampSigner):
            def get_timestamp(self) -> int:
                return int(clock())

        self._signer = _Signer
        self._serializers: dict[str, URLSafeTimedSerializer] = {}

    def _serializer(self, purpose: Purpose) -> URLSafeTimedSerializer:
        serializer = self._serializers.get(purpose)
        if serializer is None:
            serializer = URLSafeTimedSerializer(self._key, salt=purpose, signer=self._signer)
            self._serializers[purpose] = serializer
        return serializer

    def sign(self, purpose: Purpose, payload: Any) -> str:
        """A URL-safe token carrying `payload` (JSON) and the time it was made."""
        return str(self._serializer(purpose).dumps(payload))

    def read(self, purpose: Purpose, token: str, *, max_age: float | None) -> tuple[Any, datetime]:
        """(payload, when it was signed); ExpiredToken past `max_age` seconds, InvalidToken
        for anything we did not sign for this purpose."""
        if not token or len(token) > 2000:
            raise InvalidToken("no token")
        serializer = self._serializer(purpose)
        try:
            payload, signed = serializer.loads(
                token, max_age=None if max_age is None else int(max_age), return_timestamp=True
            )
        except SignatureExpired:
            raise ExpiredToken(purpose) from None
        except BadSignature:
            raise InvalidToken(purpose) from None
        return payload, signed.astimezone(UTC)

    def digest(self, *parts: str) -> str:
        """A keyed hash (hex) of `parts`: the store keeps this instead of a code or an
        address, and without the key nobody can test guesses against it."""
        message = "\x1f".join(parts).encode()
        return hmac.new(self._digest_key, message, hashlib.sha256).hexdigest()

    @staticmethod
    def nonce() -> str:
        """A random value to make a token (or a stored row) unique."""
        return random.token_hex(8)


def signing_key(settings: Settings) -> str | None:
    """`subscribers.secret` resolved (env or file), or None when it cannot be read."""
    ref = settings.subscribers.secret
    if ref is None:
        return None
    value = ref.resolve(settings.resolve_path(Path(".")))
    return value.get_secret_value() if value is not None else None


def manage_url_maker(settings: Settings) -> Callable[[str], str | None]:
    """subscriber id -> their signed manage page URL, for every email's footer and
    List-Unsubscribe; None when self-service, serve.public_url or the key is missing.

    The key is read once, here (at `Broadcaster.open`)."""
    key = signing_key(settings) if settings.subscribers.self_service else None
    public_url = settings.serve.public_url
    if key is None or public_url is None:
        return lambda _subscriber_id: None
    tokens = Tokens(key)

    def manage_url(subscriber_id: str) -> str | None:
        if not subscriber_id.isdigit():
            return None
        return f"{public_url}/manage/{tokens.sign('manage', int(subscriber_id))}"

    return manage_url


# --- proof of work ---------------------------------------------------------------------


def proof_of_work_seed(challenge: str, address: str) -> bytes:
    """What the browser works on: the signed challenge bound to the address typed, so one
    solution is no good for another address."""
    return hashlib.sha256(f"{challenge}\n{address}".encode()).digest()


def leading_zero_bits(digest: bytes) -> int:
    value = int.from_bytes(digest, "big")
    return len(digest) * 8 - value.bit_length()


def solves(challenge: str, address: str, nonce: str, bits: int) -> bool:
    """True when sha256(seed + nonce) starts with `bits` zero bits; the nonce is 8
    lower-case hex digits (the page's script counts through them)."""
    if bits <= 0:
        return True
    if len(nonce) != 8 or any(c not in "0123456789abcdef" for c in nonce):
        return False
    seed = proof_of_work_seed(challenge, address)
    return leading_zero_bits(hashlib.sha256(seed + nonce.encode("ascii")).digest()) >= bits


# --- doctor ----------------------------------------------------------------------------


def self_service_problems(settings: Settings, channels: Mapping[str, Channel]) -> list[str]:
    """What stops the subscribe form from working as configured (for `doctor`)."""
    from broadcaster.models import AddressKind

    subscribers = settings.subscribers
    problems: list[str] = []
    if subscribers.secret is not None and signing_key(settings) is None:
        problems.append(
            f"subscribers.secret not found in {subscribers.secret.describe()} — the "
            "subscribe form answers 503 and emails carry no manage link"
        )
    public_url = settings.serve.public_url
    if public_url is not None and public_url.startswith("http://"):
        problems.append(
            "serve.public_url is http:// — one-click unsubscribe (RFC 8058), which Gmail and "
            "Yahoo require of bulk senders, needs https://"
        )
    kinds = {c.address_kind for c in channels.values() if hasattr(c, "send_notice")}
    if not kinds:
        problems.append("no email or sms channel can send confirmations — add one")
    if subscribers.sms_countries and AddressKind.PHONE not in kinds:
        problems.append("subscribers.sms_countries is set but no sms channel is configured")
    return problems
