"""The `broadcaster` command end to end: a real broadcaster.toml in a tmp folder, a webhook
channel pointed at the receiver simulator (on its own thread, since the CLI runs its own
event loop with `asyncio.run`), and a banner channel writing the status page to a folder."""

from __future__ import annotations

import base64
import getpass
import json
import os
import sqlite3
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from click.testing import Result
from standardwebhooks import Webhook
from typer.testing import CliRunner

from broadcaster.cli import app
from broadcaster.sandbox import Behaviour, WebhookReceiver
from tests.conftest import webhook_channel

SECRET_ENV = "TEST_CLI_WEBHOOK_SECRET"
SECRET = "whsec_" + base64.b64encode(b"incident-broadcaster-cli-test").decode()
PARTNERS = ["ops-bridge", "pager", "mirror"]
TITLE = "Payments fail at checkout"
SUMMARY = "summary=Card payments fail for most users."


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No BROADCASTER_* variable from the developer's shell may steer these tests."""
    for name in list(os.environ):
        if name.startswith("BROADCASTER_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv(SECRET_ENV, SECRET)
    # Wide enough that rich never wraps a table cell or a message the tests look for.
    monkeypatch.setenv("COLUMNS", "200")


def write_config(folder: Path, receiver: WebhookReceiver, **extra: Any) -> Path:
    """A broadcaster.toml with a banner channel and a signed webhook channel to `receiver`."""
    config: dict[str, Any] = {
        "store": "sqlite:///broadcaster.db",
        "page_title": "Example Co. status",
        "dispatch": {"poll_seconds": 0.05, "lease_seconds": 5},
        "components": {"api": "Public API", "app": "Mobile app"},
        "channels": {
            "status-page": {"type": "banner", "languages": ["en", "fr"], "output": "public"},
            "partners": webhook_channel(receiver, PARTNERS, secret={"env": SECRET_ENV}),
        },
        **extra,
    }
    path = folder / "broadcaster.toml"
    path.write_text(tomli_w.dumps(config))
    return path


@pytest.fixture
def config(tmp_path: Path, thread_receiver: WebhookReceiver) -> Path:
    return write_config(tmp_path, thread_receiver)


class Cli:
    """`broadcaster --config PATH ...` through typer's CliRunner."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.runner = CliRunner()

    def __call__(self, *args: str, env: dict[str, str] | None = None) -> Result:
        return self.runner.invoke(app, ["--config", str(self.config), *args], env=env)

    def ok(self, *args: str, env: dict[str, str] | None = None) -> Result:
        result = self(*args, env=env)
        assert result.exception is None, (result.exception, result.output)
        assert result.exit_code == 0, result.output
        return result

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "--json").stdout)


@pytest.fixture
def cli(config: Path) -> Cli:
    return Cli(config)


def assert_one_line_error(result: Result, *fragments: str) -> str:
    """Exit 1 through the CLI's own error path: one line on stderr, no traceback."""
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # not a crash
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def counts(status: dict[str, Any]) -> dict[str, dict[str, int]]:
    return {c["channel"]: c["counts"] for c in status["channels"]}


def open_args(*extra: str) -> list[str]:
    return ["open", "--title", TITLE, "--set", SUMMARY, *extra]


# -- init and doctor ---------------------------------------------------------------------


def test_init_writes_a_commented_config_that_doctor_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(SECRET_ENV)
    runner = CliRunner()
    result = runner.invoke(app, ["init"])
    assert result.exit_code == 0, result.output
    written = tmp_path / "broadcaster.toml"
    assert written.read_text().startswith("# broadcaster.toml")

    doctor = runner.invoke(app, ["doctor"])
    # It loads; the only problem is the webhook secret nobody has set yet.
    assert isinstance(doctor.exception, SystemExit) and doctor.exit_code == 1, doctor.output
    assert "Traceback" not in doctor.output
    assert "✓ config" in doctor.stdout and "✓ store" in doctor.stdout
    problems = [line for line in doctor.stdout.splitlines() if line.startswith("✗")]
    assert len(problems) == 1, doctor.stdout
    assert "PARTNERS_WEBHOOK_SECRET" in problems[0]


def test_init_refuses_to_overwrite_without_force(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    runner.invoke(app, ["init"])
    (tmp_path / "broadcaster.toml").write_text("# mine\n")

    refused = runner.invoke(app, ["init"])
    assert_one_line_error(refused, "exists", "--force")
    assert (tmp_path / "broadcaster.toml").read_text() == "# mine\n"

    forced = runner.invoke(app, ["init", "--force"])
    assert forced.exit_code == 0, forced.output
    assert (tmp_path / "broadcaster.toml").read_text().startswith("# broadcaster.toml")


def test_init_writes_where_config_points(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "ops" / "status.toml"
    target.parent.mkdir()
    result = CliRunner().invoke(app, ["--config", str(target), "init"])
    assert result.exit_code == 0, result.output
    assert target.read_text().startswith("# broadcaster.toml")
    assert not (tmp_path / "broadcaster.toml").exists()
    assert f"broadcaster --config {target} doctor" in result.stdout

    nowhere = tmp_path / "missing" / "status.toml"
    assert_one_line_error(
        CliRunner().invoke(app, ["--config", str(nowhere), "init"]), f"cannot write {nowhere}"
    )


# -- publishing --------------------------------------------------------------------------


def test_dry_run_shows_every_channel_and_sends_and_stores_nothing(
    cli: Cli, thread_receiver: WebhookReceiver
) -> None:
    result = cli.ok(*open_args("--dry-run"))
    out = result.stdout
    assert "status-page (long, template investigating)" in out
    assert "partners (long, template investigating)" in out
    assert "Card payments fail for most users." in out
    assert "en: " in out and "fr: " in out and "graphemes" in out  # the measures
    assert "✓ all checks passed" in out
    assert "nothing stored, nothing sent" in out
    assert thread_receiver.attempts == []
    assert cli.json("incidents") == []


def test_dry_run_json_is_parseable(cli: Cli, thread_receiver: WebhookReceiver) -> None:
    preview = json.loads(cli.ok(*open_args("--dry-run", "--json")).stdout)
    assert {r["channel"] for r in preview["renders"]} == {"status-page", "partners"}
    assert preview["failures"] == []
    assert thread_receiver.attempts == []


def test_open_yes_publishes_signed_webhooks_and_the_status_page(
    cli: Cli, thread_receiver: WebhookReceiver, tmp_path: Path
) -> None:
    result = cli.ok(*open_args("--component", "api=major_outage", "--yes"))
    assert "published update #1 of incident #1 (investigating)" in result.stdout

    received = thread_receiver.received
    assert sorted(r.path for r in received) == sorted(f"/hook/{n}" for n in PARTNERS)
    for request in received:  # Standard Webhooks signature over the exact body
        Webhook(SECRET).verify(request.raw, request.headers)
        assert request.body is not None and request.body["title"] == TITLE

    (incident,) = cli.json("incidents")
    assert incident["id"] == 1 and incident["title"] == TITLE
    assert incident["status"] == "investigating"
    assert counts(cli.json("status", "1")) == {
        "partners": {"delivered": 3},
        "status-page": {"delivered": 1},
    }
    page = (tmp_path / "public" / "index.html").read_text()
    assert TITLE in page
    assert (tmp_path / "public" / "fr" / "index.html").is_file()


def test_progress_table_ends_its_line_when_output_is_not_a_terminal(cli: Cli) -> None:
    # Regression: rich's Live leaves the cursor after the table when not on a terminal,
    # so the next output (the demo's next heading, the shell prompt) was glued to `┘`.
    out = cli.ok(*open_args("--yes")).stdout
    assert out.endswith("┘\n")


def test_update_and_resolve_thread_the_incident_with_an_audit_trail(
    cli: Cli, thread_receiver: WebhookReceiver
) -> None:
    cli.ok(*open_args("--component", "api=major_outage", "--yes"))
    cli.ok(
        "update", "1", "--status", "identified",
        "--set", "summary=An expired certificate blocks card payments.",
        "--set", "eta=within the hour",
        "--next-update", "30m", "--yes",
    )  # fmt: skip
    cli.ok("resolve", "1", "--yes", env={"BROADCASTER_ACTOR": "pagerduty:alice"})

    shown = cli.json("show", "1")
    assert [u["status"] for u in shown["updates"]] == ["investigating", "identified", "resolved"]
    assert shown["updates"][1]["fields"]["eta"] == "within the hour"
    assert shown["updates"][1]["next_update_at"] is not None
    assert shown["status"] == "resolved"
    assert shown["components"] == {"api": "operational"}
    publishes = [(a["update_id"], a["actor"]) for a in shown["audit"] if a["action"] == "publish"]
    me = f"cli:{getpass.getuser()}"
    assert publishes == [(1, me), (2, me), (3, "pagerduty:alice")]
    assert len(thread_receiver.received) == 3 * len(PARTNERS)
    assert counts(cli.json("status", "1")) == {
        "partners": {"delivered": 9},
        "status-page": {"delivered": 3},
    }


def test_publishing_without_yes_and_without_a_terminal_refuses(
    cli: Cli, thread_receiver: WebhookReceiver
) -> None:
    assert_one_line_error(cli(*open_args()), "pass --yes")
    assert thread_receiver.attempts == []
    assert cli.json("incidents") == []


def test_same_publish_key_twice_sends_once_and_json_stays_parseable(
    cli: Cli, thread_receiver: WebhookReceiver
) -> None:
    first = json.loads(cli.ok(*open_args("--publish-key", "alert-42", "--yes", "--json")).stdout)
    again = json.loads(cli.ok(*open_args("--publish-key", "alert-42", "--yes", "--json")).stdout)
    assert first["new"] is True and again["new"] is False
    assert again["update_id"] == first["update_id"]
    assert len(thread_receiver.received) == len(PARTNERS)


def test_json_publish_with_a_failed_check_says_which_check(cli: Cli) -> None:
    # Regression: with --json the preview is not printed, yet the error said "fix the
    # checks above" with nothing above it.
    result = cli("open", "--title", TITLE, "--yes", "--json")
    assert_one_line_error(result, "needs field 'summary'")
    assert result.stdout == ""


# -- error exits -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        pytest.param(open_args("--template", "nope", "--yes"), "unknown template 'nope'",
                     id="unknown-template"),
        pytest.param(["open", "--title", TITLE, "--yes"], "fix the checks above",
                     id="missing-required-field"),
        pytest.param(["open", "--title", TITLE, "--set", "summary=Back by {{eta}}", "--yes"],
                     "fix the checks above", id="unresolved-placeholder"),
        pytest.param(["show", "42"], "no incident #42", id="unknown-incident-show"),
        pytest.param(["update", "42", "--status", "identified", "--set", SUMMARY, "--yes"],
                     "no incident #42", id="unknown-incident-update"),
        pytest.param(["status", "42"], "no incident #42", id="unknown-incident-status"),
        pytest.param(["retry", "42"], "no incident #42", id="unknown-incident-retry"),
        pytest.param(["cancel", "42", "--yes"], "no incident #42", id="unknown-incident-cancel"),
        pytest.param(open_args("--channel", "nope", "--yes"), "unknown channel 'nope'",
                     id="unknown-channel"),
        pytest.param(open_args("--component", "db=major_outage", "--yes"),
                     "unknown component 'db'", id="unknown-component"),
        pytest.param(open_args("--next-update", "soon", "--yes"), "write it like 30m",
                     id="bad-next-update"),
        pytest.param(open_args("--component", "api=broken_state", "--yes"), "major_outage",
                     id="bad-component-state"),
        pytest.param(open_args("--component", "api", "--yes"), "not key=value",
                     id="component-without-state"),
        pytest.param(["open", "--title", TITLE, "--status", "fixed", "--set", SUMMARY, "--yes"],
                     "investigating", id="bad-status"),
        pytest.param(["templates", "preview", "nope"], "unknown template 'nope'",
                     id="preview-unknown-template"),
    ],
)  # fmt: skip
def test_errors_are_one_line_with_what_to_do(
    cli: Cli, thread_receiver: WebhookReceiver, args: list[str], expected: str
) -> None:
    assert_one_line_error(cli(*args), expected)
    assert thread_receiver.attempts == []


def test_failed_check_names_the_channel_and_the_placeholder(cli: Cli) -> None:
    result = cli("open", "--title", TITLE, "--set", "summary=Back by {{eta}}", "--yes")
    assert_one_line_error(result, "nothing was sent")
    assert "partners: unresolved placeholder '{{eta}}'" in result.stdout
    assert cli.json("incidents") == []


def test_missing_required_field_says_how_to_add_it(cli: Cli) -> None:
    result = cli("open", "--title", TITLE, "--yes")
    assert_one_line_error(result)
    assert "needs field 'summary' — add --set summary=..." in result.stdout


def test_status_of_an_unknown_channel_is_an_error(cli: Cli) -> None:
    # Regression: a typo in --channel showed an empty table, as if nothing had been sent.
    cli.ok(*open_args("--yes"))
    assert_one_line_error(cli("status", "1", "--channel", "partnrs"), "unknown channel 'partnrs'")


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broadcaster.toml"
    path.write_text('store = "sqlite:///broadcaster.db\n')
    assert_one_line_error(Cli(path)("channels"), str(path), "not valid TOML")


@pytest.mark.parametrize(
    ("change", "key"),
    [
        pytest.param({"stor": "sqlite:///x.db"}, "stor", id="top-level"),
        pytest.param({"channels": {"partners": {"retries": 3}}}, "channels.partners.retries",
                     id="channel"),
        pytest.param({"dispatch": {"poll": 1}}, "dispatch.poll", id="nested"),
    ],
)  # fmt: skip
def test_unknown_config_key_names_the_file_and_the_key(
    tmp_path: Path, thread_receiver: WebhookReceiver, change: dict[str, Any], key: str
) -> None:
    path = write_config(tmp_path, thread_receiver)
    config = _merge(_load(path), change)
    path.write_text(tomli_w.dumps(config))
    assert_one_line_error(Cli(path)("channels"), f"{path}: {key}: unknown key")


def test_unknown_key_in_a_webhook_target_is_named(
    tmp_path: Path, thread_receiver: WebhookReceiver
) -> None:
    # Regression: with `targets: list[AnyHttpUrl | WebhookTarget]` the message named the
    # URL branch of the union ("targets.0.function-wrap[wrap_val()]: URL input should be…").
    path = write_config(tmp_path, thread_receiver)
    config = _load(path)
    config["channels"]["partners"]["targets"][0]["nam"] = "typo"
    path.write_text(tomli_w.dumps(config))
    assert_one_line_error(Cli(path)("channels"), "channels.partners.targets.0.nam: unknown key")


def test_missing_config_file_says_how_to_make_one(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.toml"
    assert_one_line_error(Cli(missing)("incidents"), str(missing), "broadcaster init")


def _load(path: Path) -> dict[str, Any]:
    return tomllib.loads(path.read_text())


def _merge(base: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


# -- retry, cancel, dispatch -------------------------------------------------------------


def test_retry_requeues_a_failed_delivery_and_delivers_it(
    cli: Cli, thread_receiver: WebhookReceiver
) -> None:
    thread_receiver.script("pager", Behaviour(status=410, times=1))
    cli.ok(*open_args("--yes"))
    assert counts(cli.json("status", "1"))["partners"] == {"delivered": 2, "failed": 1}

    failed = cli.ok("status", "1", "--failed").stdout
    assert "pager" in failed and "partners → pager: HTTP 410" in failed
    (failure,) = cli.json("status", "1", "--failed")["failed"]
    assert failure["recipient"] == "pager" and failure["last_error"] == "partners → pager: HTTP 410"

    assert "requeued 1 failed deliveries" in cli.ok("retry", "1").stdout
    assert counts(cli.json("status", "1"))["partners"] == {"delivered": 3}
    assert [a.status for a in thread_receiver.attempts if a.path == "/hook/pager"] == [410, 200]


def test_refused_credentials_exit_2_and_retry_sends_what_stayed_queued(
    cli: Cli, thread_receiver: WebhookReceiver
) -> None:
    thread_receiver.default(Behaviour(status=401))
    result = cli(*open_args("--yes"))
    assert result.exit_code == 2
    assert "channel partners is broken" in result.stderr
    assert "broadcaster retry 1" in result.stderr
    assert counts(cli.json("status", "1"))["partners"] == {"queued": 3}

    thread_receiver.default(Behaviour(status=200))  # the operator fixed the credentials
    cli.ok("retry", "1")
    assert counts(cli.json("status", "1"))["partners"] == {"delivered": 3}


def test_retry_of_an_unknown_channel_is_an_error(cli: Cli) -> None:
    cli.ok(*open_args("--yes"))
    assert_one_line_error(cli("retry", "1", "--channel", "nope"), "unknown channel 'nope'")


def test_cancel_stops_an_update_still_going_out(cli: Cli, thread_receiver: WebhookReceiver) -> None:
    # Slow receivers: were anything dispatched behind our back, the attempt would show.
    thread_receiver.default(Behaviour(delay=2))
    cli.ok(*open_args("--yes", "--no-wait"))
    assert "4 queued deliveries stopped" in cli.ok("cancel", "1", "--yes").stdout
    assert counts(cli.json("status", "1")) == {
        "partners": {"cancelled": 3},
        "status-page": {"cancelled": 1},
    }
    cli.ok("dispatch")
    assert thread_receiver.attempts == []
    assert counts(cli.json("status", "1"))["partners"] == {"cancelled": 3}
    (entry,) = [a for a in cli.json("show", "1")["audit"] if a["action"] != "publish"]
    assert entry["actor"] == f"cli:{getpass.getuser()}"


def test_correct_then_retract_change_what_was_said(
    cli: Cli, config: Path, thread_receiver: WebhookReceiver
) -> None:
    page = config.parent / "public" / "index.html"
    cli.ok(*open_args("--yes"))
    wrong = "summary=The bank's API is down."
    cli.ok("update", "1", "--status", "identified", "--set", wrong, "--yes")
    right = "summary=Our payment gateway is down."
    cli.ok("update", "1", "--status", "identified", "--set", right, "--correct", "--yes")
    assert "Our payment gateway is down" in page.read_text()
    assert "The bank" not in page.read_text()  # the correction stands in its place
    corrections = [r.body for r in thread_receiver.received if r.body and r.body["corrects"]]
    assert [b["update_id"] for b in corrections] == [3] * len(PARTNERS)
    assert [b["corrects"] for b in corrections] == [2] * len(PARTNERS)

    shown = cli.ok("retract", "1", "--dry-run").stdout
    assert "retracting update #3" in shown and "dry run" in shown
    assert "cannot delete" in shown and "Our payment gateway is down" in page.read_text()
    assert_one_line_error(cli("retract", "1"), "pass --yes")
    cli.ok("retract", "1", "--yes")
    assert "Our payment gateway is down" not in page.read_text()
    assert "Card payments fail" in page.read_text()
    status = cli.json("status", "1")["channels"]
    assert {(c["channel"], c["action"]): c["counts"] for c in status} == {
        ("partners", "post"): {"delivered": 9},
        ("status-page", "post"): {"delivered": 2},
        ("status-page", "edit"): {"delivered": 1},
        ("status-page", "delete"): {"delivered": 1},
    }
    assert "retract" in [a["action"] for a in cli.json("show", "1")["audit"]]
    assert_one_line_error(cli("retract", "1", "--update", "3", "--yes"), "already retracted")


def test_cancel_without_yes_and_without_a_terminal_refuses(cli: Cli) -> None:
    cli.ok(*open_args("--yes", "--no-wait"))
    assert_one_line_error(cli("cancel", "1"), "pass --yes")
    assert counts(cli.json("status", "1"))["partners"] == {"queued": 3}


def test_no_wait_leaves_deliveries_queued_until_dispatch(
    cli: Cli, thread_receiver: WebhookReceiver
) -> None:
    cli.ok(*open_args("--yes", "--no-wait"))
    assert thread_receiver.attempts == []
    assert counts(cli.json("status", "1")) == {
        "partners": {"queued": 3},
        "status-page": {"queued": 1},
    }
    cli.ok("dispatch")
    assert len(thread_receiver.received) == len(PARTNERS)
    assert counts(cli.json("status", "1")) == {
        "partners": {"delivered": 3},
        "status-page": {"delivered": 1},
    }


# -- templates, channels, store ----------------------------------------------------------


SHIPPED = ["investigating", "identified", "monitoring", "resolved", "holding"]


def test_templates_list_shows_the_shipped_templates(cli: Cli) -> None:
    out = cli.ok("templates", "list").stdout
    for name in SHIPPED:
        assert name in out
    assert "summary" in out  # the required field


def test_templates_preview_renders_with_the_example_fields(cli: Cli) -> None:
    out = cli.ok("templates", "preview", "investigating").stdout
    assert "Payments fail for some users" in out  # the template's example summary
    assert "Example incident" in out
    assert "✓ all checks passed" in out


def test_templates_check_passes_for_the_shipped_templates(cli: Cli) -> None:
    assert "every template fits every channel" in cli.ok("templates", "check").stdout


def test_templates_check_fails_naming_a_broken_user_template(
    tmp_path: Path, thread_receiver: WebhookReceiver
) -> None:
    broken = tmp_path / "my-templates" / "outage_notice"
    broken.mkdir(parents=True)
    (broken / "template.toml").write_text(
        'description = "Ours"\nrequired = ["summary"]\n[example]\nsummary = "Down"\n'
    )
    (broken / "long.en.j2").write_text("{{ summary | no_such_filter }}\n")
    path = write_config(tmp_path, thread_receiver, templates_dir="my-templates")
    result = Cli(path)("templates", "check")
    assert_one_line_error(result, "template problem")
    assert "template 'outage_notice'" in result.stdout
    assert "template 'investigating'" not in result.stdout  # the shipped ones still fit


def test_channels_lists_the_configured_channels(cli: Cli) -> None:
    rows = {line.split()[1]: line for line in cli.ok("channels").stdout.splitlines()
            if line.startswith("│")}  # fmt: skip
    assert set(rows) == {"status-page", "partners"}
    assert "banner" in rows["status-page"] and "webhook" in rows["partners"]


def test_db_backup_copies_the_incidents_and_refuses_to_overwrite(cli: Cli, tmp_path: Path) -> None:
    cli.ok(*open_args("--yes"))
    copy = tmp_path / "backup.db"
    cli.ok("db", "backup", str(copy))
    with sqlite3.connect(copy) as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
        assert "incidents" in tables, tables
        assert db.execute("SELECT count(*) FROM incidents").fetchone() == (1,)
    size = copy.stat().st_size
    assert_one_line_error(cli("db", "backup", str(copy)), str(copy), "exists")
    assert copy.stat().st_size == size


# -- start-up and demo -------------------------------------------------------------------


HEAVY = [
    "sqlalchemy",
    "pydantic_settings",
    "broadcaster.store",
    "broadcaster.config",
    "broadcaster.core",
    "atproto",
    "twilio",
    "telegram",
    "slack_sdk",
    "aiohttp",
]


def test_help_imports_no_store_settings_or_provider_sdk() -> None:
    code = (
        "import json, sys\n"
        "from broadcaster.cli import app\n"
        "try:\n"
        "    app(['--help'], prog_name='broadcaster')\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('MODULES=' + json.dumps(sorted(sys.modules)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert "Usage: broadcaster" in done.stdout
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("MODULES=")]
    modules = set(json.loads(line.removeprefix("MODULES=")))
    imported = sorted(m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY))
    assert imported == []


@pytest.mark.timeout(120)
def test_demo_rehearses_an_incident_and_writes_the_status_page(tmp_path: Path) -> None:
    folder = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--dir", str(folder)])
    assert result.exception is None, (result.exception, result.output)
    assert result.exit_code == 0, result.output
    assert "all deliveries of incident #1" in result.stdout
    assert "partner-13" in result.stdout  # the one gone for good, in the failures table
    assert "┘─" not in result.stdout  # each progress table ends its line before the next rule
    # Every public channel (real SDKs, local fakes): follow-ups threaded, and the
    # correction edited the identified post where the channel can edit.
    text = " ".join(result.stdout.split())
    assert "Slack #C0VOLTSTATUS: 4 messages, 3 in the first one's thread" in text
    assert "VoltCharge status: 4 messages, 3 replies to the first, 1 edited" in text
    assert "voltcharge.example: 5 posts, 4 replies" in text  # Bluesky cannot edit
    assert "Mastodon: 4 posts, 3 replies, 1 edited" in text
    assert "Discord: 4 messages, 1 edited; Teams: 5 cards" in text
    # Nobody posted the update the identified one promised: on a compressed clock the
    # team was nudged in its own channel, then a holding update went out everywhere.
    assert "nudge to #C0VOLTCOMMS (the team's channel): Update due by" in text
    assert "If nothing is posted by then, a holding update goes out by itself." in text
    assert "the scheduler published a holding update #4" in text
    # Subscribers imported from a CSV (one row refused, with why), reached by SMS and
    # email in their language; Twilio's signed receipts came back to the app.
    assert "imported subscribers: 13 added; refused: line 15: phone '0612'" in text
    assert "sms (Twilio) │ 40 │ 8 │ 35 delivered, 5 undelivered" in text
    assert "email (SMTP) │ 25 │ 5 │ accepted (20 threaded under the first)" in text
    assert (folder / "public" / "index.html").is_file()
    assert (folder / "public" / "fr" / "index.html").is_file()


def test_export_site_writes_the_public_side_as_files(cli: Cli, tmp_path: Path) -> None:
    cli.ok(*open_args("--yes"))
    out = tmp_path / "exported"
    assert "files to" in cli.ok("export-site", str(out)).stdout
    assert (out / "index.html").read_text().count("<html") == 1
    assert json.loads((out / "status.en.json").read_text())["incidents"]
    assert (out / "fr" / "index.html").exists() and (out / "banner.js").exists()
    assert_one_line_error(cli("export-site", str(out), "--channel", "partners"), "not a banner")


def test_drafts_from_monitoring_are_listed_approved_and_rejected(
    cli: Cli, thread_receiver: WebhookReceiver
) -> None:
    import asyncio
    from datetime import UTC, datetime

    from broadcaster.alerts import AlertEvent, take_alert
    from broadcaster.core import Broadcaster

    routes = [{"name": "api", "match": {"service": "api"}, "title": "API errors",
               "fields": {"summary": "Some requests fail."}}]  # fmt: skip
    config = write_config(cli.config.parent, thread_receiver, routes=routes)

    async def alert(group: str) -> None:
        async with await Broadcaster.open(config) as b:
            event = AlertEvent(source="alertmanager", group=group, status="firing",
                               started_at=datetime.now(UTC), labels={"service": "api"})  # fmt: skip
            assert (await take_alert(b, event)).action == "drafted"

    asyncio.run(alert("g1"))
    asyncio.run(alert("g2"))
    listed = cli.json("drafts")
    assert [(d["id"], d["request"]["title"]) for d in listed] == [
        (1, "API errors"),
        (2, "API errors"),
    ]
    assert "API errors" in cli.ok("drafts").stdout

    assert_one_line_error(cli("approve", "1"), "pass --yes")
    shown = cli.ok("approve", "1", "--dry-run").stdout
    assert "Some requests fail." in shown and thread_receiver.attempts == []
    cli.ok("approve", "1", "--yes")
    assert len(thread_receiver.received) == len(PARTNERS)
    assert "rejected draft #2" in cli.ok("reject", "2").stdout
    assert cli.json("drafts") == []
    assert_one_line_error(cli("approve", "2", "--yes"), "already rejected")
    trail = cli.json("show", "1")["audit"]
    assert [(e["action"], e["actor"]) for e in trail] == [
        ("publish", f"cli:{getpass.getuser()}"),
        ("approved", f"cli:{getpass.getuser()}"),
    ]
    assert trail[1]["detail"]["from"] == "alertmanager/api"


def test_schedule_shows_the_nudge_and_the_holding_update_a_promise_makes(cli: Cli) -> None:
    assert "nothing scheduled" in cli.ok("schedule").stdout
    cli.ok(*open_args("--yes", "--next-update", "30m", "--impact", "major"))
    shown = cli.ok("schedule").stdout
    assert "nudge the team" in shown and "holding update" in shown and "#1" in shown
    nudge, holding = cli.json("schedule")
    assert (nudge["kind"], holding["kind"]) == ("nudge", "holding")
    assert nudge["promised_at"] == holding["promised_at"] == holding["due_at"]
    cli.ok("resolve", "1", "--yes")
    assert cli.json("schedule") == []


TOTAL_OUTAGE = {
    "description": "Everything is down",
    "title": "Example Co. is down",
    "impact": "critical",
    "components": {"api": "major_outage", "app": "major_outage"},
    "fields": {"summary": "Our app and API are down. We are on it."},
    "next_update_in": "30m",
}


def test_a_playbook_fires_its_pre_approved_update_after_one_confirmation(
    tmp_path: Path, thread_receiver: WebhookReceiver
) -> None:
    cli = Cli(write_config(tmp_path, thread_receiver, playbooks={"total-outage": TOTAL_OUTAGE}))
    listed = cli.ok("playbook", "list").stdout
    assert "total-outage" in listed and "Everything is down" in listed and "in 30 min" in listed

    shown = cli.ok("playbook", "run", "total-outage", "--dry-run").stdout
    assert "Our app and API are down. We are on it." in shown
    assert thread_receiver.attempts == [] and cli.json("incidents") == []
    assert_one_line_error(cli("playbook", "run", "total-outage"), "pass --yes")

    cli.ok("playbook", "run", "total-outage", "--yes", "--set", "summary=Down since 14:00.")
    (incident,) = cli.json("incidents")
    assert (incident["title"], incident["impact"]) == ("Example Co. is down", "critical")
    assert len(thread_receiver.received) == len(PARTNERS)
    assert "Down since 14:00." in json.dumps(thread_receiver.received[0].body)
    assert [r["kind"] for r in cli.json("schedule")] == ["nudge", "holding"]
    assert_one_line_error(cli("playbook", "run", "nope", "--yes"), "no playbook 'nope'")


def test_a_route_naming_a_playbook_takes_what_it_does_not_set(tmp_path: Path) -> None:
    from broadcaster.config import Settings

    settings = Settings(
        components={"api": "API", "app": "App"},
        channels={"page": {"type": "banner", "output": "public"}},
        playbooks={"total-outage": TOTAL_OUTAGE},
        routes=[
            {
                "name": "down",
                "match": {"alertname": "SiteDown"},
                "playbook": "total-outage",
                "action": "publish",
                "fields": {"eta": "soon"},
            },
        ],
    )
    (route,) = settings.routes
    assert route.title == "Example Co. is down" and route.impact == "critical"
    assert route.fields == {**TOTAL_OUTAGE["fields"], "eta": "soon"}
    assert route.next_update_in is not None and route.next_update_in.total_seconds() == 1800
    from datetime import UTC, datetime, timedelta

    from broadcaster.alerts import AlertEvent, request_for
    from broadcaster.models import IncidentStatus

    event = AlertEvent(source="alertmanager", group="g", status="firing",
                       started_at=datetime.now(UTC), labels={"alertname": "SiteDown"})  # fmt: skip
    request = request_for(route, event, IncidentStatus.INVESTIGATING, "g")
    assert request.next_update_at is not None
    promised = request.next_update_at - datetime.now(UTC)
    assert timedelta(minutes=29) < promised <= timedelta(minutes=30)
    assert request_for(route, event, IncidentStatus.RESOLVED, "g").next_update_at is None
    with pytest.raises(ValueError, match="unknown playbook 'nope'"):
        Settings(routes=[{"name": "x", "playbook": "nope"}])
    with pytest.raises(ValueError, match="title is required"):
        Settings(routes=[{"name": "x"}])
