"""Turning stored deliveries into sent messages: workers, retries, rate limits, backends."""

from broadcaster.dispatch.backend import DispatchBackend, EmbeddedBackend
from broadcaster.dispatch.dispatcher import Dispatcher

__all__ = ["DispatchBackend", "Dispatcher", "EmbeddedBackend"]
