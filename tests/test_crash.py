"""A CLI killed with SIGKILL mid-fan-out loses nothing, and re-sends only what was in flight."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import tomli_w

from broadcaster.sandbox import Behaviour, WebhookReceiver

RECIPIENTS = 2000
CONCURRENCY = 16
BROADCASTER = str(Path(sys.executable).with_name("broadcaster"))


def write_config(folder: Path, receiver: WebhookReceiver) -> Path:
    config = {
        "store": "sqlite:///broadcaster.db",
        "channels": {
            "partners": {
                "type": "webhook",
                "targets": [
                    {"name": f"p{i:05d}", "url": receiver.target(f"p{i:05d}")}
                    for i in range(RECIPIENTS)
                ],
                "concurrency": CONCURRENCY,
                "rate_limit": {},
            }
        },
    }
    path = folder / "broadcaster.toml"
    path.write_text(tomli_w.dumps(config))
    return path


def delivery_states(database: Path) -> dict[str, str]:
    with sqlite3.connect(database) as conn:
        return dict(conn.execute("SELECT delivery_key, state FROM deliveries"))


def test_sigkill_midway_loses_nothing_and_duplicates_at_most_the_in_flight(
    tmp_path: Path, thread_receiver: WebhookReceiver
) -> None:
    thread_receiver.default(Behaviour(delay=0.02))  # slow enough to be caught mid-fan-out
    config = write_config(tmp_path, thread_receiver)
    child = subprocess.Popen(
        [
            BROADCASTER,
            "--config",
            str(config),
            "open",
            "--title",
            "Payments down",
            "--set",
            "summary=Card payments fail.",
            "--yes",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while len(thread_receiver.received) < RECIPIENTS // 3:
            assert child.poll() is None, child.stderr.read() if child.stderr else ""
            assert time.monotonic() < deadline, "the fan-out never got going"
            time.sleep(0.005)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
    at_kill = delivery_states(tmp_path / "broadcaster.db")
    received_before_restart = len(thread_receiver.received)
    assert len(at_kill) == RECIPIENTS  # the publish transaction stored every delivery
    assert received_before_restart < RECIPIENTS  # the kill really came midway
    in_flight = {key for key, state in at_kill.items() if state == "sending"}
    assert len(in_flight) <= CONCURRENCY

    resumed = subprocess.run(
        [BROADCASTER, "--config", str(config), "dispatch"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert resumed.returncode == 0, resumed.stderr

    thread_receiver.wait_for_blocking(RECIPIENTS, timeout=10)
    final = delivery_states(tmp_path / "broadcaster.db")
    assert set(final.values()) == {"delivered"}
    counts = Counter(r.webhook_id for r in thread_receiver.received)
    assert set(counts) == set(final)  # every recipient received the update: none lost
    duplicated = {key for key, n in counts.items() if n > 1}
    assert all(n == 2 for n in counts.values() if n > 1)
    # Only deliveries in flight at the kill may arrive twice, and they are bounded by
    # the channel's concurrency.
    assert duplicated <= in_flight
    assert len(duplicated) <= CONCURRENCY
