"""The errors users and adapters see.

`BroadcasterError` subclasses carry one line a person can act on; the CLI prints it
and exits non-zero. `DeliveryError` subclasses are how an adapter classifies what a
provider said, once, at its edge: the dispatcher decides retries from the class alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from broadcaster.models import CheckFailure


class BroadcasterError(Exception):
    """A problem a person can fix; str() is the one-line explanation."""


class ConfigError(BroadcasterError):
    """broadcaster.toml (or the environment) is wrong; the message names the file and key."""


class NotFoundError(BroadcasterError):
    """An incident, update, template or channel that does not exist."""


class CheckFailedError(BroadcasterError):
    """An update failed its checks; nothing was stored or sent."""

    def __init__(self, failures: Sequence[CheckFailure]) -> None:
        self.failures = list(failures)
        lines = "; ".join(str(f) for f in self.failures)
        super().__init__(f"update failed {len(self.failures)} check(s): {lines}")


class DeliveryError(Exception):
    """Raised by an adapter's send; the message must never contain a secret."""


class TransientError(DeliveryError):
    """Try again later (rate limited, provider down, timeout)."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentError(DeliveryError):
    """This recipient will never accept this message (invalid number, unsubscribed, 4xx)."""


class PostGoneError(PermanentError):
    """The post to edit, delete or reply to is no longer there (deleted by hand, expired).
    A retraction counts it as deleted; a correction posts anew."""


class ChannelBrokenError(DeliveryError):
    """The whole channel is unusable (bad credentials): stop it, keep its deliveries queued."""
