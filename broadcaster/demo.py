"""`broadcaster demo`: a whole incident rehearsed on local simulators, in a few seconds.

It writes a real broadcaster.toml into a folder, starts a webhook receiver simulator on
127.0.0.1 (some of whose targets answer 429, 503, drop the connection or refuse for
good), and publishes investigating -> identified -> resolved through the status-page
and webhook channels, with live progress.
"""

from __future__ import annotations

import base64
import os
import secrets
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import tomli_w
from rich.console import Console
from rich.rule import Rule

from broadcaster.config import load_settings
from broadcaster.core import Broadcaster
from broadcaster.models import ComponentState, IncidentStatus, UpdateRequest
from broadcaster.sandbox import Behaviour, WebhookReceiver
from broadcaster.views import failures_table, preview_view, progress_table, watch_deliveries

PARTNERS = 24


def _write_config(folder: Path, receiver: WebhookReceiver) -> Path:
    config = {
        "store": "sqlite:///broadcaster.db",
        "page_title": "VoltCharge status",
        "timezone": "Europe/Paris",
        "default_channels": ["status-page", "partners"],
        "components": {"app": "Mobile app", "api": "Charging API", "website": "Website"},
        "channels": {
            "status-page": {"type": "banner", "languages": ["en", "fr"], "output": "public"},
            "partners": {
                "type": "webhook",
                "languages": ["en", "fr"],
                "targets": [
                    {"name": f"partner-{i:02d}", "url": receiver.target(f"partner-{i:02d}")}
                    for i in range(1, PARTNERS + 1)
                ],
                "secret": {"file": "webhook-secret"},
                "backoff_seconds": 0.3,
                "backoff_max_seconds": 2.0,
                "deadline_seconds": 20,
            },
        },
    }
    path = folder / "broadcaster.toml"
    path.write_text(
        "# Written by `broadcaster demo`: a real config, pointing at local simulators.\n"
        + tomli_w.dumps(config)
    )
    return path


def _fresh_folder(folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("broadcaster.db", "broadcaster.db-wal", "broadcaster.db-shm"):
        (folder / name).unlink(missing_ok=True)
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    secret_file = folder / "webhook-secret"
    secret_file.write_text(secret)
    os.chmod(secret_file, 0o600)
    return secret


async def run_demo(folder: Path, console: Console) -> None:
    """Rehearse investigating -> identified -> resolved, end to end, on simulators."""
    started = time.monotonic()
    secret = _fresh_folder(folder)
    async with WebhookReceiver(secret=secret) as receiver:
        # A realistic bad day at the receivers' end: the core retries what can be.
        receiver.script("partner-03", Behaviour(status=429, retry_after=1.0, times=1))
        receiver.script("partner-07", Behaviour(status=503, times=2))
        receiver.script("partner-11", Behaviour(drop=True, times=1))
        receiver.script("partner-13", Behaviour(status=410))
        config = _write_config(folder, receiver)
        settings = load_settings(config)
        console.print(f"[bold]incident-broadcaster demo[/] — config {config}")
        console.print(
            f"simulated receivers at {receiver.url}: partner-03 answers 429 once, partner-07 "
            "503 twice, partner-11 drops the connection once, partner-13 is gone (410)\n"
        )
        async with await Broadcaster.open(settings=settings) as broadcaster:
            now = datetime.now(UTC)
            steps = [
                (
                    "1. Investigating",
                    False,
                    UpdateRequest(
                        status=IncidentStatus.INVESTIGATING,
                        title="Charging sessions cannot be started from the app",
                        components={
                            "app": ComponentState.MAJOR_OUTAGE,
                            "api": ComponentState.PARTIAL_OUTAGE,
                        },
                        fields={
                            "summary": "Starting a charge from the app fails for most users.",
                            "summary.fr": "Le démarrage d'une recharge depuis l'application "
                            "échoue pour la plupart des utilisateurs.",
                        },
                        next_update_at=now + timedelta(minutes=15),
                        actor="demo",
                    ),
                ),
                (
                    "2. Identified",
                    True,
                    UpdateRequest(
                        status=IncidentStatus.IDENTIFIED,
                        fields={
                            "summary": "A faulty release of our payment service blocks new "
                            "charging sessions.",
                            "summary.fr": "Une version défectueuse de notre service de "
                            "paiement bloque les nouvelles recharges.",
                            "eta": "within the hour",
                            "eta.fr": "d'ici une heure",
                            "workaround": "Use the RFID card at the charger.",
                            "workaround.fr": "Utilisez le badge RFID à la borne.",
                        },
                        next_update_at=now + timedelta(minutes=30),
                        actor="demo",
                    ),
                ),
                (
                    "3. Resolved",
                    True,
                    UpdateRequest(
                        status=IncidentStatus.RESOLVED,
                        fields={
                            "summary": "The release was rolled back; charging works again.",
                            "summary.fr": "La version a été retirée ; la recharge fonctionne "
                            "de nouveau.",
                        },
                        actor="demo",
                    ),
                ),
            ]
            incident_id: int | None = None
            for heading, follow_up, request in steps:
                console.print(Rule(heading))
                target = incident_id if follow_up else None
                console.print(preview_view(await broadcaster.preview(request, target), max_lines=6))
                result = await broadcaster.publish(request, target)
                incident_id = result.incident.id
                await watch_deliveries(broadcaster, [result.update.id], console)
            assert incident_id is not None
            console.print(Rule("Result"))
            progress = await broadcaster.progress(incident_id)
            console.print(
                progress_table(progress, title=f"all deliveries of incident #{incident_id}")
            )
            failures = [d for p in progress for d in p.failures]
            if failures:
                console.print(failures_table(failures))
        signed = sum(1 for r in receiver.received if r.signature_valid)
        console.print(
            f"the simulator received {len(receiver.received)} webhooks "
            f"({signed} with a valid signature) after {len(receiver.attempts)} attempts"
        )
    site = folder / "public" / "index.html"
    console.print(
        f"status page: [bold]{site}[/] (and {site.parent}/fr/index.html, banner.js, "
        "status.en.json, feed.atom)"
    )
    console.print(
        f"done in {time.monotonic() - started:.1f}s — explore with "
        f"`broadcaster --config {config} show {incident_id}`"
    )
