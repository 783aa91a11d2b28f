"""Provider simulators on 127.0.0.1 for `broadcaster demo`, drills and tests."""

from broadcaster.sandbox.webhook_receiver import Behaviour, Received, WebhookReceiver

__all__ = ["Behaviour", "Received", "WebhookReceiver"]
