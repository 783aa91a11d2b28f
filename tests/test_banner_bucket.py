"""The banner channel's bucket target, against moto's S3 server driven by the real boto3.

The server (one per module) enforces credentials through moto's IAM: a user with a
key pair that may do anything on S3, so a wrong key or secret is refused as a real
provider would refuse it. Each test uses buckets of its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import pytest
import tomli_w
from botocore.config import Config
from moto.server import ThreadedMotoServer
from typer.testing import CliRunner

from broadcaster.cli import app
from broadcaster.core import Broadcaster
from broadcaster.errors import ConfigError
from broadcaster.models import ChannelProgress, DeliveryState, IncidentStatus, UpdateRequest
from channels.banner import BannerChannel
from tests.conftest import MakeBroadcaster

KEY_ENV = "TEST_BUCKET_KEY_ID"
SECRET_ENV = "TEST_BUCKET_SECRET"
TITLE = "Payments fail at checkout"
SITE_FILES = {
    "index.html": "text/html; charset=utf-8",
    "fr/index.html": "text/html; charset=utf-8",
    "status.en.json": "application/json",
    "status.fr.json": "application/json",
    "banner.js": "text/javascript; charset=utf-8",
    "feed.atom": "application/atom+xml; charset=utf-8",
    "feed.fr.atom": "application/atom+xml; charset=utf-8",
    "api/v2/summary.json": "application/json",
    "api/v2/status.json": "application/json",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class S3:
    """The running S3 server, a key pair it accepts, and a client to look at buckets."""

    endpoint: str
    key_id: str
    secret: str
    admin: Any

    def new_bucket(self, create: bool = True) -> str:
        name = f"status-{uuid.uuid4().hex[:12]}"
        if create:
            self.admin.create_bucket(Bucket=name)
        return name

    def objects(self, bucket: str, prefix: str = "") -> dict[str, dict[str, Any]]:
        """Relative path -> head_object, for every object under prefix."""
        listing = self.admin.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
        return {
            item["Key"].removeprefix(prefix): self.admin.head_object(Bucket=bucket, Key=item["Key"])
            for item in listing
        }

    def json(self, bucket: str, key: str) -> Any:
        return json.loads(self.admin.get_object(Bucket=bucket, Key=key)["Body"].read())


def _set_moto_auth(endpoint: str, count: str) -> None:
    """Requests moto serves before it checks credentials ("0": from now on)."""
    request = urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth",
        data=count.encode(),
        method="POST",
        headers={"Content-Type": "text/plain"},
    )
    urllib.request.urlopen(request, timeout=5).close()


def _client(service: str, endpoint: str, key_id: str, secret: str) -> Any:
    return boto3.session.Session().client(
        service,
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=key_id,
        aws_secret_access_key=secret,
        config=Config(s3={"addressing_style": "path"}),
    )


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    iam = _client("iam", endpoint, "setup", "setup")
    iam.create_user(UserName="status-publisher")
    policy = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
    }
    iam.put_user_policy(
        UserName="status-publisher", PolicyName="s3", PolicyDocument=json.dumps(policy)
    )
    key = iam.create_access_key(UserName="status-publisher")["AccessKey"]
    _set_moto_auth(endpoint, "0")
    try:
        yield S3(
            endpoint=endpoint,
            key_id=key["AccessKeyId"],
            secret=key["SecretAccessKey"],
            admin=_client("s3", endpoint, key["AccessKeyId"], key["SecretAccessKey"]),
        )
    finally:
        _set_moto_auth(endpoint, "inf")
        server.stop()


@pytest.fixture(autouse=True)
def bucket_keys(s3: S3, monkeypatch: pytest.MonkeyPatch) -> None:
    """The key pair in the environment, where the config's SecretRefs point; nothing from
    the developer's shell (AWS_*, BROADCASTER_*) may steer these tests."""
    for name in list(os.environ):
        if name.startswith(("AWS_", "BROADCASTER_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv(KEY_ENV, s3.key_id)
    monkeypatch.setenv(SECRET_ENV, s3.secret)


def banner(s3: S3, bucket: str, **extra: Any) -> dict[str, Any]:
    """A banner channel config uploading to `bucket` on the test server, fast retries."""
    return {
        "type": "banner",
        "languages": ["en", "fr"],
        "bucket": bucket,
        "prefix": "status/",
        "endpoint_url": s3.endpoint,
        "region": "us-east-1",
        "path_style": True,
        "access_key_id": {"env": KEY_ENV},
        "secret_access_key": {"env": SECRET_ENV},
        "backoff_seconds": 0.05,
        "backoff_max_seconds": 0.2,
        **extra,
    }


def opening() -> UpdateRequest:
    return UpdateRequest(
        status=IncidentStatus.INVESTIGATING,
        title=TITLE,
        fields={"summary": "Card payments fail for most users."},
        actor="test",
    )


def resolving() -> UpdateRequest:
    return UpdateRequest(status=IncidentStatus.RESOLVED, actor="test")


@dataclass
class DeliveryStates:
    counts: dict[DeliveryState, int]
    broken: str | None


async def publish_and_wait(
    b: Broadcaster, request: UpdateRequest, incident: int | None = None
) -> DeliveryStates:
    """Publish to the one channel and dispatch until settled (a broken channel counts)."""
    result = await b.publish(request, incident)
    (status_page,) = await asyncio.wait_for(b.wait([result.update.id]), timeout=30)
    return DeliveryStates(status_page.counts, status_page.broken)


async def doctor_line(b: Broadcaster, channel: str = "status-page") -> tuple[bool, str]:
    check = next(c for c in await b.doctor() if c.subject == f"channel {channel}")
    return check.ok, check.detail


# -- what a user sees ------------------------------------------------------------------


async def test_publish_uploads_the_site_with_content_types_and_cache_headers(
    s3: S3, make_broadcaster: MakeBroadcaster, tmp_path: Path
) -> None:
    bucket = s3.new_bucket()
    b = await make_broadcaster({"status-page": banner(s3, bucket)}, components={"api": "API"})
    states = await publish_and_wait(b, opening())
    assert states.counts == {DeliveryState.DELIVERED: 1}

    objects = s3.objects(bucket, "status/")
    assert set(objects) == set(SITE_FILES)
    for path, head in objects.items():
        assert head["ContentType"] == SITE_FILES[path], path
        assert head["CacheControl"] == "public, max-age=10", path
    status = s3.json(bucket, "status/status.en.json")
    assert [i["title"] for i in status["incidents"]] == [TITLE]
    assert status["incidents"][0]["status"] == "investigating"
    assert not (tmp_path / "public").exists()  # a bucket alone: no local copy unless asked
    (delivery,) = await b.deliveries(1)
    assert delivery.permalink == f"s3://{bucket}/status/index.html"


async def test_resolving_clears_the_banner_in_the_bucket_and_the_folder(
    s3: S3, make_broadcaster: MakeBroadcaster, tmp_path: Path
) -> None:
    bucket = s3.new_bucket()
    b = await make_broadcaster({"status-page": banner(s3, bucket, output="public")})
    await publish_and_wait(b, opening())
    assert s3.json(bucket, "status/status.fr.json")["incidents"]

    states = await publish_and_wait(b, resolving(), incident=1)
    assert states.counts == {DeliveryState.DELIVERED: 1}
    for status in (
        s3.json(bucket, "status/status.en.json"),
        json.loads((tmp_path / "public" / "status.en.json").read_text()),
    ):
        assert status["incidents"] == []
        assert status["overall"]["indicator"] == "none"
    page = s3.admin.get_object(Bucket=bucket, Key="status/index.html")["Body"].read().decode()
    assert TITLE in page and "Resolved" in page
    assert s3.json(bucket, "status/api/v2/summary.json")["incidents"] == []


async def test_unchanged_files_are_not_uploaded_again_and_pages_go_last(
    s3: S3, make_broadcaster: MakeBroadcaster
) -> None:
    bucket = s3.new_bucket()
    b = await make_broadcaster({"status-page": banner(s3, bucket)})
    await b.publish(opening())
    channel = b.channels["status-page"]
    assert isinstance(channel, BannerChannel) and channel.bucket is not None
    files = await b.render_public_site("status-page", ["en", "fr"])

    first = await channel.bucket.upload(files)
    order = [key.removeprefix("status/") for key in first]
    assert set(order) == set(SITE_FILES)
    assert order[-1] == "index.html"  # the root page last
    assert max(order.index(p) for p in order if not p.endswith(".html")) < order.index(
        "fr/index.html"
    )
    assert order.index("banner.js") < min(order.index(p) for p in order if p.endswith(".json"))

    files["status.en.json"] = b'{"changed": true}\n'
    assert await channel.bucket.upload(files) == ["status/status.en.json"]
    await channel.close()


async def test_keys_from_the_aws_environment_when_the_config_names_none(
    s3: S3, make_broadcaster: MakeBroadcaster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret)
    bucket = s3.new_bucket()
    config = banner(s3, bucket)
    del config["access_key_id"], config["secret_access_key"]
    b = await make_broadcaster({"status-page": config})
    assert await doctor_line(b) == (True, "banner, ok")
    states = await publish_and_wait(b, opening())
    assert states.counts == {DeliveryState.DELIVERED: 1}
    assert "index.html" in s3.objects(bucket, "status/")


# -- export-site --------------------------------------------------------------------------


def test_export_site_uploads_to_a_bucket_url(s3: S3, tmp_path: Path) -> None:
    channel_bucket, mirror = s3.new_bucket(), s3.new_bucket()
    config = tmp_path / "broadcaster.toml"
    config.write_text(
        tomli_w.dumps(
            {
                "store": "sqlite:///broadcaster.db",
                "dispatch": {"poll_seconds": 0.05, "lease_seconds": 5},
                "channels": {"status-page": banner(s3, channel_bucket)},
            }
        )
    )
    runner = CliRunner()

    def cli(*args: str) -> Any:
        return runner.invoke(app, ["--config", str(config), *args])

    opened = cli("open", "--title", TITLE, "--set", "summary=Card payments fail.", "--yes")
    assert opened.exit_code == 0, opened.output
    assert "status/index.html" in {
        k["Key"] for k in s3.admin.list_objects_v2(Bucket=channel_bucket)["Contents"]
    }

    result = cli("export-site", f"s3://{mirror}/mirror")
    assert result.exit_code == 0, result.output
    assert f"wrote {len(SITE_FILES)} files to s3://{mirror}/mirror" in result.stdout
    objects = s3.objects(mirror, "mirror/")
    assert set(objects) == set(SITE_FILES)
    assert objects["status.en.json"]["ContentType"] == "application/json"
    assert [i["title"] for i in s3.json(mirror, "mirror/status.en.json")["incidents"]] == [TITLE]

    missing = cli("export-site", f"s3://{s3.new_bucket(create=False)}")
    assert missing.exit_code == 1 and "Traceback" not in missing.output
    assert "does not exist" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1
    assert "no bucket" in cli("export-site", "s3://").stderr


# -- faults -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key_id", "secret", "reason"),
    [
        (None, "not-the-secret", "wrong secret access key"),
        ("AKIAUNKNOWNKEY000000", "not-the-secret", "unknown access key id"),
    ],
    ids=["wrong-secret", "unknown-key"],
)
async def test_refused_credentials_break_the_channel_and_keep_deliveries_queued(
    s3: S3,
    make_broadcaster: MakeBroadcaster,
    monkeypatch: pytest.MonkeyPatch,
    key_id: str | None,
    secret: str,
    reason: str,
) -> None:
    monkeypatch.setenv(KEY_ENV, key_id or s3.key_id)
    monkeypatch.setenv(SECRET_ENV, secret)
    b = await make_broadcaster({"status-page": banner(s3, s3.new_bucket())})
    states = await publish_and_wait(b, opening())
    assert states.counts == {DeliveryState.QUEUED: 1}  # kept for after the fix
    assert states.broken is not None and reason in states.broken
    (queued,) = await b.deliveries(1)
    assert queued.attempts == 0

    ok, detail = await doctor_line(b)
    assert not ok and detail.startswith("status-page: s3://")
    assert "access denied" in detail and "\n" not in detail
    assert secret not in states.broken + detail


async def test_fixed_keys_are_read_again_by_a_running_dispatcher_on_retry(
    s3: S3, make_broadcaster: MakeBroadcaster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Like `serve`: one dispatcher keeps running while the operator fixes the secret."""
    monkeypatch.setenv(SECRET_ENV, "not-the-secret")
    bucket = s3.new_bucket()
    b = await make_broadcaster({"status-page": banner(s3, bucket)})
    stop = asyncio.Event()
    dispatching = asyncio.create_task(b.dispatch_until(stop))
    try:
        await b.publish(opening())
        (progress,) = await settle(
            b, lambda p: p.broken is not None and p.counts == {DeliveryState.QUEUED: 1}
        )
        assert "wrong secret access key" in str(progress.broken)

        monkeypatch.setenv(SECRET_ENV, s3.secret)  # the operator fixes the secret
        await b.retry(1, channel="status-page", actor="test")
        (progress,) = await settle(b, lambda p: p.counts == {DeliveryState.DELIVERED: 1})
    finally:
        stop.set()
        await dispatching
    assert "index.html" in s3.objects(bucket, "status/")


async def settle(
    b: Broadcaster, done: Callable[[ChannelProgress], bool], timeout: float = 20
) -> list[ChannelProgress]:
    """Incident 1's progress, once `done` holds for every channel."""
    async with asyncio.timeout(timeout):
        while True:
            progress = await b.progress(1)
            if all(done(p) for p in progress):
                return progress
            await asyncio.sleep(0.05)


async def test_missing_bucket_breaks_the_channel_and_doctor_names_it(
    s3: S3, make_broadcaster: MakeBroadcaster
) -> None:
    bucket = s3.new_bucket(create=False)
    b = await make_broadcaster({"status-page": banner(s3, bucket)})
    states = await publish_and_wait(b, opening())
    assert states.counts == {DeliveryState.QUEUED: 1}
    expected = f"bucket '{bucket}' does not exist at {s3.endpoint}"
    assert states.broken is not None and expected in states.broken
    ok, detail = await doctor_line(b)
    assert not ok and expected in detail


async def test_missing_key_secret_is_named_before_any_request(
    s3: S3, make_broadcaster: MakeBroadcaster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(SECRET_ENV)
    b = await make_broadcaster({"status-page": banner(s3, s3.new_bucket())})
    ok, detail = await doctor_line(b)
    assert not ok
    assert detail == f"status-page: secret 'secret_access_key' not found in {_env(SECRET_ENV)}"
    states = await publish_and_wait(b, opening())
    assert states.broken == detail and states.counts == {DeliveryState.QUEUED: 1}


def _env(name: str) -> str:
    return f"environment variable {name}"


class _SlowDown(BaseHTTPRequestHandler):
    """An S3 endpoint that asks every client to slow down (S3's throttling answer)."""

    def _answer(self) -> None:
        body = (
            b"<?xml version='1.0' encoding='UTF-8'?>\n<Error><Code>SlowDown</Code>"
            b"<Message>Please reduce your request rate.</Message></Error>"
        )
        self.send_response(503)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_PUT = do_GET = do_HEAD = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


async def test_slow_down_is_transient_and_retried_until_the_deadline(
    make_broadcaster: MakeBroadcaster,
) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _SlowDown)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        b = await make_broadcaster(
            {"status-page": banner_at(endpoint, "status-slow", deadline_seconds=1)}
        )
        states = await publish_and_wait(b, opening())
        assert states.counts == {DeliveryState.FAILED: 1} and states.broken is None
        (failed,) = await b.deliveries(1)
        assert failed.attempts >= 2
        assert failed.last_error is not None
        assert "gave up" in failed.last_error and "SlowDown (HTTP 503)" in failed.last_error
    finally:
        server.shutdown()
        server.server_close()


def banner_at(endpoint: str, bucket: str, **extra: Any) -> dict[str, Any]:
    config = banner(S3(endpoint=endpoint, key_id="", secret="", admin=None), bucket)
    return {**config, **extra}


async def test_unreachable_endpoint_is_retried_until_it_is_back(
    s3: S3, make_broadcaster: MakeBroadcaster
) -> None:
    bucket = s3.new_bucket()  # moto keeps its state per process: a second server shares it
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    b = await make_broadcaster({"status-page": banner_at(endpoint, bucket, max_attempts=100)})
    ok, detail = await doctor_line(b)
    assert not ok and f"cannot reach {endpoint}: EndpointConnectionError" in detail

    result = await b.publish(opening())
    waiting = asyncio.create_task(b.wait([result.update.id]))
    for _ in range(200):
        (delivery,) = await b.deliveries(1)
        if delivery.attempts >= 2:
            break
        await asyncio.sleep(0.05)
    assert delivery.state in (DeliveryState.QUEUED, DeliveryState.SENDING)
    assert delivery.last_error is not None
    assert "cannot reach" in delivery.last_error

    second = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    second.start()
    try:
        (progress,) = await asyncio.wait_for(waiting, timeout=30)
    finally:
        second.stop()
    assert progress.counts == {DeliveryState.DELIVERED: 1}
    assert "index.html" in s3.objects(bucket, "status/")


# -- configuration ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"endpoint_url": "http://127.0.0.1:9000"}, "only used with `bucket`"),
        ({"bucket": "b-bucket", "access_key_id": {"env": KEY_ENV}}, "set both access_key_id"),
        ({"bucket": "b-bucket", "access_key_id": "AKIA-literal"}, "access_key_id"),
    ],
    ids=["endpoint-without-bucket", "one-key-only", "literal-key"],
)
async def test_bucket_settings_are_checked_when_the_config_loads(
    make_broadcaster: MakeBroadcaster, extra: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as raised:
        await make_broadcaster({"status-page": {"type": "banner", **extra}})
    assert "channels.status-page" in str(raised.value)
    assert "AKIA-literal" not in str(raised.value)
