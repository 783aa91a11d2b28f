"""The Telegram support bot: /status answered in private chats, by webhook inside `serve`
and by long polling, with the real python-telegram-bot against the fake Bot API."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import tomli_w
import uvicorn
from typer.testing import CliRunner

from broadcaster.cli import app as cli_app
from broadcaster.core import Broadcaster
from broadcaster.models import Impact, IncidentStatus, UpdateRequest
from broadcaster.sandbox import BotApiFault, FakeChat, FakeTelegram
from broadcaster.sandbox.telegram import BotApiCall
from broadcaster.server import create_app, server_config
from broadcaster.support import CurrentState, OpenIncident
from channels.base import ChannelBrokenError
from channels.telegram import TelegramChannel
from channels.telegram_support import status_reply
from tests.conftest import MakeBroadcaster
from tests.test_serve import BANNER, free_port

TOKEN = "123456:TEST-token"
SECRET = "s3cret_Webhook-token"
CHANNEL = FakeChat(-1001111, type="channel", title="Acme status", username="acme_status")
GROUP = FakeChat(-1002222, type="supergroup", title="Acme users")
ANN, BOB, DIETER = 4242, 4343, 4444  # users in private chats
STATUS_PAGE = "https://status.example.com"
SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"


@pytest.fixture
async def api(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeTelegram]:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("TG_TOKEN", TOKEN)
    monkeypatch.setenv("TG_HOOK_SECRET", SECRET)
    async with FakeTelegram(token=TOKEN, chats=[CHANNEL, GROUP]) as fake:
        yield fake


def telegram(base_url: str, **extra: Any) -> dict[str, Any]:
    """A bilingual telegram channel, French first, whose bot answers users."""
    return {
        "type": "telegram",
        "token": {"env": "TG_TOKEN"},
        "chats": [CHANNEL.id],
        "languages": ["fr", "en"],
        "base_url": base_url,
        "support_bot": True,
        "webhook_secret": {"env": "TG_HOOK_SECRET"},
        "backoff_seconds": 0.05,
        "backoff_max_seconds": 0.5,
        "rate_limit": {},
        **extra,
    }


async def broadcaster_for(
    make_broadcaster: MakeBroadcaster, api: FakeTelegram, port: int | None = None, **settings: Any
) -> Broadcaster:
    serve = {"public_url": f"http://127.0.0.1:{port}"} if port is not None else {}
    return await make_broadcaster(
        {"status-page": BANNER, "tg": telegram(api.url)},
        status_page_url=STATUS_PAGE,
        serve={**serve, **settings.pop("serve", {})},
        **settings,
    )


OPENING = UpdateRequest(
    status=IncidentStatus.INVESTIGATING,
    title="Payments fail",
    impact=Impact.MAJOR,
    fields={
        "summary": "Card payments fail <for most users> & refunds",
        "summary.fr": "Les paiements par carte échouent",
    },
    actor="test",
)


async def publish(b: Broadcaster, request: UpdateRequest, incident: int | None = None) -> int:
    result = await b.publish(request, incident)
    await asyncio.wait_for(b.wait([result.update.id]), timeout=30)
    return result.incident.id


@asynccontextmanager
async def serving(b: Broadcaster, port: int) -> AsyncIterator[str]:
    """`serve`'s app on 127.0.0.1:port (the port its public_url names)."""
    config = server_config(create_app(b), b.settings.serve, host="127.0.0.1", port=port)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), "the server did not start"
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, timeout=30)


async def eventually(check: Callable[[], Any], timeout: float = 5.0) -> Any:
    """Wait until `check()` is truthy; return it."""
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)
    return result


def replies(api: FakeTelegram, chat: int) -> list[BotApiCall]:
    return [c for c in api.calls_of("sendMessage") if c.params["chat_id"] == str(chat)]


async def reply_to(api: FakeTelegram, chat: int) -> str:
    """The one reply the bot sent to `chat` (waiting for it), as the fake received it."""
    (call,) = await eventually(lambda: replies(api, chat))
    assert call.status == 200, call.answer
    assert call.params["parse_mode"] == "HTML"
    return str(call.params["text"])


async def post(base: str, body: bytes, headers: dict[str, str], *, channel: str = "tg") -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{base}/inbound/{channel}", data=body, headers=headers) as response,
    ):
        await response.read()
        return response.status


# -- webhook mode, inside `serve` ---------------------------------------------------------------


async def test_serve_registers_the_webhook_and_a_french_user_gets_french(
    api: FakeTelegram, make_broadcaster: MakeBroadcaster
) -> None:
    port = free_port()
    b = await broadcaster_for(make_broadcaster, api, port)
    await publish(b, OPENING)
    async with serving(b, port) as base:
        (registration,) = await eventually(lambda: api.calls_of("setWebhook"))
        assert registration.params["url"] == f"{base}/inbound/tg"
        assert registration.params["secret_token"] == SECRET
        assert registration.params["allowed_updates"] == ["message"]

        api.user_says(ANN, "/status", language_code="fr")
        assert await api.deliver_webhook() == [200]
        assert await reply_to(api, ANN) == (
            "<b>Payments fail</b>\n"
            "Statut : Enquête en cours · Impact : Majeur\n"
            "<b>Enquête en cours : Payments fail</b>\n"
            "Les paiements par carte échouent. Nous enquêtons.\n"
            f"Page de statut : {STATUS_PAGE}"
        )
        (post_to_channel,) = api.messages(CHANNEL.id)  # the posting side is unchanged
        assert post_to_channel.text.startswith("Enquête en cours : Payments fail\n")
    assert api.updates == []  # answered 200: Telegram will not send it again


async def test_english_user_gets_english_and_an_unknown_language_the_channel_first(
    api: FakeTelegram, make_broadcaster: MakeBroadcaster, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    b = await broadcaster_for(make_broadcaster, api, port)
    await publish(b, OPENING)
    caplog.set_level(logging.INFO, logger="channels.telegram_support")
    async with serving(b, port):
        await eventually(lambda: api.webhook)
        api.user_says(BOB, "/status@status_test_bot", language_code="en-GB")
        api.user_says(DIETER, "/start", language_code="de")
        assert await api.deliver_webhook() == [200, 200]
        assert await reply_to(api, BOB) == (
            "<b>Payments fail</b>\n"
            "Status: Investigating · Impact: Major\n"
            "<b>Investigating: Payments fail</b>\n"
            "Card payments fail &lt;for most users&gt; &amp; refunds. We are looking into it.\n"
            f"Status page: {STATUS_PAGE}"
        )
        assert (await reply_to(api, DIETER)).startswith("<b>Payments fail</b>\nStatut : ")
    answered = [r for r in caplog.records if "answered /" in r.getMessage()]
    assert len(answered) == 2
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "Payments" not in logged and str(BOB) not in logged and TOKEN not in logged


async def test_nothing_open_is_the_all_clear_and_other_text_gets_the_help(
    api: FakeTelegram, make_broadcaster: MakeBroadcaster
) -> None:
    port = free_port()
    b = await broadcaster_for(make_broadcaster, api, port)
    incident = await publish(b, OPENING)
    await publish(b, UpdateRequest(status=IncidentStatus.RESOLVED, actor="test"), incident)
    async with serving(b, port):
        await eventually(lambda: api.webhook)
        api.user_says(ANN, "/status", language_code="fr")
        api.user_says(BOB, "/status", language_code="en")
        api.user_says(DIETER, "hello, is it down?", language_code="en")
        assert await api.deliver_webhook() == [200, 200, 200]
        assert await reply_to(api, ANN) == (
            f"Tous les systèmes sont opérationnels.\n\nPage de statut : {STATUS_PAGE}"
        )
        assert await reply_to(api, BOB) == f"All systems operational.\n\nStatus page: {STATUS_PAGE}"
        assert await reply_to(api, DIETER) == "Send /status for the current state."


async def test_an_incident_kept_off_the_channel_is_not_revealed(
    api: FakeTelegram, make_broadcaster: MakeBroadcaster
) -> None:
    port = free_port()
    b = await broadcaster_for(make_broadcaster, api, port)
    await publish(b, OPENING.model_copy(update={"channels": ["status-page"]}))
    async with serving(b, port):
        await eventually(lambda: api.webhook)
        api.user_says(BOB, "/status", language_code="en")
        await api.deliver_webhook()
        assert (await reply_to(api, BOB)).startswith("All systems operational.")


async def test_wrong_or_missing_secret_is_401_before_the_body_is_read_and_nothing_is_sent(
    api: FakeTelegram, make_broadcaster: MakeBroadcaster
) -> None:
    port = free_port()
    b = await broadcaster_for(make_broadcaster, api, port)
    update = json.dumps(api.user_says(ANN, "/status")).encode()
    api.updates.clear()
    async with serving(b, port) as base:
        json_type = {"Content-Type": "application/json"}
        assert await post(base, update, json_type) == 401
        assert await post(base, update, {**json_type, SECRET_HEADER: "s3cret_Webhook"}) == 401
        assert await post(base, update, {**json_type, SECRET_HEADER: SECRET + "x"}) == 401
        # Not parsed before the check: a malformed body with a wrong secret is a 401 too.
        assert await post(base, b"{not json", {SECRET_HEADER: "wrong"}) == 401
        assert await post(base, b"{not json", {SECRET_HEADER: SECRET}) == 400
        assert await post(base, b'{"hello": "world"}', {SECRET_HEADER: SECRET}) == 400
        assert await post(base, b"[]", {SECRET_HEADER: SECRET}) == 400
        bad_message = b'{"update_id": 1, "message": "hi"}'
        assert await post(base, bad_message, {SECRET_HEADER: SECRET}) == 400
        # A channel that receives nothing, and one that does not exist:
        assert await post(base, b"{}", {SECRET_HEADER: SECRET}, channel="status-page") == 404
        assert await post(base, b"{}", {SECRET_HEADER: SECRET}, channel="nope") == 404
        # The one good call is answered, and is the only message sent (nothing was
        # published to the channel).
        assert await post(base, update, {**json_type, SECRET_HEADER: SECRET}) == 200
        await reply_to(api, ANN)
        await asyncio.sleep(0.1)
        assert len(api.calls_of("sendMessage")) == 1


async def test_group_and_channel_messages_are_ignored(
    api: FakeTelegram, make_broadcaster: MakeBroadcaster
) -> None:
    port = free_port()
    b = await broadcaster_for(make_broadcaster, api, port)
    async with serving(b, port):
        await eventually(lambda: api.webhook)
        api.user_says(GROUP.id, "/status", language_code="en")
        api.user_says(ANN, "/status", language_code="en")
        assert await api.deliver_webhook() == [200, 200]
        await reply_to(api, ANN)
        await asyncio.sleep(0.1)
        assert replies(api, GROUP.id) == []
        assert len(api.calls_of("sendMessage")) == 1


async def test_refused_inbound_calls_are_rate_limited_per_address(
    api: FakeTelegram, make_broadcaster: MakeBroadcaster
) -> None:
    port = free_port()
    b = await broadcaster_for(
        make_broadcaster,
        api,
        port,
        serve={"rate_limit_per_ip": {"inbound": {"rate": "1/min", "burst": 2}}},
    )
    async with serving(b, port) as base:
        await eventually(lambda: api.webhook)
        statuses = [await post(base, b"{}", {SECRET_HEADER: "guess"}) for _ in range(3)]
        assert statuses == [401, 401, 429]


async def test_without_public_url_serve_says_how_to_register_the_webhook(
    api: FakeTelegram, make_broadcaster: MakeBroadcaster, caplog: pytest.LogCaptureFixture
) -> None:
    b = await broadcaster_for(make_broadcaster, api)
    caplog.set_level(logging.INFO)
    async with serving(b, free_port()):
        await eventually(lambda: "public_url is not set" in caplog.text)
    assert api.calls_of("setWebhook") == []
    assert "setWebhook yourself with url=<public https URL>/inbound/tg" in caplog.text
    assert SECRET not in caplog.text


async def test_doctor_reports_a_support_bot_without_webhook_secret(
    api: FakeTelegram, make_broadcaster: MakeBroadcaster
) -> None:
    config = telegram(api.url)
    del config["webhook_secret"]
    b = await make_broadcaster({"tg": config})
    check = next(c for c in await b.doctor() if c.subject == "channel tg")
    assert not check.ok and "support_bot needs webhook_secret" in check.detail


# -- polling mode -------------------------------------------------------------------------------


@asynccontextmanager
async def polling(b: Broadcaster) -> AsyncIterator[asyncio.Task[None]]:
    channel = b.channels["tg"]
    assert isinstance(channel, TelegramChannel)
    stop = asyncio.Event()
    task = asyncio.create_task(channel.support_bot().poll(stop, timeout=5))
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=5)  # stops at once, mid long poll


async def test_polling_deletes_the_webhook_then_answers_and_stops_cleanly(
    api: FakeTelegram, make_broadcaster: MakeBroadcaster
) -> None:
    b = await broadcaster_for(make_broadcaster, api)
    await publish(b, OPENING)
    api.webhook = {"url": "https://status.example.com/inbound/tg", "secret_token": SECRET}
    async with polling(b):
        api.user_says(ANN, "/status", language_code="fr")
        text = await reply_to(api, ANN)
        assert text.startswith("<b>Payments fail</b>\nStatut : Enquête en cours · Impact : Majeur")
        api.user_says(BOB, "what?", language_code="en")
        assert await reply_to(api, BOB) == "Send /status for the current state."
    methods = [c.method for c in api.calls if c.method != "sendMessage"]
    assert methods[:3] == ["getWebhookInfo", "deleteWebhook", "getUpdates"]
    assert api.webhook is None
    assert api.updates == []  # confirmed before stopping: a restart will not answer again
    assert len(api.calls_of("sendMessage")) == 3  # the channel post and two replies


async def test_polling_survives_502_and_retry_after(
    api: FakeTelegram, make_broadcaster: MakeBroadcaster
) -> None:
    api.fail("getUpdates", BotApiFault(error_code=502, description="Bad Gateway"))
    api.fail(
        "getUpdates",
        BotApiFault(error_code=429, description="Too Many Requests: retry after 1", retry_after=1),
    )
    b = await broadcaster_for(make_broadcaster, api)
    api.user_says(ANN, "/status", language_code="en")
    async with polling(b) as task:
        assert (await reply_to(api, ANN)).startswith("All systems operational.")
        assert not task.done()
    first, second, third, *_ = api.calls_of("getUpdates")
    assert (first.status, second.status, third.status) == (502, 429, 200)
    assert third.at - second.at >= 1 - 0.05  # Telegram's retry_after was honoured


async def test_polling_with_a_refused_token_raises_channel_broken(
    api: FakeTelegram, make_broadcaster: MakeBroadcaster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TG_TOKEN", "123456:WRONG-token")
    b = await broadcaster_for(make_broadcaster, api)
    channel = b.channels["tg"]
    assert isinstance(channel, TelegramChannel)
    with pytest.raises(ChannelBrokenError, match="token was refused") as refused:
        await asyncio.wait_for(channel.support_bot().poll(asyncio.Event()), timeout=5)
    assert "WRONG" not in str(refused.value)


@pytest.fixture
def root_logging() -> Iterator[None]:
    """The CLI configures the root logger: give the next tests theirs back."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def bot_config(folder: Path, api: FakeTelegram) -> Path:
    path = folder / "broadcaster.toml"
    config = {
        "store": "sqlite:///broadcaster.db",
        "channels": {"status-page": BANNER, "tg": telegram(api.url)},
    }
    path.write_text(tomli_w.dumps(config))
    return path


def test_telegram_bot_command_ends_with_one_line_on_a_refused_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, root_logging: None
) -> None:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("TG_TOKEN", "123456:WRONG-token")
    monkeypatch.setenv("TG_HOOK_SECRET", SECRET)
    with FakeTelegram(token=TOKEN) as api:
        config = bot_config(tmp_path, api)
        result = CliRunner().invoke(cli_app, ["--config", str(config), "telegram-bot"])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: tg: getWebhookInfo: the bot token was refused")
    assert "WRONG" not in result.output


def test_telegram_bot_command_answers_and_stops_on_sigterm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    with FakeTelegram(token=TOKEN) as api:
        config = bot_config(tmp_path, api)
        command = str(Path(sys.executable).with_name("broadcaster"))
        env = {**os.environ, "TG_TOKEN": TOKEN, "TG_HOOK_SECRET": SECRET}
        bot = subprocess.Popen(
            [command, "--config", str(config), "telegram-bot"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        try:
            deadline = time.monotonic() + 20
            while not api.calls_of("getUpdates"):
                assert bot.poll() is None, bot.communicate()[1]
                assert time.monotonic() < deadline, "the bot never polled"
                time.sleep(0.05)
            api.user_says(ANN, "/status", language_code="en")
            while not api.calls_of("sendMessage"):
                assert time.monotonic() < deadline, "no reply"
                time.sleep(0.05)
            bot.send_signal(signal.SIGTERM)
            _, stderr = bot.communicate(timeout=10)
        finally:
            if bot.poll() is None:
                bot.kill()
    assert bot.returncode == 0, stderr
    assert "answered /status in en" in stderr
    assert TOKEN not in stderr and SECRET not in stderr
    assert api.calls_of("sendMessage")[0].params["text"].startswith("All systems operational.")


# -- the reply itself ---------------------------------------------------------------------------


def test_a_reply_too_long_for_one_message_counts_the_incidents_left_out() -> None:
    labels = {
        "all_clear": "All clear.",
        "unknown_command": "Send /status.",
        "facts": "Status: {status} · Impact: {impact}",
        "status_page": "Status page: {url}",
        "more": "And {count} more open incidents.",
    }

    def incident(number: int, text: str) -> OpenIncident:
        return OpenIncident(
            id=number,
            title=f"Incident <{number}>",
            status=IncidentStatus.INVESTIGATING,
            impact=Impact.MAJOR,
            status_label="Investigating",
            impact_label="Major",
            text=text,
            updated_at="2026-11-26T12:00:00Z",  # type: ignore[arg-type]
        )

    state = CurrentState(
        channel="tg",
        language="en",
        incidents=[incident(n, "&" * 1500) for n in range(1, 5)],
        labels=labels,
        status_page_url=STATUS_PAGE,
    )
    reply = status_reply(state)
    assert reply.count("<b>Incident &lt;") == 2
    assert reply.endswith(f"And 2 more open incidents.\n\nStatus page: {STATUS_PAGE}")
    shown = reply.replace("<b>", "").replace("</b>", "").replace("&amp;", "&")
    assert len(shown.replace("&lt;", "<").replace("&gt;", ">")) <= 4096

    alone = state.model_copy(update={"incidents": [incident(1, "word " * 1000)]})
    reply = status_reply(alone)
    assert reply.startswith("<b>Incident &lt;1&gt;</b>\nStatus: Investigating · Impact: Major\n")
    assert reply.endswith(f"…\n\nStatus page: {STATUS_PAGE}")
    assert len(reply.replace("<b>", "").replace("</b>", "").replace("&lt;", "<")) <= 4096
