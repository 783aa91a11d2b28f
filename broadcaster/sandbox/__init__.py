"""Provider simulators on 127.0.0.1 for `broadcaster demo`, drills and tests."""

from broadcaster.sandbox.bluesky import FakePds, PdsRecord, XrpcFailure
from broadcaster.sandbox.discord import FakeDiscord as FakeDiscord
from broadcaster.sandbox.mastodon import FakeMastodon as FakeMastodon
from broadcaster.sandbox.slack import SlackFailure, SlackWebApi
from broadcaster.sandbox.smtp import FakeSmtp as FakeSmtp
from broadcaster.sandbox.teams import FakeTeamsWorkflow as FakeTeamsWorkflow
from broadcaster.sandbox.telegram import BotApiFault, FakeChat, FakeTelegram
from broadcaster.sandbox.twilio import FakeTwilio as FakeTwilio
from broadcaster.sandbox.webhook_receiver import Behaviour, Received, WebhookReceiver

__all__ = [
    "Behaviour",
    "BotApiFault",
    "FakeChat",
    "FakePds",
    "FakeTelegram",
    "PdsRecord",
    "Received",
    "SlackFailure",
    "SlackWebApi",
    "WebhookReceiver",
    "XrpcFailure",
]
