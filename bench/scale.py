"""Scaling of the procrastinate backend: one update to N subscribers, sent by 1, 2 and 4
`broadcaster worker` processes, with the embedded backend in the same run as baseline.

    .venv/bin/python bench/scale.py                    # N = 100,000; embedded, 1, 2, 4 workers
    .venv/bin/python bench/scale.py --quick            # N = 5,000, 1 and 2 workers (~1 min)
    .venv/bin/python bench/scale.py --profile --json   # + a profiled run of one worker
    .venv/bin/python bench/scale.py --database postgresql://postgres@127.0.0.1:5432/mine

Every process has its own job, so that each one's CPU is its own:

- a **receiver** in its own process: by default a minimal HTTP/1.1 server (asyncio
  protocol on uvloop) for the subscriber webhook channel, counting what it accepted per
  recipient (path) with `bench/subscribers.py`'s `Tally`; with `--channel sms` / `email`,
  that script's FakeTwilio / FakeSmtp simulators.
- **setup** (not measured), before each contender: the database's `public` schema is
  dropped and created again, the store migrated, procrastinate's tables created, and N
  subscribers with their consents copied in (`COPY`), then `ANALYZE`. Subscriber i has a
  webhook URL `http://127.0.0.1:PORT/s/{i}` (or a phone / an email), a third speak French,
  all follow every component: one update makes exactly N deliveries.
- **workers** (procrastinate contenders): N `broadcaster --config … worker` processes,
  the real CLI with the shipped `[workers]` settings, started and ready (registered in
  `procrastinate_workers`) before the publish, stopped with SIGTERM after it.
- the **publisher**: `Broadcaster.open`, then `publish()` of one update and
  `wait([update_id])` until every delivery is settled in the store, timed. With the
  procrastinate backend it only defers the fan-out job and watches; with the embedded
  backend (the baseline, on the same PostgreSQL database; `--sqlite`: on SQLite too) it
  sends everything itself.

CPU seconds over the timed part are taken per process type: the workers and the
publisher (psutil), the receiver, PostgreSQL's backends serving this database and its
background processes (psutil on the `postgres` processes, by their title), and what the
rest of the machine used; and PostgreSQL's transactions per delivery. `--profile` runs
one more procrastinate contender with one worker under cProfile (CPU time), sampling
`pg_stat_activity` meanwhile for what PostgreSQL is busy with.

Statistics: while a run goes, the bench ANALYZEs each table where autovacuum would
(`--autoanalyze`, every second by default), as autovacuum does on a server that runs it
(this project's test server does not). `--autoanalyze 0`: the deliveries table then has
no statistics during the run, and the thread check of the queue's queries is planned as
a nested loop over every delivery of the incident, per candidate (bench/README.md).

Verified (exit status 1 otherwise): exactly one delivery per subscriber, every one
settled `delivered` (webhook; `sent` for SMS and email), no procrastinate job failed; the
receiver accepted exactly N messages, none twice, for the expected recipients (an
order-free digest) in their languages. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import resource
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import subscribers as audience_bench

from broadcaster.dispatch.distributed import libpq_url
from broadcaster.runtime import run as run_loop

RESULT_PREFIX = "RESULT "
DEFAULT_DATABASE = "postgresql://postgres@127.0.0.1:5432/broadcaster_bench"
SUBSCRIBER_CHANNELS = {"webhook": "hooks", "sms": "sms", "email": "email"}
RECEIVER_OF = {"webhook": "webhook", "sms": "twilio", "email": "smtp"}
SAMPLE_SECONDS = 0.25  # how often PostgreSQL's processes are looked at
ACTIVITY_SECONDS = 0.05  # --profile: how often pg_stat_activity is sampled
READY_SECONDS = 60.0  # workers must be registered within this


# -- the subscribers -----------------------------------------------------------------------


def recipient(i: int, kinds: list[str], port: int) -> tuple[str, str, str]:
    """(kind, address, language) of subscriber i (1-based): the kinds take turns."""
    kind = kinds[i % len(kinds)]
    language = "fr" if i % 3 == 0 else "en"
    if kind == "webhook":
        return kind, f"http://127.0.0.1:{port}/s/{i}", language
    if kind == "sms":
        return kind, f"+336{i:08d}", language
    return kind, f"s{i}@subscribers.acme.com", language


def tally_key(kind: str, address: str) -> str:
    """What the receiver counts a message under: the path for a webhook."""
    return "/" + address.split("/", 3)[3] if kind == "webhook" else address


def expected_tallies(n: int, kinds: list[str], port: int) -> dict[str, dict[str, Any]]:
    """Per kind: how many messages, the digest of their recipients, their languages."""
    expected = {kind: {"count": 0, "digest": 0, "languages": {}} for kind in kinds}
    for i in range(1, n + 1):
        kind, address, language = recipient(i, kinds, port)
        entry = expected[kind]
        entry["count"] += 1
        digest = audience_bench.address_digest(tally_key(kind, address))
        entry["digest"] = (entry["digest"] + digest) % 2**64
        entry["languages"][language] = entry["languages"].get(language, 0) + 1
    return expected


# -- the webhook receiver (its own process) ------------------------------------------------

_OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"
_NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
_LANGUAGE = re.compile(rb'"language":"([A-Za-z-]+)"')


class _CountingHttp(asyncio.Protocol):
    """Just enough HTTP/1.1 (Content-Length bodies, keep-alive), as bench/sink.py's raw
    sink, counting each POST under its path and the body's `language`."""

    connections = 0

    def __init__(self, tally: audience_bench.Tally) -> None:
        self.tally = tally
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        _CountingHttp.connections += 1
        self.connection = _CountingHttp.connections

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = self.buffer[:end].split(b"\r\n")
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(self.buffer) < end + 4 + length:
                return  # the body is still coming
            body = self.buffer[end + 4 : end + 4 + length]
            self.buffer = self.buffer[end + 4 + length :]
            method, _, rest = lines[0].partition(b" ")
            assert self.transport is not None
            if method != b"POST":
                self.transport.write(_NOT_FOUND)
                continue
            found = _LANGUAGE.search(body)
            language = found.group(1).decode() if found else "?"
            path = rest.partition(b" ")[0].decode()
            self.tally.add(path, language, len(body), self.connection)
            self.transport.write(_OK)


def receiver_main() -> None:
    """Serve on 127.0.0.1 until stdin closes; answer `stats` and `reset` as the
    simulators of bench/subscribers.py do (so its `Simulator` drives this one too)."""
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    tally = audience_bench.Tally()
    server = loop.run_until_complete(
        loop.create_server(lambda: _CountingHttp(tally), "127.0.0.1", 0, backlog=4096)
    )
    port = server.sockets[0].getsockname()[1]
    threading.Thread(target=loop.run_forever, name="receiver", daemon=True).start()
    print(f"PORT {port}", flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "stats":
            print("STATS " + json.dumps(tally.stats()), flush=True)
        elif command == "reset":
            tally.reset()
            print("OK", flush=True)
    loop.call_soon_threadsafe(loop.stop)


@contextlib.contextmanager
def running_receiver(kind: str) -> Iterator[audience_bench.Simulator]:
    """The receiver of a channel kind in its own process; always stopped."""
    if kind != "webhook":
        with audience_bench.running_simulator(RECEIVER_OF[kind]) as simulator:
            yield simulator
        return
    with audience_bench.running_child(
        "webhook", [str(Path(__file__).resolve()), "--receiver"]
    ) as receiver:
        yield receiver


# -- the store: a fresh database state per contender ----------------------------------------


def database_name(url: str) -> str:
    return libpq_url(url).rsplit("/", 1)[1].split("?", 1)[0]


def ensure_database(url: str) -> None:
    """Create the database if the server has no database of that name."""
    import psycopg

    name = database_name(url)
    maintenance = libpq_url(url).rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(maintenance, autocommit=True) as conn:
        found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if found is None:
            conn.execute(f'CREATE DATABASE "{name}"')
            print(f"created database {name}", flush=True)


def reset_database(url: str) -> None:
    """An empty `public` schema: no store, no jobs, no workers."""
    import psycopg

    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        conn.execute("DROP SCHEMA IF EXISTS public CASCADE")
        conn.execute("CREATE SCHEMA public")


def subscriber_rows(n: int, kinds: list[str], port: int) -> Iterator[tuple[Any, ...]]:
    """(id, phone, email, webhook_url, language, channel) per subscriber."""
    for i in range(1, n + 1):
        kind, address, language = recipient(i, kinds, port)
        yield (
            i,
            address if kind == "sms" else None,
            address if kind == "email" else None,
            address if kind == "webhook" else None,
            language,
            SUBSCRIBER_CHANNELS[kind],
        )


def setup_store(store: str, n: int, kinds: list[str], port: int, *, jobs: bool) -> float:
    """Migrate a new store, add procrastinate's tables (`jobs`), and N subscribers; seconds."""
    from broadcaster.config import Settings
    from broadcaster.store import Store

    started = time.perf_counter()
    url = Settings(store=store).store_url

    async def migrate() -> None:
        opened = await Store.open(url)
        await opened.close()
        if jobs:
            from broadcaster.dispatch.distributed import apply_schema

            await apply_schema(url)

    asyncio.run(migrate())
    now = datetime.now(UTC)
    if store.startswith("sqlite"):
        import sqlite3

        with contextlib.closing(sqlite3.connect(store.split("///", 1)[1])) as conn, conn:
            stamp = now.strftime("%Y-%m-%d %H:%M:%S.%f")
            rows = list(subscriber_rows(n, kinds, port))
            conn.executemany(
                "INSERT INTO subscribers (id, phone, email, webhook_url, language, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                [(*row[:5], stamp) for row in rows],
            )
            conn.executemany(
                "INSERT INTO subscriptions (subscriber_id, channel, subscribed, changed_at,"
                " source) VALUES (?, ?, 1, ?, 'bench')",
                [(row[0], row[5], stamp) for row in rows],
            )
        return time.perf_counter() - started
    import psycopg

    with psycopg.connect(libpq_url(store)) as conn:
        with conn.cursor() as cursor:
            columns = "id, phone, email, webhook_url, language, created_at"
            with cursor.copy(f"COPY subscribers ({columns}) FROM STDIN") as copy:
                for row in subscriber_rows(n, kinds, port):
                    copy.write_row((*row[:5], now))
            columns = "subscriber_id, channel, subscribed, changed_at, source"
            with cursor.copy(f"COPY subscriptions ({columns}) FROM STDIN") as copy:
                for row in subscriber_rows(n, kinds, port):
                    copy.write_row((row[0], row[5], True, now, "bench"))
            cursor.execute("SELECT setval(pg_get_serial_sequence('subscribers', 'id'), %s)", (n,))
        conn.commit()
        conn.autocommit = True
        # A real audience table has statistics; the deliveries table starts without.
        conn.execute("ANALYZE subscribers")
        conn.execute("ANALYZE subscriptions")
    return time.perf_counter() - started


def channel_configs(
    kinds: list[str], ports: dict[str, int], rate_limit: str, folder: Path
) -> dict[str, dict[str, Any]]:
    """The subscriber channels: webhook to the receiver; SMS and email as
    bench/subscribers.py configures them."""
    configs: dict[str, dict[str, Any]] = {}
    if "sms" in kinds or "email" in kinds:
        # Also sets the Twilio token's environment variable, which the workers inherit.
        settings = audience_bench.bench_settings(
            folder, folder / "unused.db", ports.get("sms", 1), ports.get("email", 1), 64, 8
        )
        configs.update({k: dict(settings.channels[k]) for k in ("sms", "email") if k in kinds})
    if "webhook" in kinds:
        configs["hooks"] = {
            "type": "webhook",
            "subscribers": True,
            "allow_http": True,
            "allow_networks": ["127.0.0.0/8"],
            "languages": ["en", "fr"],
        }
    for config in configs.values():
        if rate_limit == "off":
            config["rate_limit"] = {}
        else:
            config.pop("rate_limit", None)
    return configs


def write_config(
    folder: Path,
    store: str,
    backend: str,
    channels: dict[str, dict[str, Any]],
    workers: dict[str, Any],
) -> Path:
    import tomli_w

    config: dict[str, Any] = {
        "store": store,
        "backend": backend,
        "data_dir": str(folder / "data"),
        "components": audience_bench.COMPONENTS,
        "channels": channels,
    }
    if workers:
        config["workers"] = workers
    path = folder / f"{backend}.toml"
    path.write_text(tomli_w.dumps(config))
    return path


# -- the publisher (its own process) -------------------------------------------------------


async def publish_and_wait(args: argparse.Namespace) -> dict[str, Any]:
    """Publish one update to the subscriber channels and wait until it is settled."""
    from broadcaster.config import load_settings
    from broadcaster.core import Broadcaster

    settings = load_settings(Path(args.config))
    channels = [SUBSCRIBER_CHANNELS[kind] for kind in args.channel]
    b = await Broadcaster.open(settings=settings)
    timed_out = False
    try:
        request = audience_bench.update_request(channels)
        print("START", flush=True)
        started_at = datetime.now(UTC)
        cpu0, t0 = _cpu_seconds(), time.perf_counter()
        result = await b.publish(request)
        publish_seconds = time.perf_counter() - t0
        update_id = result.update.id
        try:
            await asyncio.wait_for(b.wait([update_id]), timeout=args.timeout)
        except TimeoutError:
            timed_out = True
        seconds = time.perf_counter() - t0
        cpu = _cpu_seconds() - cpu0
        print("END", flush=True)
        renders = await b.store.renders(update_id)
    finally:
        await b.close()
    return {
        "update_id": update_id,
        "started_at": started_at.isoformat(),
        "seconds": seconds,
        "publish_seconds": publish_seconds,
        "cpu_seconds": cpu,
        "timed_out": timed_out,
        "texts": {
            name: {v.language: {"text": v.text, "subject": v.subject} for v in render.variants}
            for name, render in renders.items()
        },
    }


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def publisher_main(args: argparse.Namespace) -> None:
    try:
        result = run_loop(publish_and_wait(args))
    except Exception as exc:
        result = {"error": f"{type(exc).__name__}: {exc}"}
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    os._exit(0)


# -- CPU accounting ------------------------------------------------------------------------


def transactions(url: str) -> int:
    """Transactions (committed and rolled back) of our database so far, as PostgreSQL's
    statistics have them (a backend reports its own at most a second late)."""
    import psycopg

    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        row = conn.execute(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database "
            "WHERE datname = current_database()"
        ).fetchone()
    return int(row[0]) if row else 0


def process_cpu(pid: int) -> float:
    import psutil

    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return float(times.user + times.system)


def busy_cpu_seconds() -> float:
    """CPU seconds every process on this machine has used (all cores)."""
    import psutil

    t = psutil.cpu_times()
    return float(
        t.user
        + t.nice
        + t.system
        + getattr(t, "irq", 0)
        + getattr(t, "softirq", 0)
        + getattr(t, "steal", 0)
    )


class PostgresCpu:
    """CPU of the PostgreSQL server's processes, sampled on a thread (a backend may come
    and go between two looks: its last reading counts), by kind: backends serving our
    database (and its autovacuum workers), other databases', and the server's background
    processes (checkpointer, WAL writer…)."""

    def __init__(self, database: str) -> None:
        self.database = database
        self.seen: dict[tuple[int, float], tuple[str, float]] = {}
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="pg-cpu", daemon=True)

    def kind_of(self, title: str) -> str:
        # "postgres: 15/main: postgres helper_b 127.0.0.1(40724) idle",
        # "postgres: 15/main: autovacuum worker helper_b", "postgres: 15/main: walwriter"
        words = title.split()
        if self.database in words:
            return "backends"
        if "(" in title or "[local]" in title or "autovacuum worker" in title:
            return "other databases"
        return "background"

    def sample(self) -> None:
        import psutil

        found = {}
        for process in psutil.process_iter(["name", "cmdline", "create_time", "cpu_times"]):
            info = process.info
            if info["name"] != "postgres" and not (info["name"] or "").startswith("postgres"):
                continue
            times = info["cpu_times"]
            if times is None:
                continue
            key = (process.pid, info["create_time"])
            kind = self.seen.get(key, ("", 0.0))[0] or self.kind_of(" ".join(info["cmdline"] or []))
            found[key] = (kind, float(times.user + times.system))
        with self.lock:
            self.seen.update(found)

    def totals(self) -> dict[str, float]:
        """CPU seconds so far per kind, every process ever seen (the dead at their last)."""
        self.sample()
        totals: dict[str, float] = {"backends": 0.0, "other databases": 0.0, "background": 0.0}
        with self.lock:
            for kind, seconds in self.seen.values():
                totals[kind] = totals.get(kind, 0.0) + seconds
        return totals

    def _run(self) -> None:
        while not self.stop_event.wait(SAMPLE_SECONDS):
            with contextlib.suppress(Exception):
                self.sample()

    def __enter__(self) -> PostgresCpu:
        self.sample()
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.thread.join(5)


class Activity:
    """What PostgreSQL's backends for our database are doing, sampled from
    `pg_stat_activity`: a profile of the server side (no pg_stat_statements needed)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.samples = 0
        self.active: dict[str, int] = {}
        self.idle_in_transaction = 0
        self.waits: dict[str, int] = {}
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="pg-activity", daemon=True)

    def _run(self) -> None:
        import psycopg

        with psycopg.connect(libpq_url(self.url), autocommit=True) as conn:
            while not self.stop_event.wait(ACTIVITY_SECONDS):
                rows = conn.execute(
                    "SELECT state, wait_event_type, wait_event, query FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                    "AND backend_type = 'client backend'"
                ).fetchall()
                self.samples += 1
                for state, wait_type, wait_event, query in rows:
                    if state == "idle in transaction":
                        self.idle_in_transaction += 1
                    if state != "active":
                        continue
                    statement = " ".join((query or "").split())[:110]
                    self.active[statement] = self.active.get(statement, 0) + 1
                    if wait_type is not None and wait_type != "Client":
                        key = f"{wait_type}:{wait_event}"
                        self.waits[key] = self.waits.get(key, 0) + 1

    def __enter__(self) -> Activity:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.thread.join(5)

    def summary(self, limit: int = 12) -> dict[str, Any]:
        busy = sum(self.active.values())
        top = sorted(self.active.items(), key=lambda kv: -kv[1])[:limit]
        return {
            "samples": self.samples,
            # Average number of our backends running a statement (1.0 = one core busy).
            "busy_backends": busy / max(1, self.samples),
            "idle_in_transaction": self.idle_in_transaction / max(1, self.samples),
            "top": [(statement, count / max(1, self.samples)) for statement, count in top],
            "waits": dict(sorted(self.waits.items(), key=lambda kv: -kv[1])[:6]),
        }


class AutoAnalyze:
    """Autovacuum's ANALYZE, played by the bench: every `every` seconds, each table of our
    database where more than 50 rows + 10 % of its rows changed since its last analyze
    (autovacuum's default thresholds) is analyzed. Without statistics PostgreSQL plans
    the fan-out's queries as if the deliveries table were nearly empty."""

    def __init__(self, url: str, every: float) -> None:
        self.url = url
        self.every = every
        self.started = time.perf_counter()
        self.runs: list[dict[str, Any]] = []
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="autoanalyze", daemon=True)

    def _run(self) -> None:
        import psycopg

        with psycopg.connect(libpq_url(self.url), autocommit=True) as conn:
            while not self.stop_event.wait(self.every):
                rows = conn.execute(
                    "SELECT s.relname, s.n_mod_since_analyze, c.reltuples "
                    "FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid "
                    "WHERE s.schemaname = 'public'"
                ).fetchall()
                for table, changed, tuples in rows:
                    if changed > 50 + 0.1 * max(tuples, 0):
                        began = time.perf_counter()
                        conn.execute(f'ANALYZE "{table}"')
                        self.runs.append(
                            {
                                "table": table,
                                "at_s": round(began - self.started, 1),
                                "took_s": round(time.perf_counter() - began, 3),
                            }
                        )

    def __enter__(self) -> AutoAnalyze:
        self.started = time.perf_counter()
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.thread.join(30)


def server_settings(url: str) -> dict[str, str]:
    """The PostgreSQL settings that shape these figures."""
    import psycopg

    names = ("server_version", "autovacuum", "synchronous_commit", "shared_buffers")
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        return {name: str(conn.execute(f"SHOW {name}").fetchone()[0]) for name in names}


# -- workers -------------------------------------------------------------------------------


@dataclass
class Workers:
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    def cpu(self) -> list[float]:
        return [process_cpu(p.pid) for p in self.processes]

    def exited(self) -> str | None:
        for process, log in zip(self.processes, self.logs, strict=True):
            if process.poll() is not None:
                return f"worker {process.pid} exited ({process.returncode}): {tail(log)}"
        return None


def tail(path: Path, lines: int = 12) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


def cli_command() -> list[str]:
    """The `broadcaster` console script of this interpreter's environment."""
    script = Path(sys.executable).with_name("broadcaster")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from broadcaster.cli import main; main()"]


PROFILED_CLI = '''"""Written by bench/scale.py --profile: `broadcaster` under cProfile, timing CPU
(time.process_time), not wall time: a worker waiting on PostgreSQL or the network is idle.
The stats are written when the worker stops (SIGTERM)."""

import cProfile
import sys
import time

from broadcaster.cli import main

output = sys.argv.pop(1)
sys.argv[0] = "broadcaster"
profiler = cProfile.Profile(time.process_time)
profiler.enable()
try:
    main()
except SystemExit:
    pass
finally:
    profiler.disable()
    profiler.dump_stats(output)
'''


def start_workers(count: int, config: Path, folder: Path, profile: Path | None) -> Workers:
    """`broadcaster worker` processes; the first under cProfile with `profile`."""
    workers = Workers()
    for k in range(count):
        command = [*cli_command(), "--config", str(config), "worker"]
        if profile is not None and k == 0:
            runner = folder / "profiled_cli.py"
            runner.write_text(PROFILED_CLI)
            command = [sys.executable, str(runner), str(profile), *command[-3:]]
        log = folder / f"worker{k}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        workers.processes.append(process)
        workers.logs.append(log)
    return workers


def wait_until_ready(url: str, workers: Workers, expected: int) -> str | None:
    """Until `expected` procrastinate workers are registered; an error, or None."""
    import psycopg

    deadline = time.monotonic() + READY_SECONDS
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        while time.monotonic() < deadline:
            problem = workers.exited()
            if problem:
                return problem
            row = conn.execute("SELECT count(*) FROM procrastinate_workers").fetchone()
            if row is not None and row[0] >= expected:
                return None
            time.sleep(0.1)
    return f"workers not ready within {READY_SECONDS:.0f}s: {tail(workers.logs[0])}"


def stop_workers(workers: Workers) -> None:
    """SIGTERM (a worker finishes its running jobs, cProfile writes its file), then kill."""
    for process in workers.processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in workers.processes:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


# -- one contender ---------------------------------------------------------------------------


@dataclass
class Contender:
    name: str
    backend: str  # embedded | procrastinate
    workers: int = 0
    sqlite: bool = False
    profile: bool = False


def delivery_summary(url: str, update_id: int, started: datetime) -> dict[str, Any]:
    """Per channel, from the store: deliveries, distinct recipients, states, attempts,
    deliver jobs, and when the deliveries were created and settled (seconds after the
    publish started)."""
    query = (
        "SELECT channel, count(*), count(DISTINCT recipient), min(created_at), "
        "max(created_at), min(sent_at), max(sent_at), sum(attempts), "
        "count(*) FILTER (WHERE attempts > 1), count(DISTINCT job_id) "
        "FROM deliveries WHERE update_id = {p} GROUP BY channel"
    )
    states_query = (
        "SELECT channel, state, count(*) FROM deliveries WHERE update_id = {p} "
        "GROUP BY channel, state"
    )
    errors_query = (
        "SELECT channel, last_error, count(*) FROM deliveries WHERE update_id = {p} "
        "AND last_error IS NOT NULL GROUP BY channel, last_error ORDER BY 3 DESC LIMIT 5"
    )

    def seconds(value: Any) -> float | None:
        if value is None:
            return None
        if isinstance(value, str):
            value = datetime.fromisoformat(value)
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return round((value - started).total_seconds(), 3)

    if url.startswith("sqlite"):
        import sqlite3

        conn: Any = sqlite3.connect(f"file:{url.split('///', 1)[1]}?mode=ro", uri=True)
        p = "?"
    else:
        import psycopg

        conn = psycopg.connect(libpq_url(url), autocommit=True)
        p = "%s"
    channels: dict[str, dict[str, Any]] = {}
    jobs: dict[str, int] = {}
    with contextlib.closing(conn):
        for row in conn.execute(query.format(p=p), (update_id,)).fetchall():
            channel, count, distinct, created0, created1, sent0, sent1, attempts, retried, j = row
            channels[channel] = {
                "deliveries": count,
                "distinct_recipients": distinct,
                "first_created_s": seconds(created0),
                "created_s": seconds(created1),
                "first_sent_s": seconds(sent0),
                "settled_s": seconds(sent1),
                "attempts": attempts,
                "retried": retried,
                "deliver_jobs": j,
                "states": {},
                "errors": {},
            }
        for channel, state, count in conn.execute(states_query.format(p=p), (update_id,)):
            channels[channel]["states"][state] = count
        for channel, error, count in conn.execute(errors_query.format(p=p), (update_id,)):
            channels[channel]["errors"][error] = count
        if not url.startswith("sqlite"):
            exists = conn.execute("SELECT to_regclass('procrastinate_jobs')").fetchone()
            if exists and exists[0]:
                for task, status, count in conn.execute(
                    "SELECT task_name, status::text, count(*) FROM procrastinate_jobs GROUP BY 1, 2"
                ):
                    jobs[f"{task} {status}"] = count
    return {"channels": channels, "jobs_left": jobs}


@dataclass
class Watched:
    """What the orchestrator saw of a publisher: readings at its START and END lines."""

    marks: dict[str, dict[str, Any]] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    activity: Activity | None = None
    analyze: AutoAnalyze | None = None
    error: str | None = None


def watch_publisher(
    command: list[str],
    log: Path,
    workers: Workers,
    receivers: dict[str, audience_bench.Simulator],
    pg: PostgresCpu,
    args: argparse.Namespace,
) -> Watched:
    """Run the publisher; at its START and END lines, read every process's CPU."""
    watched = Watched()
    with log.open("wb") as err:
        publisher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, bufsize=0)
    assert publisher.stdout is not None
    fd, pending = publisher.stdout.fileno(), b""
    deadline = time.monotonic() + args.timeout + 120
    try:
        while True:
            if time.monotonic() > deadline:
                watched.error = f"the publisher did not finish within {args.timeout + 120:.0f}s"
                return watched
            ready, _, _ = select.select([fd], [], [], 1.0)
            if not ready:
                watched.error = workers.exited()
                if watched.error:
                    return watched
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            pending += chunk
            *complete, pending = pending.split(b"\n")
            for raw in complete:
                line = raw.decode(errors="replace").strip()
                watched.lines.append(line)
                if line not in ("START", "END"):
                    continue
                watched.marks[line] = {
                    "wall": time.perf_counter(),
                    "workers": workers.cpu(),
                    "publisher": process_cpu(publisher.pid),
                    "receivers": {k: r.cpu_seconds() for k, r in receivers.items()},
                    "pg": pg.totals(),
                    "busy": busy_cpu_seconds(),
                    "bench": _cpu_seconds(),
                    "transactions": transactions(args.database) if line == "START" else 0,
                }
                if line == "START":
                    if args.sample_activity:
                        watched.activity = Activity(args.database).__enter__()
                    if args.autoanalyze:
                        watched.analyze = AutoAnalyze(args.database, args.autoanalyze)
                        watched.analyze.__enter__()
                elif line == "END":
                    for sampler in (watched.activity, watched.analyze):
                        if sampler is not None:
                            sampler.__exit__()
    finally:
        for sampler in (watched.activity, watched.analyze):
            if sampler is not None:
                sampler.__exit__()
        if publisher.poll() is None and watched.error:
            publisher.kill()
        try:
            publisher.wait(timeout=60)
        except subprocess.TimeoutExpired:
            publisher.kill()
            publisher.wait(timeout=5)
    return watched


def run_contender(
    contender: Contender,
    args: argparse.Namespace,
    folder: Path,
    receivers: dict[str, audience_bench.Simulator],
    channels: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """Set up a fresh store, start the workers, publish, wait, collect; the result."""
    run_folder = Path(tempfile.mkdtemp(prefix=f"{contender.name}-", dir=folder))
    store = f"sqlite:///{run_folder / 'broadcaster.db'}" if contender.sqlite else args.database
    port = receivers["webhook"].port if "webhook" in receivers else 0
    if not contender.sqlite:
        reset_database(args.database)
    setup_seconds = setup_store(
        store,
        args.n,
        args.channel,
        port,
        jobs=contender.backend == "procrastinate",
    )
    workers_config: dict[str, Any] = {}
    if args.batch:
        workers_config["batch"] = args.batch
    if args.worker_concurrency:
        workers_config["concurrency"] = args.worker_concurrency
    config = write_config(run_folder, store, contender.backend, channels, workers_config)
    result: dict[str, Any] = {
        "contender": contender.name,
        "backend": contender.backend,
        "workers": contender.workers,
        "store": "sqlite" if contender.sqlite else "postgresql",
        "n": args.n,
        "setup_seconds": round(setup_seconds, 2),
    }
    profile_file = run_folder / "worker.prof" if contender.profile else None
    args.sample_activity = contender.profile
    workers = Workers()
    try:
        if contender.workers:
            workers = start_workers(contender.workers, config, run_folder, profile_file)
            problem = wait_until_ready(
                args.database, workers, contender.workers * (1 + len(channels))
            )
            if problem:
                return {**result, "ok": False, "error": problem}
        for receiver in receivers.values():
            receiver.reset()
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--job",
            "publish",
            "--config",
            str(config),
            "--timeout",
            str(args.timeout),
            *(option for kind in args.channel for option in ("--channel", kind)),
        ]
        log = run_folder / "publisher.log"
        with PostgresCpu(database_name(args.database)) as pg:
            watched = watch_publisher(command, log, workers, receivers, pg, args)
    finally:
        stop_workers(workers)
    # After the workers stopped: their backends have reported their transactions.
    transactions_done = transactions(args.database)
    if watched.error:
        return {**result, "ok": False, "error": watched.error}
    marks, lines, activity = watched.marks, watched.lines, watched.activity
    found = [line for line in lines if line.startswith(RESULT_PREFIX)]
    if not found or "START" not in marks or "END" not in marks:
        return {**result, "ok": False, "error": f"the publisher failed: {tail(log, 15)}"}
    published: dict[str, Any] = json.loads(found[-1][len(RESULT_PREFIX) :])
    if "error" in published:
        return {**result, "ok": False, "error": f"the publisher: {published['error']}"}
    start, end = marks["START"], marks["END"]
    wall = end["wall"] - start["wall"]
    worker_cpu = [b - a for a, b in zip(start["workers"], end["workers"], strict=True)]
    receiver_cpu = {k: end["receivers"][k] - start["receivers"][k] for k in receivers}
    pg_cpu = {k: end["pg"][k] - start["pg"].get(k, 0.0) for k in end["pg"]}
    cpu = {
        "workers": sum(worker_cpu),
        "publisher": end["publisher"] - start["publisher"],
        "receiver": sum(receiver_cpu.values()),
        "postgresql": pg_cpu["backends"],
        "postgresql background": pg_cpu["background"],
        "bench": end["bench"] - start["bench"],
    }
    busy = end["busy"] - start["busy"]
    cpu["others"] = max(0.0, busy - sum(cpu.values()))
    result.update(
        seconds=published["seconds"],
        publish_seconds=published["publish_seconds"],
        timed_out=published["timed_out"],
        per_s=args.n / published["seconds"],
        wall_seconds=wall,
        cpu_seconds={k: round(v, 2) for k, v in cpu.items()},
        worker_cpu_seconds=[round(v, 2) for v in worker_cpu],
        postgresql_other_databases=round(pg_cpu["other databases"], 2),
        transactions_per_delivery=(
            None if contender.sqlite else (transactions_done - start["transactions"]) / args.n
        ),
        machine_busy_percent=100 * busy / (wall * (os.cpu_count() or 1)),
        **delivery_summary(
            store, published["update_id"], datetime.fromisoformat(published["started_at"])
        ),
        texts=published["texts"],
        receivers={k: r.stats() for k, r in receivers.items()},
    )
    if activity is not None:
        result["activity"] = activity.summary()
    if watched.analyze is not None:
        result["analyzed"] = watched.analyze.runs
    if profile_file is not None:
        if profile_file.exists():
            result["profile"] = audience_bench.profile_text(str(profile_file), limit=20)
            if args.profile_out:
                Path(args.profile_out).write_bytes(profile_file.read_bytes())
        else:
            result["profile_error"] = f"no profile written: {tail(workers.logs[0])}"
    result["problems"] = verify(result, args)
    result["ok"] = not result["problems"]
    return result


# -- verification ----------------------------------------------------------------------------


def verify(result: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """Exactly one settled delivery per subscriber; each receiver got exactly its
    subscribers' messages, once each, in their languages; no job failed."""
    problems = []
    if result.get("timed_out"):
        problems.append(f"not settled within {args.timeout:.0f}s")
    expected = args.expected
    for kind in args.channel:
        name, want = SUBSCRIBER_CHANNELS[kind], expected[kind]
        got = result["channels"].get(name, {"deliveries": 0, "states": {}})
        settled = "delivered" if kind == "webhook" else "sent"
        if got["deliveries"] != want["count"]:
            problems.append(f"{name}: {got['deliveries']} deliveries, expected {want['count']}")
        if got.get("distinct_recipients") != got["deliveries"]:
            problems.append(f"{name}: a subscriber has more than one delivery")
        others = {s: c for s, c in got["states"].items() if s != settled}
        if others:
            problems.append(
                f"{name}: not every delivery is {settled}: {got['states']} {got.get('errors')}"
            )
        tally = result["receivers"][RECEIVER_OF[kind]]
        sent = got["states"].get(settled, 0)
        if tally["errors"]:
            problems.append(f"{name}: the receiver answered {tally['errors']} calls with errors")
        if tally["duplicates"]:
            problems.append(f"{name}: {tally['duplicates']} recipients got more than one message")
        if tally["accepted"] != sent:
            problems.append(
                f"{name}: the receiver accepted {tally['accepted']} messages, {sent} deliveries "
                f"are {settled}"
            )
        if tally["distinct"] == want["count"] and tally["digest"] != want["digest"]:
            problems.append(f"{name}: the recipients are not the expected subscribers")
        languages = tally["languages"]
        if kind == "sms":  # the simulator counts bodies: map each text to its language
            by_text = {v["text"]: lang for lang, v in result["texts"].get("sms", {}).items()}
            languages = {}
            for body, count in tally["languages"].items():
                lang = by_text.get(body, "?")
                languages[lang] = languages.get(lang, 0) + count
        if not problems and languages != want["languages"]:
            problems.append(f"{name}: languages {languages}, expected {want['languages']}")
    failed = {job: c for job, c in result.get("jobs_left", {}).items() if "failed" in job}
    if failed:
        problems.append(f"procrastinate jobs failed: {failed}")
    return problems


# -- report ----------------------------------------------------------------------------------


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median run by rate, with every run's rate in `runs_per_s`."""
    ordered = sorted(runs, key=lambda r: r.get("per_s", 0.0))
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["runs_per_s"] = [round(r.get("per_s", 0.0), 1) for r in runs]
    chosen["ok"] = all(r.get("ok") for r in runs)
    return chosen


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def print_report(
    args: argparse.Namespace, results: dict[str, dict[str, Any]], base: str | None
) -> dict[str, Any]:
    cores = os.cpu_count() or 1
    kinds = " + ".join(args.channel)
    print()
    print(
        f"One update to {args.n:,} subscribers ({kinds}) — {platform.python_implementation()} "
        f"{platform.python_version()}, {cores} CPUs; receiver(s) in their own process"
    )
    server = args.server
    analyze = (
        f"the bench ANALYZEs where autovacuum would, every {args.autoanalyze:g} s"
        if args.autoanalyze
        else "nothing ANALYZEs the tables during a run"
    )
    print(
        f"PostgreSQL {server['server_version']} (database {database_name(args.database)}, "
        f"autovacuum {server['autovacuum']}, synchronous_commit "
        f"{server['synchronous_commit']}): {analyze}"
    )

    def rate(name: str) -> float | None:
        r = results.get(name)
        return r["per_s"] if r and "per_s" in r and r.get("ok") else None

    fewest = f"procrastinate x{min(args.workers)}"
    one = rate(fewest)
    embedded = rate(base) if base else None
    header = (
        f"{'contender':<24}{'seconds':>9}{'deliv/s':>9}{'vs x' + str(min(args.workers)):>9}"
        f"{'vs emb.':>8}"
        f"{'  CPU s: workers':>16}{'publisher':>10}{'PG':>7}{'PG bg':>7}{'receiver':>9}"
        f"{'others':>7}{'busy %':>8}"
    )
    print(header)
    print("-" * len(header))
    ratios: dict[str, dict[str, float | None]] = {}
    for name, r in results.items():
        if "per_s" not in r:
            print(f"{name:<24}  FAILED: {r.get('error')}")
            continue
        own = rate(name)
        ratios[name] = {
            "over_fewest_workers": own / one if own and one else None,
            "over_embedded": own / embedded if own and embedded else None,
        }
        c = r["cpu_seconds"]
        print(
            f"{name:<24}{r['seconds']:>9.1f}{r['per_s']:>9,.0f}"
            f"{fmt_ratio(ratios[name]['over_fewest_workers']):>9}"
            f"{fmt_ratio(ratios[name]['over_embedded']):>8}"
            f"{c['workers']:>16.1f}{c['publisher']:>10.1f}{c['postgresql']:>7.1f}"
            f"{c['postgresql background']:>7.1f}{c['receiver']:>9.1f}{c['others']:>7.1f}"
            f"{r['machine_busy_percent']:>8.0f}" + ("" if r.get("ok") else "  NOT OK")
        )
    print()
    print(
        "CPU per delivery (ms) by process type, PostgreSQL transactions per delivery, and "
        "each worker's CPU:"
    )
    header = (
        f"{'contender':<24}{'broadcaster':>12}{'PostgreSQL':>11}{'receiver':>9}"
        f"{'others':>8}{'PG xacts':>10}   per-worker CPU s (share of a core)"
    )
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        if "per_s" not in r:
            continue
        c, n, seconds = r["cpu_seconds"], args.n, r["seconds"]
        ours = c["workers"] + c["publisher"]
        pg = c["postgresql"] + c["postgresql background"]
        shares = ", ".join(f"{s:.1f} ({100 * s / seconds:.0f} %)" for s in r["worker_cpu_seconds"])
        xacts = r.get("transactions_per_delivery")
        print(
            f"{name:<24}{1000 * ours / n:>12.2f}{1000 * pg / n:>11.2f}"
            f"{1000 * c['receiver'] / n:>9.2f}{1000 * c['others'] / n:>8.2f}"
            f"{'-' if xacts is None else f'{xacts:.2f}':>10}   {shares or '-'}"
        )
    for name, r in results.items():
        if "channels" not in r:
            continue
        for channel, got in r["channels"].items():
            print(
                f"  {name}: {channel} states {got['states']}; publish() "
                f"{r['publish_seconds'] * 1000:.0f} ms; every delivery created after "
                f"{got['created_s']:.1f} s; first sent {got['first_sent_s'] or 0:.2f} s; "
                f"{got['deliver_jobs']} deliver jobs; {got['retried']} retried"
                + (f"; runs {r['runs_per_s']}" if len(r.get("runs_per_s", [])) > 1 else "")
            )
        if r.get("analyzed"):
            runs = r["analyzed"]
            shown = ", ".join(f"{a['table']} at {a['at_s']:g} s" for a in runs[:4])
            print(
                f"    ANALYZE ran {len(runs)} times ({sum(a['took_s'] for a in runs):.2f} s): "
                + shown
                + (", …" if len(runs) > 4 else "")
            )
        if r.get("postgresql_other_databases", 0) > 1:
            print(
                f"    (other databases' backends used {r['postgresql_other_databases']:.1f} s "
                "of CPU meanwhile: other sessions share this PostgreSQL)"
            )
    busiest = max(
        (100 * r["cpu_seconds"]["others"] / r["seconds"] for r in results.values() if "per_s" in r),
        default=0.0,
    )
    if busiest > 15:
        print(
            f"  note: other processes used up to {busiest:.0f} % CPU (100 % = one core) during "
            "the runs — the figures are lower than on an idle machine"
        )
    return ratios


def print_profile(result: dict[str, Any]) -> None:
    print()
    print(
        "Profile of one worker: cProfile timing CPU (time.process_time), a separate run "
        f"with 1 worker ({result.get('per_s', 0):,.0f} deliveries/s under the profiler; not "
        "used above). On PostgreSQL all of a worker's work runs on its event loop's thread."
    )
    if result.get("profile"):
        print(result["profile"])
    else:
        print(f"  ! {result.get('profile_error') or result.get('error')}")
    activity = result.get("activity")
    if activity:
        print(
            f"PostgreSQL side (pg_stat_activity every {ACTIVITY_SECONDS * 1000:.0f} ms, "
            f"{activity['samples']} samples): on average {activity['busy_backends']:.2f} of "
            f"our backends running a statement, {activity['idle_in_transaction']:.2f} idle in "
            "a transaction (waiting for the worker); statements by share of samples:"
        )
        for statement, share in activity["top"]:
            print(f"  {share:6.3f}  {statement}")
        if activity["waits"]:
            print(f"  waits (samples): {activity['waits']}")


# -- main --------------------------------------------------------------------------------------


def parse_workers(text: str) -> list[int]:
    counts = [int(part) for part in text.split(",") if part.strip()]
    if not counts or any(c < 1 for c in counts):
        raise argparse.ArgumentTypeError("a list of worker counts, e.g. 1,2,4")
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(
        description="One update to N subscribers through the procrastinate backend with "
        "1, 2, 4… `broadcaster worker` processes, against the embedded backend."
    )
    parser.add_argument("-n", type=int, default=None, help="subscribers (default 100,000)")
    parser.add_argument(
        "--workers", type=parse_workers, default=None, help="worker counts (default 1,2,4)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="while developing: N = 5,000, workers 1,2"
    )
    parser.add_argument(
        "--channel",
        choices=["webhook", "sms", "email"],
        action="append",
        help="subscriber channel (repeatable: subscribers take turns; default webhook)",
    )
    parser.add_argument(
        "--database",
        default=DEFAULT_DATABASE,
        help="PostgreSQL database for the store and the jobs; created if missing, and "
        f"its public schema is DROPPED before each run (default {DEFAULT_DATABASE})",
    )
    parser.add_argument("--sqlite", action="store_true", help="also the embedded backend on SQLite")
    parser.add_argument("--no-embedded", action="store_true", help="skip the embedded baseline")
    parser.add_argument("--repeat", type=int, default=1, help="runs per contender (median)")
    parser.add_argument(
        "--rate-limit",
        choices=["off", "shipped"],
        default="off",
        help="off: rate_limit = {} as the other benches (default); shipped: the channel's "
        "default limits (webhook: 10/s per subscriber URL — a reservation per delivery)",
    )
    parser.add_argument(
        "--autoanalyze",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="play autovacuum's part (this server runs without it): every SECONDS, ANALYZE "
        "each table where autovacuum would (50 rows + 10 %% changed); 0: never, so the "
        "deliveries table has no statistics during the run (default 1)",
    )
    parser.add_argument("--batch", type=int, help="workers.batch (default: as shipped)")
    parser.add_argument(
        "--worker-concurrency", type=int, help="workers.concurrency (default: as shipped)"
    )
    parser.add_argument(
        "--profile", action="store_true", help="one more run: 1 worker under cProfile"
    )
    parser.add_argument("--profile-out", help="with --profile: keep the worker's pstats file here")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run (1800)")
    parser.add_argument("--json", action="store_true", help="print a JSON line last")
    hidden = argparse.SUPPRESS
    parser.add_argument("--receiver", action="store_true", help=hidden)
    parser.add_argument("--job", choices=["publish"], help=hidden)
    parser.add_argument("--config", help=hidden)
    args = parser.parse_args()
    args.channel = args.channel or ["webhook"]

    if args.receiver:
        receiver_main()
        return 0
    if args.job == "publish":
        publisher_main(args)
        return 0

    # On SIGTERM too, unwind: workers stopped, receivers stopped, temp files removed.
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(143))
    args.n = args.n or (5000 if args.quick else 100_000)
    args.workers = args.workers or ([1, 2] if args.quick else [1, 2, 4])
    args.database = libpq_url(args.database)
    ensure_database(args.database)
    args.server = server_settings(args.database)
    contenders: list[Contender] = []
    if not args.no_embedded:
        contenders.append(Contender("embedded (PostgreSQL)", "embedded"))
        if args.sqlite:
            contenders.append(Contender("embedded (SQLite)", "embedded", sqlite=True))
    contenders += [Contender(f"procrastinate x{k}", "procrastinate", k) for k in args.workers]
    base = contenders[0].name if not args.no_embedded else None
    load_before = os.getloadavg()[0]
    runs: dict[str, list[dict[str, Any]]] = {c.name: [] for c in contenders}
    profiled = None
    with contextlib.ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-scale-")))
        receivers = {
            RECEIVER_OF[kind]: stack.enter_context(running_receiver(kind)) for kind in args.channel
        }
        ports = {kind: receivers[RECEIVER_OF[kind]].port for kind in args.channel}
        channels = channel_configs(args.channel, ports, args.rate_limit, folder)
        args.expected = expected_tallies(args.n, args.channel, ports.get("webhook", 0))
        for round_ in range(args.repeat):
            for contender in contenders:
                label = contender.name + (f" (run {round_ + 1})" if args.repeat > 1 else "")
                print(f"{label}: {args.n:,} deliveries…", flush=True)
                run = run_contender(contender, args, folder, receivers, channels)
                runs[contender.name].append(run)
                if "per_s" in run:
                    print(
                        f"  {run['seconds']:.1f} s, {run['per_s']:,.0f} deliveries/s"
                        + ("" if run["ok"] else f"  ! {run.get('problems') or run.get('error')}"),
                        flush=True,
                    )
                else:
                    print(f"  ! {run.get('error')}", flush=True)
        if args.profile:
            print("profiled run: procrastinate, 1 worker under cProfile…", flush=True)
            profiled = run_contender(
                Contender("profiled x1", "procrastinate", 1, profile=True),
                args,
                folder,
                receivers,
                channels,
            )
    load_after = os.getloadavg()[0]
    results = {name: median_run(r) for name, r in runs.items()}
    ratios = print_report(args, results, base)
    if profiled is not None:
        print_profile(profiled)
    every_run = [(name, r) for name, done in runs.items() for r in done]
    problems = [
        f"{name}: {problem}"
        for name, r in [*every_run, *([("profiled", profiled)] if profiled else [])]
        for problem in (r.get("problems") or ([r["error"]] if r.get("error") else []))
    ]
    for problem in problems:
        print(f"  ! {problem}")
    if args.json:

        def slim(r: dict[str, Any]) -> dict[str, Any]:
            return {k: v for k, v in r.items() if k not in ("texts", "profile")}

        summary = {
            "n": args.n,
            "channels": args.channel,
            "workers": args.workers,
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average": [round(load_before, 2), round(load_after, 2)],
            "postgresql": args.server,
            "autoanalyze_seconds": args.autoanalyze,
            "per_s": {name: r.get("per_s") for name, r in results.items()},
            "ratios": ratios,
            "problems": problems,
            "results": {name: slim(r) for name, r in results.items()},
            "profile": slim(profiled) if profiled else None,
        }
        print(json.dumps(summary, default=str))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
