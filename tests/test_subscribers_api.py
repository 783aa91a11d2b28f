"""Subscribers over the admin API (/v1/subscribers): scopes, validation, CSV import,
consent, export and erasure — and no phone number or email in the server's logs."""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from broadcaster.core import Broadcaster
from tests.conftest import MakeBroadcaster
from tests.test_api import API_TOKENS, TOKENS, Client, token_env  # noqa: F401  (autouse)
from tests.test_serve import BANNER, serving

# A subscriber channel: the email adapter, pointed at a relay nobody listens on (nothing
# is published here, so nothing is sent).
EMAIL = {
    "type": "email",
    "host": "127.0.0.1",
    "port": 1025,
    "from_address": "Status <status@example.com>",
    "security": "none",
}
COMPONENTS = {"api": "Public API", "app": "Mobile app"}
ALICE = {"phone": "+33612345678", "email": "alice@example.com", "language": "fr"}
# Every kind of row an import refuses, between good ones (line numbers count the header).
CSV = """phone,email,language,components,timezone,channels
+33612345678,alice@example.com,fr,api,Europe/Paris,email
+33 6 12,bad-phone@example.com,en,,,
,not-an-email,en,,,
,carol@example.com,en,billing,,
,dave@example.com,en,,,sms
,,en,,,
,bob@example.com,en,api;app,,
,bob@example.com,de,,,
"""


class Api:
    """The API of a serving broadcaster, one client per token."""

    def __init__(self, b: Broadcaster, base: str, session: aiohttp.ClientSession) -> None:
        self.b, self.base, self.session = b, base, session
        self.reader = Client(session, base, TOKENS["READ_TOKEN"])
        self.comms = Client(session, base, TOKENS["PUBLISH_TOKEN"])
        self.ops = Client(session, base, TOKENS["ADMIN_TOKEN"])

    async def import_csv(self, text: str | bytes, token: str = "PUBLISH_TOKEN") -> tuple[int, Any]:
        async with self.session.post(
            f"{self.base}/v1/subscribers/import",
            data=text.encode() if isinstance(text, str) else text,
            headers={"Authorization": f"Bearer {TOKENS[token]}", "Content-Type": "text/csv"},
        ) as reply:
            return reply.status, json.loads(await reply.read())


@pytest.fixture
async def api(make_broadcaster: MakeBroadcaster) -> AsyncIterator[Api]:
    b = await make_broadcaster(
        {"status-page": BANNER, "email": EMAIL},
        components=COMPONENTS,
        serve={"api_tokens": API_TOKENS, "access_log": True},
    )
    async with serving(b) as base, aiohttp.ClientSession() as session:
        yield Api(b, base, session)


def audit_rows(tmp_path: Path) -> list[tuple[str, str, str]]:
    with sqlite3.connect(tmp_path / "broadcaster.db") as conn:
        return conn.execute("SELECT actor, action, detail FROM audit ORDER BY id").fetchall()


async def test_scopes_keep_people_from_dashboards_and_erasure_for_admins(api: Api) -> None:
    status, body = await api.reader.call("GET", "/v1/subscribers")
    assert status == 403 and "needs publish" in body["detail"]
    assert (await api.reader.call("POST", "/v1/subscribers", ALICE))[0] == 403

    status, alice = await api.comms.call("POST", "/v1/subscribers", ALICE)
    assert status == 201 and alice["channels"] == {"email": True}
    assert (await api.comms.call("GET", f"/v1/subscribers/{alice['id']}"))[1] == alice
    for method, path in (
        ("GET", f"/v1/subscribers/{alice['id']}/export"),
        ("DELETE", f"/v1/subscribers/{alice['id']}"),
    ):
        status, body = await api.comms.call(method, path)
        assert status == 403 and "needs admin" in body["detail"]
    assert await api.b.subscribers() != []  # the refused erasure erased nothing


async def test_add_normalises_and_refuses_precisely(api: Api) -> None:
    spaced = {**ALICE, "phone": "+33 6 12 34 56 78", "components": ["api"]}
    status, alice = await api.comms.call("POST", "/v1/subscribers", spaced)
    assert status == 201
    assert (alice["phone"], alice["email"], alice["components"]) == (
        "+33612345678",
        "alice@example.com",
        ["api"],
    )

    refusals = [
        ({"email": "alice@example.com"}, 409, "already a subscriber (#1)"),
        ({"email": "not-an-email"}, 422, "email 'not-an-email' is not valid"),
        ({"phone": "+33 6 12", "email": "b@example.com"}, 422, "phone '+33 6 12' is not a"),
        ({"email": "b@example.com", "components": ["billing"]}, 422, "unknown component"),
        ({"email": "b@example.com", "channels": ["sms"]}, 422, "'sms' is not a subscriber"),
        ({"phone": "+33698765432"}, 422, "no subscriber channel can reach them"),
        ({"language": "en"}, 422, "needs a phone number, an email, a Telegram id or a webhook"),
    ]
    for body, expected, words in refusals:
        status, answer = await api.comms.call("POST", "/v1/subscribers", body)
        assert status == expected, (body, answer)
        assert words in answer["detail"] and "\n" not in answer["detail"], answer
    status, answer = await api.comms.call("POST", "/v1/subscribers", {"pager": "123"})
    assert status == 422 and answer["detail"][0]["loc"] == ["body", "pager"]
    status, answer = await api.comms.call("GET", "/v1/subscribers/999")
    assert status == 404 and answer["error"] == "NotFoundError"
    assert [s.id for s in await api.b.subscribers()] == [alice["id"]]


async def test_csv_import_reports_each_refused_row_and_opt_outs_stand(
    api: Api, tmp_path: Path
) -> None:
    status, report = await api.import_csv(CSV)
    assert status == 200
    assert (report["added"], report["updated"]) == (2, 1)  # bob's second row updates him
    reasons = {row["line"]: row["reason"] for row in report["rejected"]}
    assert sorted(reasons) == [3, 4, 5, 6, 7]
    assert "phone '+33 6 12'" in reasons[3]
    assert "email 'not-an-email'" in reasons[4]
    assert "unknown component 'billing'" in reasons[5]
    assert "'sms' is not a subscriber channel" in reasons[6]
    assert "needs a phone number, an email" in reasons[7]
    _, everyone = await api.comms.call("GET", "/v1/subscribers")
    assert [(s["email"], s["language"]) for s in everyone] == [
        ("alice@example.com", "fr"),
        ("bob@example.com", "de"),
    ]
    alice, bob = everyone

    status, changed = await api.comms.call(
        "PUT", f"/v1/subscribers/{alice['id']}/channels/email", {"subscribed": False}
    )
    assert status == 200 and changed["channels"] == {"email": False}
    status, again = await api.import_csv(CSV)  # the same file, imported again
    assert (again["added"], again["updated"], len(again["rejected"])) == (0, 3, 5)
    _, everyone = await api.comms.call("GET", "/v1/subscribers")
    assert [s["id"] for s in everyone] == [alice["id"], bob["id"]]  # nobody twice
    assert everyone[0]["channels"] == {"email": False}  # the import did not undo the opt-out
    _, subscribed = await api.comms.call("GET", "/v1/subscribers?channel=email")
    assert [s["id"] for s in subscribed] == [bob["id"]]

    actions = [(actor, action, json.loads(d)) for actor, action, d in audit_rows(tmp_path)]
    assert actions == [
        ("api:comms", "subscriber.import", {"added": 2, "updated": 1, "rejected": 5}),
        ("api:comms", "subscriber.opt_out", {"subscriber": alice["id"], "channel": "email"}),
        ("api:comms", "subscriber.import", {"added": 0, "updated": 3, "rejected": 5}),
    ]


async def test_an_import_that_is_not_csv_is_refused_whole(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    status, body = await api.import_csv("name,email\nAlice,alice@example.com\n")
    assert status == 422 and "unknown: name" in body["detail"]
    huge = "email\nalice@example.com\n" + "x" * 200_000 + "@example.com\n"
    status, body = await api.import_csv(huge)  # a field the csv module will not read
    assert status == 422 and "line 3: not CSV: field larger than field limit" in body["detail"]
    assert await api.b.subscribers() == []  # not even Alice, on the line before it
    status, body = await api.import_csv("email\nalice@example.com\n".encode("utf-16"))
    assert status == 400 and "UTF-8" in body["detail"]
    status, _ = await api.import_csv("\ufeffEmail\nalice@example.com\n")  # Excel's CSV UTF-8
    assert status == 200
    assert [s.email for s in await api.b.subscribers()] == ["alice@example.com"]

    monkeypatch.setattr("broadcaster.server.api.IMPORT_MAX_BYTES", 64)
    status, body = await api.import_csv("email\n" + "x@example.com\n" * 10)
    assert status == 413 and "over 64 bytes — split it" in body["detail"]


async def test_list_pages_by_id(api: Api) -> None:
    for n in range(5):
        await api.comms.call("POST", "/v1/subscribers", {"email": f"s{n}@example.com"})
    _, first = await api.comms.call("GET", "/v1/subscribers?limit=2")
    _, second = await api.comms.call("GET", f"/v1/subscribers?limit=2&after={first[-1]['id']}")
    _, rest = await api.comms.call("GET", f"/v1/subscribers?after={second[-1]['id']}")
    assert [s["email"] for s in first + second + rest] == [f"s{n}@example.com" for n in range(5)]
    status, body = await api.comms.call("GET", "/v1/subscribers?channel=sms")
    assert status == 404 and "'sms' is not a subscriber channel" in body["detail"]
    assert (await api.comms.call("GET", "/v1/subscribers?limit=0"))[0] == 422


async def test_opt_in_needs_an_address_the_channel_reaches(api: Api) -> None:
    _, alice = await api.comms.call("POST", "/v1/subscribers", ALICE)
    path = f"/v1/subscribers/{alice['id']}/channels"
    status, body = await api.comms.call("PUT", f"{path}/sms", {"subscribed": True})
    assert status == 404 and "not a subscriber channel" in body["detail"]
    status, body = await api.comms.call(
        "PUT", "/v1/subscribers/999/channels/email", {"subscribed": False}
    )
    assert status == 404
    await api.comms.call("PUT", f"{path}/email", {"subscribed": False})
    status, back = await api.comms.call("PUT", f"{path}/email", {"subscribed": True})
    assert status == 200 and back["channels"] == {"email": True}


async def test_export_then_erase_leaves_no_address_behind(api: Api, tmp_path: Path) -> None:
    _, alice = await api.comms.call("POST", "/v1/subscribers", ALICE)
    status, export = await api.ops.call("GET", f"/v1/subscribers/{alice['id']}/export")
    assert status == 200
    assert export["subscriber"]["email"] == "alice@example.com" and export["deliveries"] == []

    status, erased = await api.ops.call("DELETE", f"/v1/subscribers/{alice['id']}")
    assert status == 200 and erased["id"] == alice["id"]
    for method, path in (
        ("GET", f"/v1/subscribers/{alice['id']}"),
        ("GET", f"/v1/subscribers/{alice['id']}/export"),
        ("DELETE", f"/v1/subscribers/{alice['id']}"),
    ):
        assert (await api.ops.call(method, path))[0] == 404

    with sqlite3.connect(tmp_path / "broadcaster.db") as conn:
        dump = "\n".join(conn.iterdump())
    assert "alice@example.com" not in dump and "+33612345678" not in dump
    actions = [(actor, action, json.loads(d)) for actor, action, d in audit_rows(tmp_path)]
    assert actions == [
        ("api:comms", "subscriber.add", {"subscriber": alice["id"]}),
        ("api:ops", "subscriber.erase", {"subscriber": alice["id"]}),
    ]


async def test_no_phone_number_or_email_reaches_the_logs(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    _, alice = await api.comms.call("POST", "/v1/subscribers", ALICE)
    await api.comms.call("POST", "/v1/subscribers", ALICE)  # refused: a duplicate
    await api.comms.call("POST", "/v1/subscribers", {"email": "alice@", "phone": "+3361234"})
    await api.import_csv(CSV)
    await api.comms.call("GET", f"/v1/subscribers?channel=email&after={alice['id'] - 1}")
    await api.ops.call("GET", f"/v1/subscribers/{alice['id']}/export")
    await api.ops.call("DELETE", f"/v1/subscribers/{alice['id']}")

    lines = [record.getMessage() for record in caplog.records]
    assert any("/v1/subscribers/import" in line for line in lines)  # access lines were on
    assert any("a•••@example.com" in line for line in lines)  # masked, where useful
    logged = "\n".join(lines)
    for address in ("alice", "bob@", "carol@", "+3361234", "+33 6 12", "612345678"):
        assert address not in logged, address
