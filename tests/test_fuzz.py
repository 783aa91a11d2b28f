"""Fuzzing a running `broadcaster serve`: schemathesis over the `/v1/` OpenAPI schema and
hypothesis over the monitoring webhooks. No request may get a 5xx, answers must fit the
schema, and a refused request (4xx) must leave the store exactly as it was."""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import sqlite3
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode, checks

from broadcaster.sandbox import WebhookReceiver
from tests.test_hooks import FIRING, route
from tests.test_remote_cli import TOKENS, Server

AM_TOKEN = "am-fuzz-token"
PD_SECRET = "pd-fuzz-secret"
GENERIC_TOKEN = "generic-fuzz-token"
TABLES = ("incidents", "updates", "deliveries", "drafts", "audit", "subscribers", "subscriptions")
FUZZ = settings(
    max_examples=25,
    deadline=None,
    # A failure is reported as found: shrinking against a live server can take minutes.
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    receiver = WebhookReceiver()
    receiver.start_in_thread()
    running = Server(
        tmp_path_factory.mktemp("fuzz"),
        receiver,
        env={"AM_TOKEN": AM_TOKEN, "PD_SECRET": PD_SECRET, "GENERIC_TOKEN": GENERIC_TOKEN},
        components={"payments": "Payments"},
        hooks={
            "alertmanager_token": {"env": "AM_TOKEN"},
            "pagerduty_secret": {"env": "PD_SECRET"},
            "generic_token": {"env": "GENERIC_TOKEN"},
        },
        routes=[route(action="publish"), route(name="any", match={}, source="*")],
    )
    try:
        yield running
    finally:
        running.stop()
        receiver.stop_thread()


def stored(server: Server) -> tuple[int, ...]:
    """Row counts of everything a request could have stored or changed the trail of."""
    with sqlite3.connect(server.store) as conn:
        return tuple(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_admin_api_never_fails_and_refusals_store_nothing(
    server: Server, mode: GenerationMode
) -> None:
    """Every operation of the schema, with requests that fit it (answers are validated
    against it too) and requests that do not (they must be refused, cleanly)."""
    schema = schemathesis.openapi.from_url(f"{server.url}/v1/openapi.json")
    auth = {"Authorization": f"Bearer {TOKENS['ops']}"}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15

    for operation in operations:

        @FUZZ
        @given(case=operation.as_strategy(generation_mode=mode))
        def fuzz(case: Any) -> None:
            before = stored(server)
            if mode is GenerationMode.POSITIVE:
                # A request that fits the schema may still fail the update's checks (a
                # template's required field): that 422 is the product, not a schema gap.
                response = case.call_and_validate(
                    headers=auth, excluded_checks=[checks.positive_data_acceptance]
                )
            else:
                response = case.call(headers=auth)
                assert response.status_code < 500, (case.method, case.path, response.text)
            if response.status_code >= 400:
                assert stored(server) == before, (case.method, case.path, response.status_code)

        try:
            fuzz()
        except Unsatisfiable:
            # Only in negative mode: an operation without parameters or body (GET
            # /v1/templates) has no request that breaks its schema.
            assert mode is GenerationMode.NEGATIVE, operation.label


# -- monitoring webhooks ----------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@st.composite
def mutated_alertmanager(draw: st.DrawFn) -> dict[str, Any]:
    """A real Alertmanager payload with one field replaced, removed or retyped."""
    body = copy.deepcopy(FIRING)
    target = body if draw(st.booleans()) else body["alerts"][0]
    key = draw(st.sampled_from(sorted(target)))
    if draw(st.booleans()):
        del target[key]
    else:
        target[key] = draw(json_values)
    return body


def post(server: Server, source: str, body: bytes, headers: dict[str, str]) -> int:
    reply = requests.post(
        f"{server.url}/hooks/{source}",
        data=body,
        headers={"Content-Type": "application/json", **headers},
        timeout=30,
    )
    assert reply.status_code < 500, (source, reply.status_code, reply.text)
    return reply.status_code


def signed_pagerduty(body: bytes) -> dict[str, str]:
    digest = hmac.new(PD_SECRET.encode(), body, hashlib.sha256).hexdigest()
    return {"X-PagerDuty-Signature": f"v1={digest}"}


@FUZZ
@given(payload=json_values | mutated_alertmanager(), garbage=st.binary(max_size=64))
@example(payload=FIRING, garbage=b"")  # one that must get past the door, every run
def test_webhooks_never_fail_and_refusals_store_nothing(
    server: Server, payload: Any, garbage: bytes
) -> None:
    body = json.dumps(payload).encode()
    attempts = [
        ("alertmanager", body, {"Authorization": f"Bearer {AM_TOKEN}"}),
        ("alertmanager", garbage, {"Authorization": f"Bearer {AM_TOKEN}"}),
        ("pagerduty", body, signed_pagerduty(body)),
        ("generic", body, {"Authorization": f"Bearer {GENERIC_TOKEN}"}),
        # Forged or missing credentials, with a body that would be accepted otherwise.
        ("alertmanager", json.dumps(FIRING).encode(), {"Authorization": "Bearer guess"}),
        ("pagerduty", body, {"X-PagerDuty-Signature": "v1=" + "0" * 64}),
        ("generic", body, {}),
    ]
    for source, data, headers in attempts:
        before = stored(server)
        if post(server, source, data, headers) >= 400:
            assert stored(server) == before, (source, data[:200])


def test_the_fuzzed_server_still_serves_its_status_page(server: Server) -> None:
    """After everything above, the public side and the probes still answer."""
    assert requests.get(f"{server.url}/", timeout=10).status_code == 200
    assert requests.get(f"{server.url}/healthz", timeout=10).json() == {"status": "ok"}
    incidents, _updates, _deliveries, drafts, *_others = stored(server)
    assert incidents + drafts > 0  # the explicit example at least got past the door
