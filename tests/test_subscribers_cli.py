"""`broadcaster subscribers …` on the local store and through a running `serve`: add,
import a CSV with a report of the rows refused, list (addresses masked unless --full),
opt out, export and erase."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from broadcaster.cli import app
from broadcaster.sandbox import WebhookReceiver
from tests.test_cli import (
    Cli,
    assert_one_line_error,
    clean_environment,  # noqa: F401  (autouse: no BROADCASTER_* from the shell)
)
from tests.test_remote_cli import TOKENS, Remote, Server
from tests.test_subscribers_api import COMPONENTS, CSV, EMAIL

BANNER = {"type": "banner", "languages": ["en", "fr"], "output": "public"}
CHANNELS = {"status-page": BANNER, "email": EMAIL}
ALICE = ["--phone", "+33 6 12 34 56 78", "--email", "alice@example.com", "--language", "fr"]


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Cli:
    monkeypatch.setenv("BROADCASTER_ACTOR", "cli:alice")
    config: dict[str, Any] = {
        "store": "sqlite:///broadcaster.db",
        "components": COMPONENTS,
        "channels": CHANNELS,
    }
    path = tmp_path / "broadcaster.toml"
    path.write_text(tomli_w.dumps(config))
    return Cli(path)


@pytest.fixture
def people_csv(tmp_path: Path) -> Path:
    path = tmp_path / "people.csv"
    path.write_text(CSV)
    return path


def test_add_shows_addresses_masked_and_refuses_in_one_line(cli: Cli) -> None:
    added = cli.ok("subscribers", "add", *ALICE, "--component", "api", "--channel", "email")
    assert added.stdout.strip() == "added subscriber #1 (+336•••••78, a•••@example.com) to email"

    assert_one_line_error(cli("subscribers", "add", *ALICE), "already a subscriber (#1)")
    assert_one_line_error(
        cli("subscribers", "add", "--email", "bob@example.com", "--channel", "sms"),
        "'sms' is not a subscriber channel",
    )
    assert_one_line_error(
        cli("subscribers", "add", "--email", "bob@example.com", "--component", "billing"),
        "unknown component 'billing'",
    )
    assert_one_line_error(
        cli("subscribers", "add", "--email", "bob@example.com", "--timezone", "Mars/Base"),
        "--timezone",
    )
    assert_one_line_error(cli("subscribers", "add"), "needs a phone number, an email")
    assert [s["id"] for s in cli.json("subscribers", "list")] == [1]


def test_import_reports_rejected_rows_and_exits_zero(cli: Cli, people_csv: Path) -> None:
    out = cli.ok("subscribers", "import", str(people_csv)).stdout
    assert "added 2, updated 1, rejected 5" in out
    table = {line.split("│")[1].strip(): line for line in out.splitlines() if "│" in line}
    assert sorted(k for k in table if k.isdigit()) == ["3", "4", "5", "6", "7"]
    assert "is not a" in table["3"] and "not-an-email" in table["4"]
    assert "unknown component 'billing'" in table["5"] and "'sms'" in table["6"]
    assert "needs a phone number, an email" in table["7"]

    cli.ok("subscribers", "opt-out", "1", "email")
    again = cli.json("subscribers", "import", str(people_csv))
    assert (again["added"], again["updated"], len(again["rejected"])) == (0, 3, 5)
    listed = cli.json("subscribers", "list")
    assert [(s["id"], s["channels"]) for s in listed] == [
        (1, {"email": False}),  # opted out, and the import did not undo it
        (2, {"email": True}),
    ]
    assert [s["id"] for s in cli.json("subscribers", "list", "--channel", "email")] == [2]


def test_an_unreadable_file_is_one_line_and_stores_nothing(cli: Cli, tmp_path: Path) -> None:
    assert_one_line_error(
        cli("subscribers", "import", str(tmp_path / "missing.csv")), "cannot read"
    )
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("name,email\nAlice,alice@example.com\n")
    assert_one_line_error(cli("subscribers", "import", str(wrong)), "unknown: name")
    latin = tmp_path / "latin.csv"
    latin.write_bytes("email,language\nzoé@example.com,fr\n".encode("latin-1"))
    assert_one_line_error(cli("subscribers", "import", str(latin)), "not UTF-8")
    assert cli.json("subscribers", "list") == []

    piped = cli.runner.invoke(
        app,
        ["--config", str(cli.config), "subscribers", "import", "-"],
        input="email\nzoe@example.com\n",
    )
    assert piped.exit_code == 0 and "added 1" in piped.stdout, piped.output


def test_list_masks_addresses_unless_full(cli: Cli) -> None:
    cli.ok("subscribers", "add", *ALICE)
    table = cli.ok("subscribers", "list").stdout
    assert "+336•••••78" in table and "a•••@example.com" in table
    assert "alice@" not in table and "612345678" not in table
    full = cli.ok("subscribers", "list", "--full").stdout
    assert "+33612345678" in full and "alice@example.com" in full
    [masked] = cli.json("subscribers", "list")
    assert (masked["phone"], masked["email"]) == ("+336•••••78", "a•••@example.com")
    [whole] = cli.json("subscribers", "list", "--full")
    assert (whole["phone"], whole["email"]) == ("+33612345678", "alice@example.com")
    assert cli.ok("subscribers", "list", "--after", "1").stdout.strip() == "no subscribers"
    assert_one_line_error(
        cli("subscribers", "list", "--channel", "sms"), "'sms' is not a subscriber channel"
    )


def test_export_then_erase(cli: Cli) -> None:
    cli.ok("subscribers", "add", *ALICE)
    export = json.loads(cli.ok("subscribers", "export", "1").stdout)
    assert export["subscriber"]["email"] == "alice@example.com"
    assert export["deliveries"] == []

    unconfirmed = cli("subscribers", "erase", "1")  # not a terminal, no --yes
    assert_one_line_error(unconfirmed, "pass --yes")
    assert cli.json("subscribers", "list") != []
    assert cli.ok("subscribers", "erase", "1", "--yes").stdout.strip() == "erased subscriber #1"
    assert_one_line_error(cli("subscribers", "export", "1"), "no subscriber #1")
    assert_one_line_error(cli("subscribers", "erase", "1", "--yes"), "no subscriber #1")


# -- through `broadcaster serve` ---------------------------------------------------------


@pytest.fixture
def server(tmp_path: Path, thread_receiver: WebhookReceiver) -> Iterator[Server]:
    running = Server(tmp_path, thread_receiver, components=COMPONENTS, channels=CHANNELS)
    try:
        yield running
    finally:
        running.stop()


def test_remote_subscribers_print_as_locally_and_the_server_logs_no_address(
    server: Server, people_csv: Path
) -> None:
    comms, ops = Remote(server.url, TOKENS["comms"]), Remote(server.url, TOKENS["ops"])
    local = Cli(server.config)

    added = comms.ok("subscribers", "add", *ALICE)
    assert added.strip() == "added subscriber #1 (+336•••••78, a•••@example.com) to email"
    assert_one_line_error(comms("subscribers", "add", *ALICE), "already a subscriber (#1)")
    assert "added 1, updated 2, rejected 5" in comms.ok("subscribers", "import", str(people_csv))
    comms.ok("subscribers", "opt-out", "1", "email")
    for command in (["subscribers", "list"], ["subscribers", "list", "--full", "--json"]):
        assert comms.ok(*command) == local.ok(*command).stdout, command

    refused = assert_one_line_error(comms("subscribers", "export", "1"))
    assert "needs admin" in refused
    assert json.loads(ops.ok("subscribers", "export", "1"))["subscriber"]["channels"] == {
        "email": False
    }
    assert ops.ok("subscribers", "erase", "1", "--yes").strip() == "erased subscriber #1"
    assert [s["id"] for s in local.json("subscribers", "list")] == [2]

    server.stop()
    logged = server.log.read_text()
    assert "subscriber #1 added (+336•••••78, a•••@example.com)" in logged
    for address in ("alice@", "bob@", "612345678", "+33 6 12"):
        assert address not in logged, address
