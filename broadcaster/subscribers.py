"""Subscribers as people give them: phone numbers normalised to E.164 (`phonenumbers`),
emails validated (`email-validator`), CSV rows read with a reason for each one refused,
and addresses masked for logs.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from pydantic import ValidationError

from broadcaster.errors import BroadcasterError
from broadcaster.models import AddressKind, NewSubscriber

__all__ = [
    "CSV_COLUMNS",
    "Address",
    "InvalidSubscriberError",
    "check_csv",
    "mask",
    "normalise_email",
    "normalise_phone",
    "read_csv",
]

# Columns a CSV may have (a header row names them); `components` and `channels` are
# separated by spaces or semicolons.
_HOST_PREFIX = re.compile(r"^[A-Za-z0-9.:-]*")
_USER_ID = re.compile(r"[0-9]{1,20}")  # ASCII digits: isdigit() takes "²³⁴" too
CSV_COLUMNS = ("phone", "email", "language", "components", "timezone", "channels")


class InvalidSubscriberError(BroadcasterError):
    """A phone number, email or row that cannot be a subscriber; says why."""


@dataclass(frozen=True)
class Address:
    """A subscriber's normalised addresses."""

    phone: str | None
    email: str | None
    telegram: str | None = None
    webhook_url: str | None = None

    def of(self, kind: AddressKind) -> str | None:
        value: str | None = getattr(self, kind.field)
        return value

    def masked(self) -> str:
        """Every address they have, as logs may show it."""
        given = [self.of(kind) for kind in AddressKind]
        return ", ".join(mask(a) for a in given if a) or "-"


def normalise_phone(raw: str, region: str | None) -> str:
    """E.164 (+33612345678), or InvalidSubscriberError saying what is wrong."""
    import phonenumbers

    try:
        number = phonenumbers.parse(raw, region)
    except phonenumbers.NumberParseException as exc:
        hint = "" if region else " (write it with +country code, or set subscribers.default_region)"
        raise InvalidSubscriberError(f"phone '{raw}' is not a phone number{hint}: {exc}") from None
    if not phonenumbers.is_valid_number(number):
        raise InvalidSubscriberError(f"phone '{raw}' is not a valid number")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def normalise_email(raw: str) -> str:
    """The address as mail systems compare it, or InvalidSubscriberError."""
    from email_validator import EmailNotValidError, validate_email

    try:
        return validate_email(raw.strip(), check_deliverability=False).normalized
    except EmailNotValidError as exc:
        raise InvalidSubscriberError(f"email '{raw}' is not valid: {exc}") from None


def normalise_telegram(raw: str) -> str:
    """A Telegram user id (a private chat with the bot), or InvalidSubscriberError."""
    value = raw.strip()
    if not _USER_ID.fullmatch(value):
        raise InvalidSubscriberError(f"telegram '{raw}' is not a Telegram user id")
    return value


def normalise(new: NewSubscriber, region: str | None) -> Address:
    """Every address given, normalised; at least one is required. A webhook URL is only
    checked for its form here (see `broadcaster.safe_url` for where it points)."""
    from broadcaster.safe_url import normalise_url

    address = Address(
        phone=normalise_phone(new.phone, region) if new.phone else None,
        email=normalise_email(new.email) if new.email else None,
        telegram=normalise_telegram(new.telegram) if new.telegram else None,
        webhook_url=normalise_url(new.webhook_url) if new.webhook_url else None,
    )
    if not any(address.of(kind) for kind in AddressKind):
        raise InvalidSubscriberError(
            "a subscriber needs a phone number, an email, a Telegram id or a webhook URL"
        )
    return address


def mask(address: str | None) -> str:
    """An address as logs may show it: +336•••••78, j•••@example.com."""
    if not address:
        return "-"
    if "://" in address:  # a webhook URL: only scheme, host and port; the rest may be a token
        from urllib.parse import urlsplit

        try:
            parts = urlsplit(address)
            port = parts.port
        except ValueError:
            return "•••"
        # Up to the first character no host name has (`h;token=…` parses as a host).
        host = _HOST_PREFIX.findall(parts.hostname or "")[0] or "•••"
        host = f"[{host}]" if ":" in host else host
        return f"{parts.scheme}://{host}{f':{port}' if port else ''}/•••"
    if "@" in address:
        local, _, domain = address.partition("@")
        return f"{local[:1]}•••@{domain}"
    if not address.startswith("+"):  # a Telegram user id: short, so nearly all hidden
        return f"tg•••{address[-2:]}"
    return f"{address[:4]}•••••{address[-2:]}" if len(address) > 6 else "•••"


def _split(value: str | None) -> list[str] | None:
    parts = [p for p in (value or "").replace(";", " ").split() if p]
    return parts or None


def _not_csv(lines_read: int, exc: csv.Error) -> InvalidSubscriberError:
    # The csv module fails on the line after the last one it finished reading.
    return InvalidSubscriberError(f"line {lines_read + 1}: not CSV: {exc}")


def check_csv(lines: Iterable[str]) -> None:
    """InvalidSubscriberError when some row of the text cannot be read as CSV (a NUL
    byte, a field past the csv module's limit): a first pass, so that such a file is
    refused before any of its rows is stored."""
    reader = csv.reader(lines)
    finished = 0  # lines read by the last row the csv module returned
    try:
        for _ in reader:
            finished = reader.line_num
    except csv.Error as exc:
        raise _not_csv(finished, exc) from None


def read_csv(lines: Iterable[str]) -> Iterator[tuple[int, NewSubscriber | str]]:
    """(line number, subscriber or the reason the row is refused) for each data row; the
    first row names the columns (see CSV_COLUMNS, in any case). InvalidSubscriberError
    when the header is wrong or the text is not CSV."""
    reader = csv.DictReader(lines)
    try:
        fieldnames = reader.fieldnames
    except csv.Error as exc:
        raise _not_csv(reader.line_num, exc) from None
    unknown = [c for c in fieldnames or () if c and c.strip().lower() not in CSV_COLUMNS]
    if not fieldnames or unknown:
        raise InvalidSubscriberError(
            f"CSV header must name columns among {', '.join(CSV_COLUMNS)}"
            + (f"; unknown: {', '.join(unknown)}" if unknown else "")
        )
    while True:
        # A row the csv module cannot split (a NUL byte, a field past its size limit)
        # leaves the reader nowhere sure to resume: the file is refused whole.
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise _not_csv(reader.line_num, exc) from None
        line = reader.line_num
        values = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k}
        try:
            yield (
                line,
                NewSubscriber(
                    phone=values.get("phone") or None,
                    email=values.get("email") or None,
                    language=values.get("language") or "en",
                    components=_split(values.get("components")),
                    timezone=values.get("timezone") or None,
                    channels=_split(values.get("channels")),
                ),
            )
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(p) for p in error["loc"])
            yield line, f"{where}: {error['msg']}"
