"""Which simulator stands in for each built-in channel type, and how a channel's config is
pointed at it.

`broadcaster demo` and `broadcaster playbook drill` both start from channel configs as a
person writes them — the real provider's endpoints, secrets as `{env = …}` — and need
the same channels on local simulators: the same languages, limits, rate limits, retries
and ids (Slack channels, Telegram chats, webhook target names, the Twilio account), but
every endpoint on 127.0.0.1 and the simulator's credentials instead of the real ones, in
owner-only files. That knowledge lives here, once per adapter type (`STAND_INS`); nothing
here reads a real secret.

A stand-in is told the channels it stands in for (`expect`), starts its simulator
(`start`), then rewrites each channel's config (`point`) and, for a subscriber channel,
makes up addresses its simulator accepts (`subscriber_address`). `local_endpoint_problems`
checks a rewritten config by construction: any URL or host in it that is not the
loopback is reported.
"""

from __future__ import annotations

import base64
import copy
import os
import secrets
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from contextlib import AbstractAsyncContextManager, AsyncExitStack, nullcontext
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar, Generic, TypeVar, cast
from urllib.parse import quote, urlsplit

from broadcaster.sandbox.bluesky import FakePds
from broadcaster.sandbox.discord import FakeDiscord
from broadcaster.sandbox.mastodon import DEFAULT_TOKEN as MASTODON_TOKEN
from broadcaster.sandbox.mastodon import FakeMastodon
from broadcaster.sandbox.server import SimulatorServer
from broadcaster.sandbox.slack import DEFAULT_TOKEN as SLACK_TOKEN
from broadcaster.sandbox.slack import SlackWebApi
from broadcaster.sandbox.smtp import FakeSmtp
from broadcaster.sandbox.teams import FakeTeamsWorkflow
from broadcaster.sandbox.telegram import FakeChat, FakeTelegram
from broadcaster.sandbox.twilio import DEFAULT_AUTH_TOKEN as TWILIO_AUTH_TOKEN
from broadcaster.sandbox.twilio import FakeTwilio
from broadcaster.sandbox.webhook_receiver import WebhookReceiver

__all__ = [
    "STAND_INS",
    "BannerStandIn",
    "BlueskyStandIn",
    "DiscordStandIn",
    "EmailStandIn",
    "MastodonStandIn",
    "SecretFiles",
    "SlackStandIn",
    "SmsStandIn",
    "StandIn",
    "TeamsStandIn",
    "TelegramStandIn",
    "WebhookStandIn",
    "local_endpoint_problems",
    "stand_in_for",
]

LOOPBACK = "127.0.0.1"
S = TypeVar("S")
H = TypeVar("H", bound=SimulatorServer)


class SecretFiles:
    """The simulators' credentials as owner-only (0600) files under `folder/secrets`,
    named in a config as `{file = "secrets/NAME"}` (relative to the config's folder)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.values: list[str] = []  # what was written, for `local_endpoint_problems`

    def ref(self, name: str, value: str) -> dict[str, str]:
        """Write secret `name` (replacing a previous run's) and name it for a config."""
        path = self.folder / "secrets" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        # Created 0600 at once: never readable by others, not even for a moment.
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(value)
        self.values.append(value)
        return {"file": f"secrets/{name}"}


class StandIn(ABC, Generic[S]):
    """A simulator standing in for the provider of the channels it expects (all of one
    adapter type)."""

    provider: ClassVar[str]  # the provider's name, for lines a person reads
    # The real provider's endpoints and credentials: never copied into a rewritten config.
    replaced: ClassVar[frozenset[str]] = frozenset()

    def __init__(self) -> None:
        self.configs: dict[str, dict[str, Any]] = {}
        self._simulator: S | None = None
        self._started = False

    def expect(self, name: str, config: Mapping[str, Any]) -> None:
        """Stand in for channel `name` (its config as written); before `start`."""
        self.configs[name] = copy.deepcopy(dict(config))

    async def start(self, stack: AsyncExitStack) -> S:
        """Start the simulator, stopped when `stack` closes."""
        self._simulator = await stack.enter_async_context(self._simulator_for_expected())
        self._started = True
        return self._simulator

    @abstractmethod
    def _simulator_for_expected(self) -> AbstractAsyncContextManager[S]:
        """A simulator that knows the expected channels' ids and accounts."""

    @property
    def simulator(self) -> S:
        if not self._started:
            raise RuntimeError(f"the {self.provider} stand-in is not started")
        return cast(S, self._simulator)  # None for a stand-in without a server

    @property
    @abstractmethod
    def where(self) -> str:
        """Where the simulator listens (once started)."""

    def point(self, name: str, files: SecretFiles) -> dict[str, Any]:
        """Channel `name`'s config on the simulator: everything as written but the real
        endpoints and credentials, which are the simulator's (secrets in `files`)."""
        written = self.configs[name]
        config = {key: value for key, value in written.items() if key not in self.replaced}
        config.update(self._on_simulator(name, written, files))
        return config

    @abstractmethod
    def _on_simulator(
        self, name: str, written: Mapping[str, Any], files: SecretFiles
    ) -> dict[str, Any]:
        """The keys that point channel `name` at the simulator."""

    def subscriber_address(self, name: str, number: int) -> str:
        """An address the simulator accepts for made-up subscriber `number` of channel
        `name` (unique across channels); only subscriber channels are asked."""
        raise NotImplementedError(f"{self.provider} has no subscribers")


class HttpStandIn(StandIn[H]):
    """A stand-in whose simulator is an HTTP server: it is where its URL says."""

    @property
    def where(self) -> str:
        return self.simulator.url


class WebhookStandIn(HttpStandIn[WebhookReceiver]):
    """Webhook targets become receiver targets with the same names; a subscriber channel
    reaches made-up subscribers' URLs on the receiver (allowed: 127.0.0.0/8 over http)."""

    provider = "webhook receiver"
    replaced = frozenset({"targets", "secret", "allow_networks", "allow_http", "ca_file"})

    def __init__(self) -> None:
        super().__init__()
        # Standard Webhooks secret: whsec_ + base64 of the key bytes.
        self.secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()

    def _simulator_for_expected(self) -> AbstractAsyncContextManager[WebhookReceiver]:
        return WebhookReceiver(secret=self.secret)

    def _on_simulator(
        self, name: str, written: Mapping[str, Any], files: SecretFiles
    ) -> dict[str, Any]:
        from channels.webhook import WebhookTarget, target_label

        config: dict[str, Any] = {}
        if written.get("secret") is not None:  # signed as configured
            config["secret"] = files.ref(f"{name}-secret", self.secret)
        if written.get("subscribers"):
            config.update(allow_networks=["127.0.0.0/8"], allow_http=True)
            return config
        targets = []
        for raw in written.get("targets") or []:
            target = WebhookTarget.model_validate({"url": raw} if isinstance(raw, str) else raw)
            # Named as the real one, so deliveries show the same recipients; an unnamed
            # target's label (host#hash) is not a URL path, hence quoted.
            label = target_label(target)
            targets.append({"name": label, "url": self.simulator.target(quote(label, safe=""))})
        config["targets"] = targets
        return config

    def subscriber_address(self, name: str, number: int) -> str:
        return self.simulator.target(quote(f"{name}-subscriber-{number:06d}", safe=""))


class BannerStandIn(StandIn[None]):
    """No simulator: the banner writes files. A relative `output` stays (it lands next to
    the rewritten config); an absolute one, or a bucket, becomes a folder there."""

    provider = "status page files"
    replaced = frozenset(
        {
            "output",
            "bucket",
            "prefix",
            "endpoint_url",
            "region",
            "path_style",
            "access_key_id",
            "secret_access_key",
        }
    )

    def _simulator_for_expected(self) -> AbstractAsyncContextManager[None]:
        return nullcontext()  # nothing to start

    @property
    def where(self) -> str:
        return "files"

    def _on_simulator(
        self, name: str, written: Mapping[str, Any], files: SecretFiles
    ) -> dict[str, Any]:
        output = written.get("output")
        path = PurePosixPath(str(output)) if output is not None else None
        if path is None or path.is_absolute() or ".." in path.parts or written.get("bucket"):
            path = PurePosixPath(f"site-{name}")
        return {"output": str(path)}


class SlackStandIn(HttpStandIn[SlackWebApi]):
    """Slack's Web API, with the expected channels' Slack channel ids."""

    provider = "Slack"
    replaced = frozenset({"token", "base_url"})

    def _simulator_for_expected(self) -> AbstractAsyncContextManager[SlackWebApi]:
        ids = [str(c) for config in self.configs.values() for c in config.get("channels", [])]
        return SlackWebApi(tokens=(SLACK_TOKEN,), channels=tuple(dict.fromkeys(ids)))

    def _on_simulator(
        self, name: str, written: Mapping[str, Any], files: SecretFiles
    ) -> dict[str, Any]:
        return {
            "token": files.ref(f"{name}-token", SLACK_TOKEN),
            "base_url": self.simulator.api_url,
        }


# Private chats (a subscriber's) have positive ids; made-up ones start here.
_FIRST_TELEGRAM_USER = 7_000_000_000


class TelegramStandIn(HttpStandIn[FakeTelegram]):
    """Telegram's Bot API, with the expected chats (the same ids; an @username gets a
    made-up id) and, for a subscriber channel, a private chat per made-up subscriber."""

    provider = "Telegram"
    replaced = frozenset({"token", "base_url", "webhook_secret"})

    def __init__(self, *, token: str = "123456:sandbox-token") -> None:
        super().__init__()
        self.token = token

    def _simulator_for_expected(self) -> AbstractAsyncContextManager[FakeTelegram]:
        chats: dict[int, FakeChat] = {}
        for config in self.configs.values():
            for raw in config.get("chats", []):
                chat = str(raw)
                if chat.startswith("@"):
                    number = -1_009_000_000_000 - len(chats)
                    chats[number] = FakeChat(id=number, username=chat[1:], title=chat)
                else:
                    number = int(chat)
                    kind = "channel" if number < 0 else "private"
                    chats[number] = FakeChat(id=number, type=kind, title=chat)
        return FakeTelegram(token=self.token, chats=list(chats.values()))

    def _on_simulator(
        self, name: str, written: Mapping[str, Any], files: SecretFiles
    ) -> dict[str, Any]:
        config: dict[str, Any] = {
            "token": files.ref(f"{name}-token", self.token),
            "base_url": self.simulator.url,
        }
        if written.get("webhook_secret") is not None:
            # setWebhook's secret_token: 1-256 of A-Z a-z 0-9 _ -
            secret = secrets.token_urlsafe(24)
            config["webhook_secret"] = files.ref(f"{name}-webhook-secret", secret)
        return config

    def subscriber_address(self, name: str, number: int) -> str:
        user = _FIRST_TELEGRAM_USER + number
        self.simulator.add_chat(FakeChat(id=user, type="private", title=None))
        return str(user)


class BlueskyStandIn(HttpStandIn[FakePds]):
    """A PDS holding the expected channel's account (its handle), with a made-up app
    password."""

    provider = "Bluesky"
    replaced = frozenset({"app_password", "base_url"})

    def __init__(self) -> None:
        super().__init__()
        self.password = "-".join(secrets.token_hex(2) for _ in range(4))

    def _simulator_for_expected(self) -> AbstractAsyncContextManager[FakePds]:
        handles = {str(c.get("handle")) for c in self.configs.values()}
        if len(handles) != 1:
            raise ValueError(f"one Bluesky account per simulator, not {sorted(handles)}")
        return FakePds(handle=handles.pop(), password=self.password)

    def _on_simulator(
        self, name: str, written: Mapping[str, Any], files: SecretFiles
    ) -> dict[str, Any]:
        return {
            "app_password": files.ref(f"{name}-app-password", self.password),
            "base_url": self.simulator.url,
        }


class MastodonStandIn(HttpStandIn[FakeMastodon]):
    provider = "Mastodon"
    replaced = frozenset({"access_token", "base_url"})

    def _simulator_for_expected(self) -> AbstractAsyncContextManager[FakeMastodon]:
        return FakeMastodon()

    def _on_simulator(
        self, name: str, written: Mapping[str, Any], files: SecretFiles
    ) -> dict[str, Any]:
        return {
            "base_url": self.simulator.url,
            "access_token": files.ref(f"{name}-token", MASTODON_TOKEN),
        }


class DiscordStandIn(HttpStandIn[FakeDiscord]):
    """A Discord webhook (its URL is the credential), with the expected thread ids."""

    provider = "Discord"
    # avatar_url is fetched by Discord's servers, so never by the simulator: dropped all
    # the same, so that every URL in a rewritten config is local.
    replaced = frozenset({"webhook_url", "avatar_url"})

    def _simulator_for_expected(self) -> AbstractAsyncContextManager[FakeDiscord]:
        threads = [str(c["thread_id"]) for c in self.configs.values() if c.get("thread_id")]
        return FakeDiscord(threads=tuple(threads))

    def _on_simulator(
        self, name: str, written: Mapping[str, Any], files: SecretFiles
    ) -> dict[str, Any]:
        return {"webhook_url": files.ref(f"{name}-webhook-url", self.simulator.webhook_url)}


class TeamsStandIn(HttpStandIn[FakeTeamsWorkflow]):
    """A Workflows webhook per channel (its signed URL is the credential)."""

    provider = "Teams"
    replaced = frozenset({"webhook_url"})

    def _simulator_for_expected(self) -> AbstractAsyncContextManager[FakeTeamsWorkflow]:
        return FakeTeamsWorkflow()

    def _on_simulator(
        self, name: str, written: Mapping[str, Any], files: SecretFiles
    ) -> dict[str, Any]:
        url = self.simulator.add_workflow()
        return {"webhook_url": files.ref(f"{name}-webhook-url", url)}


# Made-up subscribers' numbers: French mobile numbers +33 6 99 …, all valid to
# phonenumbers, a million of them.
_PHONE = "+33699{:06d}"


class SmsStandIn(HttpStandIn[FakeTwilio]):
    """Twilio's Messages API, knowing the expected channels' Account SIDs (not secret).

    Without `receipts` (a drill: nothing answers Twilio's callbacks) no delivery receipt
    is asked for, and deliveries end `sent`, accepted by the provider."""

    provider = "Twilio"
    replaced = frozenset({"auth_token", "base_url", "status_callback_url"})

    def __init__(self, *, receipts: bool = False) -> None:
        super().__init__()
        self.receipts = receipts

    def _simulator_for_expected(self) -> AbstractAsyncContextManager[FakeTwilio]:
        accounts = {str(c["account_sid"]): TWILIO_AUTH_TOKEN for c in self.configs.values()}
        return FakeTwilio(accounts=accounts or None)

    def _on_simulator(
        self, name: str, written: Mapping[str, Any], files: SecretFiles
    ) -> dict[str, Any]:
        config: dict[str, Any] = {
            "auth_token": files.ref(f"{name}-auth-token", TWILIO_AUTH_TOKEN),
            "base_url": self.simulator.url,
        }
        if not self.receipts:
            config["status_callback"] = False
        return config

    def subscriber_address(self, name: str, number: int) -> str:
        return _PHONE.format(number)


class EmailStandIn(StandIn[FakeSmtp]):
    """An SMTP server on the loopback, in plain text without a login (DKIM keys, a CA
    file and the unsubscribe link are the real deployment's: dropped)."""

    provider = "SMTP"
    replaced = frozenset(
        {
            "host",
            "port",
            "security",
            "username",
            "password",
            "ca_file",
            "dkim_selector",
            "dkim_private_key",
            "dkim_domain",
            "unsubscribe_url",
            "helo_hostname",
        }
    )

    def _simulator_for_expected(self) -> AbstractAsyncContextManager[FakeSmtp]:
        return FakeSmtp()

    @property
    def where(self) -> str:
        return f"{LOOPBACK}:{self.simulator.port}"

    def _on_simulator(
        self, name: str, written: Mapping[str, Any], files: SecretFiles
    ) -> dict[str, Any]:
        # HELO as localhost: the machine's own name would be looked up in DNS.
        return {
            "host": LOOPBACK,
            "port": self.simulator.port,
            "security": "none",
            "helo_hostname": "localhost",
        }

    def subscriber_address(self, name: str, number: int) -> str:
        return f"subscriber-{number:06d}@example.com"


STAND_INS: dict[str, type[StandIn[Any]]] = {
    "webhook": WebhookStandIn,
    "banner": BannerStandIn,
    "slack": SlackStandIn,
    "telegram": TelegramStandIn,
    "bluesky": BlueskyStandIn,
    "mastodon": MastodonStandIn,
    "discord": DiscordStandIn,
    "teams": TeamsStandIn,
    "sms": SmsStandIn,
    "email": EmailStandIn,
}


def stand_in_for(channel_type: str) -> StandIn[Any] | None:
    """A fresh stand-in for a channel type, or None when no simulator exists for it (a
    third-party adapter — also one registered under a built-in type's name: its config
    may have keys the stand-in knows nothing of)."""
    from broadcaster.adapters import load_adapter

    kind = STAND_INS.get(channel_type)
    if kind is None or not load_adapter(channel_type).__module__.startswith("channels."):
        return None
    return kind()


def _strings(value: Any, where: str) -> Iterator[tuple[str, str]]:
    if isinstance(value, Mapping):
        for key, item in value.items():
            yield from _strings(item, f"{where}.{key}")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from _strings(item, f"{where}[{index}]")
    elif isinstance(value, str):
        yield where, value


def local_endpoint_problems(
    channels: Mapping[str, Mapping[str, Any]], files: SecretFiles
) -> list[str]:
    """Every URL (any `scheme://`) and `host` in rewritten channel configs and in the
    secrets written for them that is not the loopback, as 'channels.NAME.KEY: HOST'."""
    found = [*_strings(channels, "channels")]
    found += [("a secret file", value) for value in files.values]
    problems = []
    for where, value in found:
        if where.endswith(".host"):
            host: str | None = value
        elif "://" in value:
            try:
                host = urlsplit(value.strip()).hostname
            except ValueError:
                host = None
        else:
            continue
        if host != LOOPBACK:  # the host only: a URL may carry a credential
            problems.append(f"{where}: {host or 'a URL without a host'} is not {LOOPBACK}")
    return problems
