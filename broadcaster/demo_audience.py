"""The subscribers part of `broadcaster demo`: people imported from a CSV (one row refused,
to show why), SMS through a fake Twilio whose signed delivery receipts come back to the
app's inbound endpoint, and email to a local SMTP server."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from rich.console import Console
from rich.table import Table

from broadcaster.core import Broadcaster
from broadcaster.models import DeliveryState
from broadcaster.sandbox import FakeSmtp, FakeTwilio
from broadcaster.sandbox.twilio import DEFAULT_ACCOUNT_SID

SENDER = "+15005550006"
UNREACHABLE = "+33612340007"  # its SMS come back undelivered (Twilio error 30007)

# Who asked to be told: phone and/or email, language, components they follow (empty:
# all), channels they agreed to (empty: every one their addresses reach).
SUBSCRIBERS_CSV = f"""phone,email,language,components,channels
+33612340001,lea@example.fr,fr,,
+33612340002,,fr,app,
+33612340003,,fr,website,
+33612340004,hugo@example.fr,fr,app;api,sms
+33612340005,,fr,,
+33612340006,,fr,,
{UNREACHABLE},,fr,,
+4915112340001,jonas@example.de,en,,
+14155550101,,en,app,
+14155550102,ava@example.com,en,,email
,noah@example.com,en,,
,mia@example.com,en,website,
,liam@example.com,en,api,
0612,oops@,en,,
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def channels(fast: dict[str, Any]) -> dict[str, Any]:
    """The two subscriber channels, as written for the real providers."""
    return {
        "sms": {
            "type": "sms",
            "account_sid": DEFAULT_ACCOUNT_SID,
            "auth_token": {"env": "TWILIO_AUTH_TOKEN"},
            "from_number": SENDER,
            "languages": ["en", "fr"],
            "max_segments": 3,  # the identified update, with its workaround, in French
            "rate_limit": {"global_per_second": 50, "global_burst": 10},  # the simulator's
            **fast,
        },
        "email": {
            "type": "email",
            "host": "smtp.voltcharge.example",
            "username": "status@voltcharge.example",
            "password": {"env": "SMTP_PASSWORD"},
            "from_address": "VoltCharge status <status@voltcharge.example>",
            "languages": ["en", "fr"],
            **fast,
        },
    }


async def import_subscribers(broadcaster: Broadcaster, console: Console) -> None:
    report = await broadcaster.audience.import_csv(SUBSCRIBERS_CSV, source="demo")
    console.print(
        f"imported subscribers: {report.added} added; refused: "
        + "; ".join(f"line {r.line}: {r.reason}" for r in report.rejected)
    )


@asynccontextmanager
async def inbound_app(broadcaster: Broadcaster, port: int) -> AsyncIterator[None]:
    """The HTTP app (inbound provider callbacks; no dispatching) on 127.0.0.1:`port`."""
    import uvicorn

    from broadcaster.server.app import create_app, server_config

    app = create_app(broadcaster, dispatch=False)
    config = server_config(app, broadcaster.settings.serve, host="127.0.0.1", port=port)
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)  # no start/stop lines
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            await task  # raises why it could not start
        await asyncio.sleep(0.01)
    try:
        yield
    finally:
        server.should_exit = True
        await task


async def report_receipts(broadcaster: Broadcaster, twilio: FakeTwilio, seen: set[str]) -> None:
    """Twilio reports each new SMS delivered (but one number's undelivered), signed, to
    the app; wait until the receipts are recorded."""
    new = [m for m in twilio.messages if m.sid not in seen]
    seen.update(m.sid for m in new)
    lost = {m.sid for m in new if m.to == UNREACHABLE}
    await twilio.send_status_callbacks("delivered", sids=[m.sid for m in new if m.sid not in lost])
    await twilio.send_status_callbacks("undelivered", 30007, sids=lost)
    for _ in range(100):  # the app records them just after answering
        waiting = await broadcaster.store.deliveries(
            channel="sms", states=[DeliveryState.SENT], limit=1
        )
        if not waiting:
            return
        await asyncio.sleep(0.05)


def summary(twilio: FakeTwilio, smtp: FakeSmtp) -> Table:
    """Per subscriber channel: messages at the provider and their receipts."""
    table = Table(title="subscribers' messages at the providers")
    for column in ("channel", "messages", "people", "receipts"):
        table.add_column(column)
    statuses: dict[str, int] = {}
    for message in twilio.messages:
        statuses[message.status] = statuses.get(message.status, 0) + 1
    table.add_row(
        "sms (Twilio)",
        str(len(twilio.messages)),
        str(len({m.to for m in twilio.messages})),
        ", ".join(f"{n} {s}" for s, n in sorted(statuses.items())),
    )
    mail = smtp.received
    threads = sum(1 for m in mail if m.message["In-Reply-To"])
    table.add_row(
        "email (SMTP)",
        str(len(mail)),
        str(len({m.message["To"] for m in mail})),
        f"accepted ({threads} threaded under the first)",
    )
    return table
