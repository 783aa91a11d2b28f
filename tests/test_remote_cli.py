"""The CLI against a running `broadcaster serve` on 127.0.0.1: the same commands and the
same output as on the local store, with a token instead of provider secrets."""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from broadcaster.cli import app
from broadcaster.sandbox import WebhookReceiver
from tests.test_cli import (
    SECRET,
    SECRET_ENV,
    TITLE,
    Cli,
    assert_one_line_error,
    clean_environment,  # noqa: F401  (autouse: no BROADCASTER_* from the shell)
    counts,
    open_args,
    write_config,
)
from tests.test_serve import free_port, wait_for

TOKENS = {"comms": "comms-token-1", "dashboard": "dashboard-token-2", "ops": "ops-token-3"}


class Server:
    """`broadcaster serve` in a subprocess, with an admin API token per scope."""

    def __init__(
        self,
        folder: Path,
        receiver: WebhookReceiver,
        env: dict[str, str] | None = None,
        **config: Any,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.store = folder / "broadcaster.db"
        self.log = folder / "serve.log"  # a file, not a pipe nobody reads: never blocks
        self.config = write_config(
            folder,
            receiver,
            serve={
                "port": self.port,
                # Fuzzing sends refused requests by the hundred: limits are tested elsewhere.
                "rate_limit_per_ip": {"inbound": {"rate": "off"}},
                "api_tokens": [
                    {"name": "comms", "scope": "publish", "secret": {"env": "COMMS_TOKEN"}},
                    {"name": "dashboard", "scope": "read", "secret": {"env": "DASH_TOKEN"}},
                    {"name": "ops", "scope": "admin", "secret": {"env": "OPS_TOKEN"}},
                ],
            },
            **config,
        )
        env = {
            "PATH": "/usr/bin:/bin",
            SECRET_ENV: SECRET,
            "COMMS_TOKEN": TOKENS["comms"],
            "DASH_TOKEN": TOKENS["dashboard"],
            "OPS_TOKEN": TOKENS["ops"],
            **(env or {}),
        }
        self.process = subprocess.Popen(
            [str(Path(sys.executable).with_name("broadcaster")), "--config", str(self.config),
             "serve"],
            env=env, stdout=subprocess.DEVNULL, stderr=self.log.open("w"),
        )  # fmt: skip
        wait_for(lambda: urllib.request.urlopen(f"{self.url}/healthz", timeout=2), timeout=20)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


@pytest.fixture
def server(tmp_path: Path, thread_receiver: WebhookReceiver) -> Iterator[Server]:
    running = Server(tmp_path, thread_receiver)
    try:
        yield running
    finally:
        running.stop()


class Remote:
    """`broadcaster --server URL ...` with a token, from a folder with no config."""

    def __init__(self, url: str, token: str | None) -> None:
        self.url, self.token = url, token
        self.runner = CliRunner()

    def __call__(self, *args: str):  # type: ignore[no-untyped-def]
        env = {"BROADCASTER_ACTOR": "cli:alice", "BROADCASTER_TOKEN": self.token or ""}
        return self.runner.invoke(app, ["--server", self.url, *args], env=env)

    def ok(self, *args: str) -> str:
        result = self(*args)
        assert result.exception is None, (result.exception, result.output)
        assert result.exit_code == 0, result.output
        return result.stdout


def test_publish_remotely_and_every_reading_prints_as_it_does_locally(
    server: Server, thread_receiver: WebhookReceiver
) -> None:
    remote = Remote(server.url, TOKENS["comms"])
    local = Cli(server.config)

    preview = remote.ok(*open_args("--dry-run"))
    assert "dry run: nothing stored, nothing sent" in preview and TITLE in preview
    assert remote.ok("incidents", "--json").strip() == "[]"

    published = remote.ok(*open_args("--yes", "--json"))  # waits until delivered
    assert '"new": true' in published
    assert len(thread_receiver.received) == 3  # the server sent it, with its own secret

    remote.ok("update", "1", "--status", "identified", "--set", "summary=A bad deploy.", "--yes")
    for command in (
        ["incidents"],
        ["show", "1"],
        ["status", "1"],
        ["status", "1", "--json"],
        ["drafts"],
        ["channels"],
        ["templates", "list"],
        ["templates", "preview", "investigating"],
    ):
        assert remote.ok(*command) == local.ok(*command).stdout, command
    shown = remote.ok("show", "1")
    assert "cli:alice via api:comms" in shown  # the audit trail names person and token

    remote.ok("resolve", "1", "--yes")
    assert counts(local.json("status", "1"))["partners"] == {"delivered": 9}


def test_remote_errors_are_one_clear_line(server: Server, tmp_path: Path) -> None:
    local = Cli(server.config)
    remote = Remote(server.url, TOKENS["comms"])

    same = assert_one_line_error(remote("show", "99"))
    assert same == assert_one_line_error(local("show", "99"))
    unchecked = remote("open", "--title", TITLE, "--yes")  # no summary: a check fails
    assert_one_line_error(unchecked, "fix the checks above")
    assert "summary" in unchecked.stdout

    reader = Remote(server.url, TOKENS["dashboard"])
    assert_one_line_error(reader(*open_args("--yes")), "refused the token", "needs publish")
    assert_one_line_error(
        Remote(server.url, "stolen")(*open_args("--yes")), "refused the token", "unknown token"
    )
    assert_one_line_error(Remote(server.url, None)("incidents"), "BROADCASTER_TOKEN is not set")
    assert_one_line_error(remote("dispatch"), "works on the store itself")
    gone = Remote(f"http://127.0.0.1:{free_port()}", TOKENS["comms"])
    assert_one_line_error(gone("incidents"), "cannot reach")
    assert local.json("incidents") == []  # no refused command published anything
