"""`broadcaster worker` and the procrastinate backend as an operator meets them: the job
tables made by `db upgrade`, a config that cannot work refused with a clear line, doctor
saying whether any worker runs, and a worker that stops cleanly on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import tomli_w
from typer.testing import CliRunner

from broadcaster.cli import app
from broadcaster.sandbox import Behaviour, WebhookReceiver
from tests.conftest import TEST_WORKERS, fresh_postgres, webhook_channel


def write_config(folder: Path, receiver: WebhookReceiver, **extra: Any) -> Path:
    store = fresh_postgres().replace("postgresql+psycopg://", "postgresql://")
    config = {
        "store": store,
        "backend": "procrastinate",
        "workers": TEST_WORKERS,
        "channels": {"hooks": webhook_channel(receiver, ["a", "b"])},
        **extra,
    }
    path = folder / "broadcaster.toml"
    path.write_text(tomli_w.dumps(config))
    return path


def invoke(config: Path, *args: str) -> Any:
    return CliRunner().invoke(app, ["--config", str(config), *args])


def job_tables(store: str) -> bool:
    with psycopg.connect(store) as conn:
        row = conn.execute("SELECT to_regclass('procrastinate_jobs') IS NOT NULL").fetchone()
    return bool(row and row[0])


def start_worker(config: Path, log: Path) -> subprocess.Popen[bytes]:
    broadcaster = Path(sys.executable).parent / "broadcaster"
    return subprocess.Popen(
        [str(broadcaster), "-c", str(config), "worker"],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "NO_PROXY": "127.0.0.1,localhost"},
    )


def test_db_upgrade_makes_the_job_tables_once(
    tmp_path: Path, thread_receiver: WebhookReceiver
) -> None:
    config = write_config(tmp_path, thread_receiver)
    store = fresh_postgres().replace("postgresql+psycopg://", "postgresql://")
    assert not job_tables(store)
    first = invoke(config, "db", "upgrade")
    assert first.exit_code == 0, first.output
    assert "created the procrastinate job tables" in first.output
    assert job_tables(store)
    again = invoke(config, "db", "upgrade")  # nothing to do, and no error
    assert again.exit_code == 0, again.output
    assert "created" not in again.output


def test_procrastinate_on_sqlite_is_refused_with_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "broadcaster.toml"
    path.write_text(tomli_w.dumps({"store": "sqlite:///b.db", "backend": "procrastinate"}))
    result = invoke(path, "doctor")
    assert result.exit_code != 0
    assert 'backend = "procrastinate" needs store = "postgresql://' in result.output
    assert "Traceback" not in result.output


def test_worker_on_the_embedded_backend_says_why_not(tmp_path: Path) -> None:
    path = tmp_path / "broadcaster.toml"
    path.write_text(tomli_w.dumps({"store": "sqlite:///b.db"}))
    result = invoke(path, "worker")
    assert result.exit_code != 0
    assert 'workers run with backend = "procrastinate"' in result.output


def test_doctor_says_whether_a_worker_runs_and_a_worker_stops_cleanly_on_sigterm(
    tmp_path: Path, thread_receiver: WebhookReceiver
) -> None:
    receiver = thread_receiver
    config = write_config(tmp_path, receiver)
    none = invoke(config, "doctor")
    assert "no `broadcaster worker` is running on this store" in none.output
    assert none.exit_code != 0

    # A send in flight when SIGTERM comes, shorter than the graceful stop (half of
    # stalled_seconds): it is finished and recorded, not cut short.
    receiver.default(Behaviour(delay=0.6))
    worker = start_worker(config, tmp_path / "worker.log")
    try:
        deadline = time.monotonic() + 30
        while "1 `broadcaster worker` process(es) running" not in invoke(config, "doctor").output:
            assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()
            time.sleep(0.2)
        published = invoke(
            config, "open", "--title", "API down", "--set", "summary=Down", "-y", "--no-wait"
        )
        assert published.exit_code == 0, published.output
        while not receiver.attempts:
            assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()
            time.sleep(0.05)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
    # It finished the sends it had started before stopping: nothing left in flight.
    status = invoke(config, "status", "1", "--json")
    assert status.exit_code == 0, status.output
    assert '"sending"' not in status.output
    assert len(receiver.received) == len(receiver.attempts) >= 1
