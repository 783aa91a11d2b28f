"""`broadcaster playbook drill NAME`: a user's real config, every channel of the playbook
pointed at a local simulator, the playbook's update published and timed per channel.

The configs here name providers that cannot be reached (`*.invalid`, secrets from
variables the drill must never read): a drill that passes proves the deliveries went to
the simulators, and the rewritten config proves nothing pointed anywhere else."""

from __future__ import annotations

import json
import os
import stat
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import tomli_w
from click.testing import Result
from typer.testing import CliRunner

from broadcaster.cli import app
from broadcaster.sandbox import Behaviour, WebhookReceiver
from broadcaster.sandbox.stand_ins import SecretFiles, WebhookStandIn, local_endpoint_problems

# What a real deployment keeps in its environment: the drill must never read or copy it.
REAL_SECRETS = {
    "PARTNERS_WEBHOOK_SECRET": "whsec_cmVhbC1wYXJ0bmVycy1zZWNyZXQtZG8tbm90LWNvcHk=",
    "SLACK_BOT_TOKEN": "xoxb-real-slack-token-do-not-copy",
    "TELEGRAM_BOT_TOKEN": "987654:real-telegram-token-do-not-copy",
    "TWILIO_AUTH_TOKEN": "real-twilio-auth-token-do-not-copy",
    "SMTP_PASSWORD": "real-smtp-password-do-not-copy",
    "BUCKET_SECRET": "real-bucket-secret-do-not-copy",
}
FAST = {"backoff_seconds": 0.05, "backoff_max_seconds": 0.2, "deadline_seconds": 5}
TOTAL_OUTAGE = {
    "description": "Everything is down",
    "title": "Example Co. is down",
    "components": {"api": "major_outage", "app": "major_outage"},
    "fields": {"summary": "Our app and API are down. We are on it."},
    "next_update_in": "30m",
}
SUBSCRIBERS = 4


@pytest.fixture(autouse=True)
def environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No BROADCASTER_* variable from the developer's shell; the real secrets set."""
    for name in list(os.environ):
        if name.startswith("BROADCASTER_"):
            monkeypatch.delenv(name)
    for name, value in REAL_SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("COLUMNS", "200")  # rich never wraps a line the tests look for


def channels() -> dict[str, Any]:
    """One channel of each kind a team has, configured for the real providers."""
    env = {name.lower(): {"env": name} for name in REAL_SECRETS}
    return {
        "status-page": {
            "type": "banner",
            "languages": ["en", "fr"],
            "bucket": "acme-status",
            "endpoint_url": "https://r2.invalid",
            "access_key_id": {"env": "BUCKET_KEY_ID"},
            "secret_access_key": env["bucket_secret"],
        },
        "partners": {
            "type": "webhook",
            "languages": ["en", "fr"],
            "targets": [
                {"name": "ops-bridge", "url": "https://hooks.invalid/incidents"},
                {"name": "pager", "url": "https://pager.invalid/hook?token=abc"},
                "https://unnamed.invalid/status",  # named host#hash in deliveries
            ],
            "secret": env["partners_webhook_secret"],
            **FAST,
        },
        "slack-status": {
            "type": "slack",
            "token": env["slack_bot_token"],
            "channels": ["C0123456789", "C0987654321"],
            "base_url": "https://slack.invalid/api/",
            **FAST,
        },
        "telegram-status": {
            "type": "telegram",
            "token": env["telegram_bot_token"],
            "chats": ["@acme_status", -1001234567890],
            "languages": ["en", "fr"],
            **FAST,
        },
        "sms": {
            "type": "sms",
            "account_sid": "AC" + "0123456789abcdef" * 2,
            "auth_token": env["twilio_auth_token"],
            "from_number": "+15017122661",
            "languages": ["en", "fr"],
            "status_callback_url": "https://broadcaster.invalid/inbound/sms",
            "fallback": "email",
            "rate_limit": {"global_per_second": 50, "global_burst": 10},
            **FAST,
        },
        "email": {
            "type": "email",
            "host": "smtp.invalid",
            "username": "status@example.com",
            "password": env["smtp_password"],
            "from_address": "Example Co. <status@example.com>",
            "unsubscribe_url": "https://status.invalid/unsubscribe?s={subscriber}",
            "languages": ["en", "fr"],
            **FAST,
        },
    }


# The other built-in channel types, and subscriber channels of webhooks and Telegram.
OTHER_CHANNELS: dict[str, Any] = {
    "bluesky": {
        "type": "bluesky",
        "handle": "status.example.com",
        "app_password": {"env": "BLUESKY_APP_PASSWORD"},
        **FAST,
    },
    "mastodon": {
        "type": "mastodon",
        "base_url": "https://mastodon.invalid",
        "access_token": {"env": "MASTODON_TOKEN"},
        **FAST,
    },
    "discord": {
        "type": "discord",
        "webhook_url": {"env": "DISCORD_WEBHOOK_URL"},
        "avatar_url": "https://status.invalid/logo.png",
        "thread_id": "1200000000000000042",
        **FAST,
    },
    "teams": {"type": "teams", "webhook_url": {"env": "TEAMS_WEBHOOK_URL"}, **FAST},
    "hooks": {"type": "webhook", "subscribers": True, **FAST},
    "telegram-subscribers": {
        "type": "telegram",
        "token": {"env": "TELEGRAM_BOT_TOKEN"},
        "subscribers": True,
        "support_bot": True,
        "webhook_secret": {"env": "TELEGRAM_WEBHOOK_SECRET"},
        **FAST,
    },
}


def write_config(folder: Path, **extra: Any) -> Path:
    config: dict[str, Any] = {
        "store": "sqlite:///real.db",
        "page_title": "Example Co. status",
        "timezone": "Europe/Paris",
        "status_page_url": "https://status.example.com/",
        "dispatch": {"poll_seconds": 0.05, "lease_seconds": 5},
        "components": {"api": "Public API", "app": "Mobile app"},
        "channels": channels(),
        "cadence": {"notify": ["slack-status"]},
        "playbooks": {"total-outage": TOTAL_OUTAGE},
        **extra,
    }
    path = folder / "broadcaster.toml"
    path.write_text(tomli_w.dumps(config))
    return path


def drill(config: Path, *args: str) -> Result:
    return CliRunner().invoke(app, ["--config", str(config), "playbook", "drill", *args])


def files_under(folder: Path) -> Iterator[Path]:
    return (p for p in folder.rglob("*") if p.is_file())


def urls_and_hosts(value: Any, key: str = "") -> Iterator[str]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from urls_and_hosts(v, k)
    elif isinstance(value, list):
        for v in value:
            yield from urls_and_hosts(v, key)
    elif isinstance(value, str) and ("://" in value or key == "host"):
        yield value


@pytest.mark.timeout(60)
def test_drill_delivers_every_channel_to_simulators_and_nothing_to_real_providers(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path)
    folder = tmp_path / "drill"
    result = drill(config, "total-outage", "--dir", str(folder), "--subscribers", "4")
    assert result.exception is None, (result.exception, result.output)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "nothing real is sent: every provider endpoint in the drill's config is 127.0.0.1" in out
    assert "4 made-up subscribers on each of sms, email (never your real list)" in out
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") > 5}
    for channel, delivered in (
        ("status-page", "1/1"),
        ("partners", "3/3"),
        ("slack-status", "2/2"),
        ("telegram-status", "2/2"),
        ("sms", f"{SUBSCRIBERS}/{SUBSCRIBERS}"),
        ("email", f"{SUBSCRIBERS}/{SUBSCRIBERS}"),
    ):
        cells = [c.strip() for c in rows[channel].split("│")[1:-1]]
        assert cells[2] == delivered, rows[channel]
        first, last = (float(c.removesuffix(" s")) for c in cells[3:5])
        assert 0 < first <= last < 30, rows[channel]
        assert cells[5] == "-"
    assert "drill passed: every channel delivered within" in out

    # The rewritten config: the same channels and ids, every endpoint on the loopback.
    drilled = tomllib.loads((folder / "broadcaster.toml").read_text())
    assert drilled["store"] == "sqlite:///broadcaster.db"
    assert drilled["default_channels"] == list(channels())
    hosts = {urlsplit(u).hostname or u for u in urls_and_hosts(drilled["channels"])}
    assert hosts == {"127.0.0.1"}
    written = drilled["channels"]
    assert [t["name"] for t in written["partners"]["targets"]] == [
        "ops-bridge",
        "pager",
        unnamed_label(),  # the recipient id deliveries of the real channel have
    ]
    assert written["slack-status"]["channels"] == ["C0123456789", "C0987654321"]
    assert written["telegram-status"]["chats"] == ["@acme_status", -1001234567890]
    assert written["sms"]["account_sid"] == channels()["sms"]["account_sid"]
    assert written["sms"]["fallback"] == "email"  # kept, like languages and limits
    assert written["sms"]["rate_limit"] == {"global_per_second": 50, "global_burst": 10}
    assert "bucket" not in written["status-page"] and "unsubscribe_url" not in written["email"]
    assert drilled["cadence"]["notify"] == ["slack-status"]
    assert (folder / written["status-page"]["output"] / "index.html").is_file()
    for secret in (folder / "secrets").iterdir():
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret
        text = secret.read_text()
        assert "://" not in text or urlsplit(text).hostname == "127.0.0.1"
    # Nothing of the real deployment was read or copied, and its store was never opened.
    everything = b"".join(p.read_bytes() for p in files_under(folder))
    for value in REAL_SECRETS.values():
        assert value.encode() not in everything
    assert not (tmp_path / "real.db").exists()


@pytest.mark.timeout(60)
def test_drill_as_json_in_a_temporary_folder_that_is_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A BROADCASTER_STORE in the environment is the user's store: the drill never opens it.
    monkeypatch.setenv("BROADCASTER_STORE", f"sqlite:///{tmp_path}/from-env.db")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    config = write_config(tmp_path, channels={**channels(), **OTHER_CHANNELS})
    result = drill(config, "total-outage", "--json", "--subscribers", "2")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["passed"] is True and report["folder"] is None
    assert report["verdict"].startswith("drill passed: every channel delivered within")
    by_channel = {c["channel"]: c for c in report["channels"]}
    assert list(by_channel) == [*channels(), *OTHER_CHANNELS]
    for name in ("sms", "email", "hooks", "telegram-subscribers"):  # made-up subscribers
        assert by_channel[name]["deliveries"] == by_channel[name]["accepted"] == 2, name
    assert by_channel["partners"]["type"] == "webhook"
    assert all(
        0 < c["first_accepted_seconds"] <= c["last_settled_seconds"] for c in by_channel.values()
    )
    assert "127.0.0.1" in report["nothing_real"]
    assert not (tmp_path / "from-env.db").exists() and not (tmp_path / "real.db").exists()
    assert list((tmp_path / "tmp").iterdir()) == []


def test_a_channel_type_without_a_simulator_is_skipped_with_a_message(tmp_path: Path) -> None:
    partners = channels()["partners"]
    config = write_config(
        tmp_path,
        channels={"partners": partners, "pigeon": {"type": "carrier-pigeon", "loft": "roof"}},
        cadence={},
    )
    result = drill(config, "total-outage")
    assert result.exit_code == 0, result.output
    assert "not drilled: pigeon — no simulator for its type 'carrier-pigeon'" in result.stdout
    assert "drill passed" in result.stdout


def test_a_channel_that_does_not_deliver_fails_the_drill(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    start = WebhookStandIn.start

    async def gone(self: WebhookStandIn, stack: Any) -> WebhookReceiver:
        receiver = await start(self, stack)
        receiver.default(Behaviour(status=410))  # every target gone for good
        return receiver

    monkeypatch.setattr(WebhookStandIn, "start", gone)
    config = write_config(
        tmp_path,
        channels={"partners": channels()["partners"], "page": {"type": "banner"}},
        cadence={},
    )
    result = drill(config, "total-outage", "--json")
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert report["verdict"] == "drill failed: partners (3 of 3 not delivered)"
    partners, page = report["channels"]
    labels = ["ops-bridge", "pager", unnamed_label()]
    assert partners["failures"] == {f"partners → {label}: HTTP 410": 1 for label in labels}
    assert partners["first_accepted_seconds"] is None and partners["last_settled_seconds"] > 0
    assert page["passed"] is True


def unnamed_label() -> str:
    from channels.webhook import WebhookTarget, target_label

    return target_label(WebhookTarget.model_validate({"url": "https://unnamed.invalid/status"}))


def test_a_playbook_failing_its_checks_exits_1_with_the_check_failure(tmp_path: Path) -> None:
    broken = {**TOTAL_OUTAGE, "fields": {"cause": "a typo for summary"}}
    config = write_config(tmp_path, playbooks={"total-outage": broken})
    result = drill(config, "total-outage")
    assert result.exit_code == 1, result.output
    assert "template 'investigating' needs field 'summary'" in result.stdout
    assert "drill failed: the update did not pass its checks — nothing was sent" in result.stdout


def test_an_unknown_playbook_or_a_server_is_a_one_line_error(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    for result, words in (
        (drill(config, "nope"), "no playbook 'nope' — configured: total-outage"),
        (
            CliRunner().invoke(
                app, ["--server", "https://b.invalid", "playbook", "drill", "total-outage"]
            ),
            "works on the local config",
        ),
        (drill(config, "total-outage", "--dir", str(tmp_path)), "give the drill a folder"),
    ):
        assert result.exit_code == 1, result.output
        (line,) = result.output.strip().splitlines()
        assert line.startswith("error:") and words in line, line
    assert not (tmp_path / "real.db").exists()


def test_a_url_left_pointing_outside_is_caught_before_anything_is_sent(tmp_path: Path) -> None:
    files = SecretFiles(tmp_path)
    files.ref("hook", "https://discord.invalid/api/webhooks/1/abc")
    problems = local_endpoint_problems(
        {
            "ok": {"base_url": "http://127.0.0.1:8080", "host": "127.0.0.1"},
            "future": {"type": "x", "options": {"endpoint": "https://api.invalid/v2"}},
            "mail": {"host": "smtp.invalid"},
        },
        files,
    )
    assert problems == [
        "channels.future.options.endpoint: api.invalid is not 127.0.0.1",
        "channels.mail.host: smtp.invalid is not 127.0.0.1",
        "a secret file: discord.invalid is not 127.0.0.1",
    ]


def test_a_folder_the_drill_did_not_make_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    live = tmp_path / "site"
    (live / "secrets").mkdir(parents=True)
    (live / "secrets" / "slack-status-token").write_text("xoxb-REAL")
    (live / "index.html").write_text("LIVE PAGE")
    result = drill(config, "total-outage", "--dir", str(live))
    assert result.exit_code == 1
    assert "is not empty and no drill made it" in result.stderr
    assert (live / "secrets" / "slack-status-token").read_text() == "xoxb-REAL"
    assert (live / "index.html").read_text() == "LIVE PAGE"
    assert sorted(p.name for p in live.iterdir()) == ["index.html", "secrets"]


@pytest.mark.timeout(60)
def test_a_proxy_in_the_environment_never_carries_drill_traffic(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(name, "http://proxy.invalid:3128")  # nothing answers there
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    config = write_config(tmp_path)
    result = drill(config, "total-outage", "--subscribers", "2")
    assert result.exit_code == 0, result.output
    assert "drill passed" in result.stdout
