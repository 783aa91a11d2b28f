"""Secrets never reach the database, the errors, the logs or the public site."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from broadcaster.errors import ConfigError
from broadcaster.models import IncidentStatus, UpdateRequest
from broadcaster.sandbox import Behaviour, WebhookReceiver
from tests.conftest import MakeBroadcaster

URL_TOKEN = "tok3n-in-the-url-0123456789"
SIGNING_SECRET = "whsec_c2VjcmV0LXNpZ25pbmcta2V5LTAxMjM0NTY3"


async def test_secrets_stay_out_of_store_errors_logs_and_site(
    receiver: WebhookReceiver,
    make_broadcaster: MakeBroadcaster,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("HOOK_SECRET", SIGNING_SECRET)
    receiver.script("/hook/tokened", Behaviour(status=500))
    b = await make_broadcaster(
        {
            "hooks": {
                "type": "webhook",
                # Incoming-webhook URLs (Slack, Teams…) carry their credential in the URL.
                "targets": [f"{receiver.url}/hook/tokened?key={URL_TOKEN}"],
                "secret": {"env": "HOOK_SECRET"},
                "max_attempts": 2,
                "backoff_seconds": 0.05,
            },
            "page": {"type": "banner", "output": "site"},
        }
    )
    result = await b.publish(
        UpdateRequest(
            status=IncidentStatus.INVESTIGATING,
            title="API down",
            fields={"summary": "Requests fail."},
            actor="test",
        )
    )
    await asyncio.wait_for(b.wait([result.update.id]), timeout=20)
    (failed,) = await b.deliveries(result.incident.id, channel="hooks")
    assert failed.last_error is not None and "HTTP 500" in failed.last_error
    await b.close()

    stored = b"".join(p.read_bytes() for p in tmp_path.glob("broadcaster.db*"))
    site = b"".join(p.read_bytes() for p in (tmp_path / "site").rglob("*") if p.is_file())
    for secret in (URL_TOKEN, SIGNING_SECRET, SIGNING_SECRET.removeprefix("whsec_")):
        assert secret.encode() not in stored
        assert secret.encode() not in site
        assert secret not in failed.last_error
        assert secret not in caplog.text
    assert failed.recipient.startswith("127.0.0.1#")  # a label, not the URL


async def test_missing_secret_is_reported_by_doctor_without_its_value(
    receiver: WebhookReceiver, make_broadcaster: MakeBroadcaster
) -> None:
    b = await make_broadcaster(
        {
            "hooks": {
                "type": "webhook",
                "targets": [receiver.target("a")],
                "secret": {"env": "UNSET_SECRET_FOR_TEST"},
            }
        }
    )
    checks = {c.subject: c for c in await b.doctor()}
    assert not checks["channel hooks"].ok
    assert "UNSET_SECRET_FOR_TEST" in checks["channel hooks"].detail


async def test_secret_written_inline_in_the_config_is_refused(
    make_broadcaster: MakeBroadcaster,
) -> None:
    with pytest.raises(ConfigError, match=r"channels\.hooks\.secret"):
        await make_broadcaster(
            {
                "hooks": {
                    "type": "webhook",
                    "targets": ["https://example.com/h"],
                    "secret": SIGNING_SECRET,
                }
            }
        )
