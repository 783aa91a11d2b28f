"""Log lines of `broadcaster serve`: JSON lines or text, and never a secret.

One handler on the root logger writes every logger's records, uvicorn's access log
included. Structured facts travel as `extra=` (incident_id, update_id, channel,
delivery_id, source, outcome, …) and become JSON keys or `key=value` in text. Redaction
happens once, on the finished line, so it covers the message, its arguments, extras and
tracebacks alike.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Literal
from urllib.parse import quote, urlsplit

from broadcaster.secrets import resolved_values, secret_refs

if TYPE_CHECKING:
    from broadcaster.core import Broadcaster

LogFormat = Literal["auto", "json", "text"]

REDACTED = "[redacted]"
# Shorter values would blank out ordinary words; a secret that short protects nothing.
MIN_SECRET_LENGTH = 4
# Safety nets for credentials no setting names: a bearer token, an Authorization value.
_CREDENTIALS = re.compile(
    r"""(?i)(\bbearer\s+|\bauthorization["']?\s*[:=]\s*["']?(?:bearer\s+)?)[^\s"',;}]+"""
)
# The attributes every LogRecord has; anything else on a record came as `extra=`.
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",  # uvicorn's coloured copy of the message
}


def extras(record: logging.LogRecord) -> dict[str, object]:
    """The structured fields a record was logged with."""
    return {key: value for key, value in vars(record).items() if key not in _STANDARD}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: timestamp, level, logger, message, then the extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **extras(record),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: message key=value …` for a person at a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        fields = "".join(f" {key}={value}" for key, value in extras(record).items())
        return super().formatMessage(record) + fields


class AccessLogFields(logging.Filter):
    """uvicorn's access lines as fields (client, method, path, status), the query string
    dropped: tokens ride in query strings more often than anyone admits."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if record.name == "uvicorn.access" and isinstance(args, tuple) and len(args) == 5:
            client, method, full_path, http_version, status = args
            path = str(full_path).partition("?")[0]
            record.msg, record.args = "%s %s %s", (method, path, status)
            record.client = client
            record.method = method
            record.path = path
            record.status = status
            record.http_version = http_version
        return True


class Redactor:
    """Blanks the values of the configured secrets, and bearer credentials, in a line.

    The secrets are read again at most every `refresh_seconds`, so a rotated secret is
    redacted too."""

    def __init__(
        self,
        secrets: Callable[[], Iterable[str]],
        *,
        refresh_seconds: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._secrets = secrets
        self._refresh_seconds = refresh_seconds
        self._clock = clock
        self._read_at = float("-inf")
        self._pattern: re.Pattern[str] | None = None

    def __call__(self, text: str) -> str:
        if self._clock() - self._read_at >= self._refresh_seconds:
            self._refresh()
        if self._pattern is not None:
            text = self._pattern.sub(REDACTED, text)
        return _CREDENTIALS.sub(lambda match: match[1] + REDACTED, text)

    def _refresh(self) -> None:
        self._read_at = self._clock()
        try:
            values = set(self._secrets())
        except Exception:  # an unreadable secret file must not stop logging
            return
        forms = {form for value in values for form in _written_forms(value)}
        forms = {form for form in forms if len(form) >= MIN_SECRET_LENGTH}
        # Longest first: a URL is blanked whole before its path would be.
        alternatives = sorted(forms, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, alternatives))) if forms else None


def _written_forms(secret: str) -> set[str]:
    """How a secret may appear in a line: as is, escaped in JSON, percent-encoded, and for
    a URL (a heartbeat URL is its own credential) the path and query without the host."""
    forms = {secret.strip(), json.dumps(secret, ensure_ascii=False)[1:-1], quote(secret, safe="")}
    parts = urlsplit(secret)
    if parts.scheme in ("http", "https") and parts.netloc:
        forms.add(parts.path + (f"?{parts.query}" if parts.query else ""))
    return forms


class RedactingFormatter(logging.Formatter):
    """Formats with `inner`, then redacts the whole line."""

    def __init__(self, inner: logging.Formatter, redact: Callable[[str], str]) -> None:
        super().__init__()
        self.inner = inner
        self.redact = redact

    def format(self, record: logging.LogRecord) -> str:
        return self.redact(self.inner.format(record))


def configured_secrets(broadcaster: Broadcaster) -> Callable[[], set[str]]:
    """What no line may show: every secret the settings and the channels name (hook
    tokens and HMAC secrets, metrics and API tokens, heartbeat URLs, provider keys), as
    they read at each call."""
    refs = [*secret_refs(broadcaster.settings)]
    refs += [ref for channel in broadcaster.channels.values() for ref in channel.secrets().values()]
    base_dir = broadcaster.settings.resolve_path(Path("."))
    return lambda: resolved_values(refs, base_dir)


def chosen_format(log_format: LogFormat, stream: IO[str]) -> Literal["json", "text"]:
    """`auto`: text for a person at a terminal, JSON lines for a log collector."""
    if log_format == "auto":
        return "text" if stream.isatty() else "json"
    return log_format


def log_handler(
    log_format: LogFormat,
    secrets: Callable[[], Iterable[str]],
    stream: IO[str] | None = None,
) -> logging.Handler:
    """A handler writing every record in `log_format`, access lines as fields, redacted."""
    stream = stream if stream is not None else sys.stderr
    handler = logging.StreamHandler(stream)
    handler.addFilter(AccessLogFields())
    inner = JsonFormatter() if chosen_format(log_format, stream) == "json" else TextFormatter()
    handler.setFormatter(RedactingFormatter(inner, Redactor(secrets)))
    return handler


def configure_logging(
    log_format: LogFormat,
    secrets: Callable[[], Iterable[str]],
    *,
    level: int = logging.INFO,
    stream: IO[str] | None = None,
) -> logging.Handler:
    """Make `log_handler` the root logger's only handler, at `level`."""
    handler = log_handler(log_format, secrets, stream)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler
