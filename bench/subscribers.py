"""Fan-out to subscribers: one update to N subscribers by SMS (Twilio) and email (SMTP),
against the local simulators, with a bare-SDK baseline measured in the same run.

    .venv/bin/python bench/subscribers.py                     # N = 100,000 (~6 min, 2 cores)
    .venv/bin/python bench/subscribers.py --json              # last line: one JSON object
    .venv/bin/python bench/subscribers.py --profile           # + where the time goes
    .venv/bin/python bench/subscribers.py --rss-only 1000000  # peak RSS of a 1M fan-out

Every process has its own job, so CPU time and peak memory are each one's own:

- two **simulators**, each in its own process: `FakeTwilio` (twilio-python's real client
  talks to it over HTTP) and `FakeSmtp` (aiosmtpd). Each counts what it accepted, per
  recipient (not the messages themselves: a million would not fit), and answers `stats`
  and `reset` on its stdin; it exits when its stdin closes.
- **setup** (not measured): a SQLite store migrated by `Store.open`, then N subscribers
  and their consents inserted in bulk with SQLAlchemy Core. Subscriber i has a phone
  (channel `sms`) when i is even, an email (channel `email`) when odd; a third speak
  French; one in ten follows only `billing`, which the update does not touch (skipped by
  the fan-out), one in ten only `api` (reached).
- **incident-broadcaster** (measured): `Broadcaster.open` on a copy of that store, then
  one `publish()` of an update touching `api` to both channels and `wait([update_id])`
  until every delivery is settled: the dispatcher creates the deliveries from the store in
  batches (FANOUT_BATCH subscribers a transaction), claims, sends and settles them.
  `--rss-only N` runs this alone, and by default stops sending 60 s after the fan-out
  has created every delivery (`--send-seconds 0`: send everything; 1M takes ~45 min).
- **bare SDKs** (the baseline): the same recipients and texts, the same concurrency, one
  process: twilio-python's `messages.create_async` from 64 workers on one
  `AsyncTwilioHttpClient`, and aiosmtplib over 8 connections held open, each message
  composed with `EmailMessage` (text + HTML, the channel's headers) as the channel does.
- **import**: `Audience.import_csv` of 10,000 CSV rows into a fresh store (rows/s).

Verified: the store holds exactly one delivery per subscribed, following subscriber, every
one `sent`; each simulator accepted exactly one message per expected recipient (count,
no duplicate, and an order-free digest of the addresses), in the recipient's language;
the baseline's sends all succeeded. Exit status 1 when a check fails; with `--strict` and
`--rss-only`, 2 when the peak RSS is 300 MB or more. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import io
import json
import os
import platform
import re
import resource
import select
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from broadcaster.runtime import run as run_loop

RESULT_PREFIX = "RESULT "
TARGET_RSS_MB = 300.0  # the target for a 1,000,000-subscriber fan-out

ACCOUNT_SID = "AC" + "5a" * 16  # FakeTwilio's default account
AUTH_TOKEN = "sandbox-twilio-auth-token"
TOKEN_ENV = "BENCH_TWILIO_AUTH_TOKEN"
SENDER = "+15017122661"
FROM_ADDRESS = "Acme Status <status@acme.com>"
UNSUBSCRIBE = "https://status.acme.com/unsubscribe?s={subscriber}"
COMPONENTS = {"api": "API", "billing": "Billing"}
TITLE = "Card payments fail"
SUMMARY = "Card payments fail for some customers in Europe. Bank transfers work."
SUMMARY_FR = (
    "Les paiements par carte echouent pour certains clients en Europe. Les virements marchent."
)
SETUP_CHUNK = 20_000  # rows per executemany of the setup


# -- the subscribers ---------------------------------------------------------------------


def subscriber(i: int) -> tuple[str | None, str | None, str, list[str] | None]:
    """(phone, email, language, components) of subscriber i (1-based)."""
    phone = f"+336{i:08d}" if i % 2 == 0 else None
    email = None if phone else f"s{i}@subscribers.acme.com"
    language = "fr" if i % 3 == 0 else "en"
    kind = i % 20
    components = ["billing"] if kind in (1, 2) else ["api"] if kind in (3, 4) else None
    return phone, email, language, components


def follows_update(components: list[str] | None) -> bool:
    """The update touches `api`."""
    return components is None or "api" in components


def address_digest(address: str) -> int:
    return int.from_bytes(hashlib.blake2b(address.encode(), digest_size=8).digest(), "big")


class Expected:
    """What the simulators must have received: per channel, count, languages, digest."""

    def __init__(self) -> None:
        self.channels: dict[str, dict[str, Any]] = {
            name: {"count": 0, "languages": {}, "digest": 0} for name in ("sms", "email")
        }

    def add(self, channel: str, address: str, language: str) -> None:
        entry = self.channels[channel]
        entry["count"] += 1
        entry["languages"][language] = entry["languages"].get(language, 0) + 1
        entry["digest"] = (entry["digest"] + address_digest(address)) % 2**64


# -- simulators (each in its own process) ----------------------------------------------------


class Tally:
    """What a simulator accepted, per recipient: enough to check exactly-once delivery
    without keeping every message."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.seen: set[str] = set()
            self.accepted = 0
            self.duplicates = 0
            self.digest = 0
            self.languages: dict[str, int] = {}
            self.errors = 0
            self.bytes = 0
            self.connections: set[int] = set()

    def add(self, address: str, language: str, size: int, connection: int = 0) -> None:
        """One message accepted. `language`: for SMS, the body itself (the orchestrator
        maps each rendered text back to its language)."""
        with self.lock:
            self.accepted += 1
            self.bytes += size
            self.connections.add(connection)
            if address in self.seen:
                self.duplicates += 1
                return
            self.seen.add(address)
            self.digest = (self.digest + address_digest(address)) % 2**64
            self.languages[language] = self.languages.get(language, 0) + 1

    def error(self) -> None:
        with self.lock:
            self.errors += 1

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {
                "accepted": self.accepted,
                "distinct": len(self.seen),
                "duplicates": self.duplicates,
                "digest": self.digest,
                "languages": dict(self.languages),
                "errors": self.errors,
                "bytes": self.bytes,
                "connections": len(self.connections - {0}),
            }


class _CallCounter:
    """Stands in for a simulator's CallLog: counts failed calls, keeps nothing."""

    def __init__(self, tally: Tally) -> None:
        self.tally = tally

    def record(self, entry: Any) -> None:
        ok = getattr(entry, "ok", True)
        if not ok:
            self.tally.error()

    def snapshot(self) -> list[Any]:
        return []

    def clear(self) -> None:
        pass

    def __len__(self) -> int:
        return 0


_CONTENT_LANGUAGE = re.compile(rb"\r\nContent-Language: ([A-Za-z-]+)")


def simulator_main(kind: str) -> None:
    """Run one simulator until stdin closes; `stats` and `reset` lines are answered."""
    with contextlib.suppress(ImportError):
        import uvloop

        # The simulators' own loops (FakeTwilio's thread, aiosmtpd's controller) are made
        # with new_event_loop(): on uvloop, so the fakes are not what limits a run.
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    tally = Tally()
    stop: Any
    if kind == "twilio":
        from broadcaster.sandbox.twilio import FakeTwilio

        class CountingTwilio(FakeTwilio):
            def _accept(self, account: str, params: dict[str, Any]) -> Any:
                message = super()._accept(account, params)
                with self._lock:  # counted, not kept
                    self._messages.pop(message.sid, None)
                tally.add(message.to, message.body, len(message.body))
                return message

        twilio = CountingTwilio()
        twilio._calls = _CallCounter(tally)  # type: ignore[assignment]
        twilio.start_in_thread()
        port = int(twilio.url.rsplit(":", 1)[1])
        stop = twilio.stop_thread
    else:
        from broadcaster.sandbox.smtp import FakeSmtp

        class CountingLog:
            def record(self, mail: Any) -> None:
                found = _CONTENT_LANGUAGE.search(mail.data)
                language = found.group(1).decode() if found else "?"
                tally.add(mail.rcpt_tos[0], language, len(mail.data), mail.connection)

            def snapshot(self) -> list[Any]:
                return []

        smtp = FakeSmtp()
        smtp.mail = CountingLog()  # type: ignore[assignment]
        smtp.start()
        port = smtp.port
        stop = smtp.stop
    print(f"PORT {port}", flush=True)
    try:
        for line in sys.stdin:
            command = line.strip()
            if command == "stats":
                print("STATS " + json.dumps(tally.stats()), flush=True)
            elif command == "reset":
                tally.reset()
                print("OK", flush=True)
    finally:
        stop()


@dataclass
class Simulator:
    kind: str
    process: subprocess.Popen[str]
    port: int

    def ask(self, command: str) -> str:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        ready, _, _ = select.select([self.process.stdout], [], [], 60)
        if not ready:
            raise RuntimeError(f"the {self.kind} simulator did not answer {command!r}")
        return self.process.stdout.readline().strip()

    def stats(self) -> dict[str, Any]:
        answer = self.ask("stats")
        if not answer.startswith("STATS "):
            raise RuntimeError(f"the {self.kind} simulator said {answer!r}")
        stats: dict[str, Any] = json.loads(answer[len("STATS ") :])
        return stats

    def reset(self) -> None:
        if self.ask("reset") != "OK":
            raise RuntimeError(f"the {self.kind} simulator did not reset")

    def cpu_seconds(self) -> float:
        import psutil

        times = psutil.Process(self.process.pid).cpu_times()
        return float(times.user + times.system)


def running_simulator(kind: str) -> contextlib.AbstractContextManager[Simulator]:
    """A simulator in its own process; always stopped (and it exits if we die)."""
    return running_child(kind, [str(Path(__file__).resolve()), "--simulator", kind])


@contextlib.contextmanager
def running_child(kind: str, script: list[str]) -> Iterator[Simulator]:
    """`python SCRIPT…` in its own process, which prints `PORT n` once it listens and
    exits when its stdin closes; always stopped."""
    process = subprocess.Popen(
        [sys.executable, *script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], 30)
        line = process.stdout.readline() if ready else ""
        if not line.startswith("PORT "):
            raise RuntimeError(f"the {kind} simulator did not start (said {line!r})")
        yield Simulator(kind, process, int(line.split()[1]))
    finally:
        if process.stdin is not None:
            with contextlib.suppress(OSError):
                process.stdin.close()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


# -- measuring in a worker process -----------------------------------------------------------


def _peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _rss_mb() -> float:
    """The current RSS (Linux: /proc/self/statm), else the peak so far."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return _peak_rss_mb()
    return pages * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _thread_role(thread: threading.Thread) -> str:
    if thread is threading.main_thread():
        return "event loop"
    if thread.name.startswith("store-writer"):
        return "store writer (fan-out, claims, settles)"
    if "_connection_worker_thread" in thread.name:
        return "aiosqlite (reads)"
    if thread.name == "rss-sampler":
        return "bench sampler"
    return "other"


def thread_cpu() -> dict[int, tuple[str, float]]:
    """CPU seconds so far of each live thread, by native id: (role, seconds). Linux."""
    ticks = os.sysconf("SC_CLK_TCK")
    found = {}
    for thread in threading.enumerate():
        tid = thread.native_id
        try:
            fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError, TypeError):
            continue
        found[tid or 0] = (_thread_role(thread), (int(fields[11]) + int(fields[12])) / ticks)
    return found


def cpu_by_role(before: dict[int, tuple[str, float]], cpu: float) -> dict[str, float]:
    """CPU seconds used since `before`, per thread role; "ended threads" is the rest of
    the process's `cpu`."""
    roles: dict[str, float] = {}
    for tid, (role, seconds) in thread_cpu().items():
        used = seconds - before.get(tid, (role, 0.0))[1]
        roles[role] = roles.get(role, 0.0) + used
    roles["ended threads"] = max(0.0, cpu - sum(roles.values()))
    return {role: round(seconds, 2) for role, seconds in roles.items()}


def store_url(db: Path) -> str:
    return f"sqlite:///{db}"


def bench_settings(
    folder: Path, db: Path, twilio_port: int, smtp_port: int, sms_c: int, smtp_conns: int
) -> Any:
    from broadcaster.config import Settings

    os.environ[TOKEN_ENV] = AUTH_TOKEN
    return Settings(
        store=store_url(db),
        data_dir=folder / "data",
        config_path=folder / "broadcaster.toml",
        components=COMPONENTS,
        channels={
            "sms": {
                "type": "sms",
                "account_sid": ACCOUNT_SID,
                "auth_token": {"env": TOKEN_ENV},
                "from_number": SENDER,
                "languages": ["en", "fr"],
                "base_url": f"http://127.0.0.1:{twilio_port}",
                # No serve here to receive Twilio's callbacks: deliveries end `sent`.
                "status_callback": False,
                "rate_limit": {},
                "concurrency": sms_c,
            },
            "email": {
                "type": "email",
                "host": "127.0.0.1",
                "port": smtp_port,
                "security": "none",
                "from_address": FROM_ADDRESS,
                "unsubscribe_url": UNSUBSCRIBE,
                "languages": ["en", "fr"],
                "helo_hostname": "bench.acme.com",
                "rate_limit": {},
                "max_connections": smtp_conns,
            },
        },
    )


def update_request(channels: list[str]) -> Any:
    from broadcaster.models import ComponentState, IncidentStatus, UpdateRequest

    return UpdateRequest(
        status=IncidentStatus.INVESTIGATING,
        title=TITLE,
        components={"api": ComponentState.MAJOR_OUTAGE},
        fields={"summary": SUMMARY, "summary.fr": SUMMARY_FR},
        channels=channels,
        actor="bench",
    )


def setup_main(args: argparse.Namespace) -> dict[str, Any]:
    """Migrate a new store and insert N subscribers in bulk (not what is measured)."""
    from sqlalchemy import create_engine, event, insert

    from broadcaster.store import Store
    from broadcaster.store.tables import SUBSCRIBERS, SUBSCRIPTIONS

    started = time.perf_counter()
    db = Path(args.db)

    async def migrate() -> None:
        store = await Store.open(f"sqlite+aiosqlite:///{db}")
        await store.close()

    asyncio.run(migrate())
    engine = create_engine(store_url(db))

    @event.listens_for(engine, "connect")
    def _fast(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.execute("PRAGMA synchronous=OFF")

    expected = Expected()
    now = datetime.now(UTC)
    with engine.begin() as conn:
        for first in range(1, args.n + 1, SETUP_CHUNK):
            people, consents = [], []
            for i in range(first, min(first + SETUP_CHUNK, args.n + 1)):
                phone, email, language, components = subscriber(i)
                people.append(
                    {
                        "id": i,
                        "phone": phone,
                        "email": email,
                        "language": language,
                        "components": components,
                        "timezone": None,
                        "created_at": now,
                        "updated_at": None,
                    }
                )
                channel = "sms" if phone else "email"
                consents.append(
                    {
                        "subscriber_id": i,
                        "channel": channel,
                        "subscribed": True,
                        "changed_at": now,
                        "source": "bench",
                    }
                )
                if follows_update(components):
                    expected.add(channel, phone or email or "", language)
            conn.execute(insert(SUBSCRIBERS), people)
            conn.execute(insert(SUBSCRIPTIONS), consents)
    engine.dispose()
    return {
        "ok": True,
        "seconds": time.perf_counter() - started,
        "expected": expected.channels,
        "db_mb": db.stat().st_size / 2**20,
    }


class RssSampler:
    """RSS and fan-out progress every `every` seconds, on a thread (its own read-only
    SQLite connection), to see what grows with what."""

    def __init__(self, db: Path, every: float) -> None:
        self.db, self.every = db, every
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._started = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def start(self) -> None:
        self._started = time.perf_counter()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, check_same_thread=False)
        try:
            while not self._stop.wait(self.every):
                created: dict[str, int] = {}
                with contextlib.suppress(sqlite3.Error):
                    created = dict(conn.execute("SELECT channel, created FROM fanouts").fetchall())
                self.samples.append(
                    {
                        "t": round(time.perf_counter() - self._started, 1),
                        "rss_mb": round(_rss_mb(), 1),
                        "created": created,
                    }
                )
        finally:
            conn.close()


def _parse_utc(value: str) -> datetime:
    return datetime.fromisoformat(value).replace(tzinfo=UTC)


def delivery_summary(db: Path, update_id: int, started: datetime) -> dict[str, Any]:
    """Per channel: states, attempts, errors, and when its last delivery was created and
    settled (seconds after `started`)."""
    query = "FROM deliveries WHERE update_id = ? GROUP BY channel"
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        states = conn.execute(f"SELECT channel, state, count(*) {query}, state", (update_id,))
        totals = conn.execute(
            "SELECT channel, count(*), count(DISTINCT recipient), max(created_at), "
            f"max(sent_at), sum(attempts), count(*) FILTER (WHERE attempts > 1) {query}",
            (update_id,),
        ).fetchall()
        channels: dict[str, dict[str, Any]] = {}
        for channel, count, distinct, created, settled, attempts, retried in totals:
            channels[channel] = {
                "deliveries": count,
                "distinct_recipients": distinct,
                "created_s": (_parse_utc(created) - started).total_seconds(),
                "settled_s": (_parse_utc(settled) - started).total_seconds() if settled else 0,
                "attempts": attempts,
                "retried": retried,
                "states": {},
                "errors": {},
            }
        for channel, state, count in states:
            channels[channel]["states"][state] = count
        errors = conn.execute(
            "SELECT channel, last_error, count(*) FROM deliveries "
            "WHERE update_id = ? AND last_error IS NOT NULL "
            "GROUP BY channel, last_error ORDER BY count(*) DESC LIMIT 5",
            (update_id,),
        )
        for channel, error, count in errors:
            channels[channel]["errors"][error] = count
    return channels


def _package(filename: str) -> str:
    """Where a profiled function lives: a site-packages distribution, a stdlib module,
    the project's own packages, or C builtins."""
    path = filename.replace(os.sep, "/")
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1].split("/", 1)[0].removesuffix(".py")
    for own in ("broadcaster", "channels"):
        if f"/{own}/" in path and ".venv" not in path:
            return f"{own}/" + path.split(f"/{own}/", 1)[1].split("/", 1)[0].removesuffix(".py")
    if path.startswith("~") or path == "":
        return "(C builtins)"
    if "/lib/python3" in path:
        rest = path.split("/lib/python3", 1)[1].split("/", 1)[1]
        return "stdlib " + rest.split("/", 1)[0].removesuffix(".py")
    return path


def profile_text(profiler: Any, limit: int = 10) -> str:
    """Own time by package, then the top functions by cumulative and by own time.
    cProfile sees the event loop's thread only, counts every resumption of a coroutine
    as a call (ncalls of `async def` functions are not how often they ran), and charges
    time around greenlet switches (SQLAlchemy's asyncio layer) to odd places: the own
    times by package are the figures to trust."""
    import pstats

    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    by_package: dict[str, float] = {}
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    for (filename, _line, _name), (_cc, _nc, tottime, _ct, _callers) in raw.items():
        package = _package(filename)
        by_package[package] = by_package.get(package, 0.0) + tottime
    total = sum(by_package.values()) or 1.0
    out.write(f"Own time by package ({total:.1f} s on the event loop's thread):\n")
    for package, seconds in sorted(by_package.items(), key=lambda kv: -kv[1])[:15]:
        out.write(f"  {100 * seconds / total:5.1f} %  {seconds:7.2f} s  {package}\n")
    stats.strip_dirs()
    stats.sort_stats("cumulative").print_stats(limit)
    stats.sort_stats("tottime").print_stats(limit)
    return out.getvalue()


async def until_fanned_out(db: Path, update_id: int, waiting: asyncio.Future[Any]) -> bool:
    """Until the update's fan-outs have created every delivery (True), or `waiting` ends."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        while not waiting.done():
            running = conn.execute(
                "SELECT count(*) FROM fanouts WHERE update_id = ? AND state = 'running'",
                (update_id,),
            ).fetchone()[0]
            if not running:
                return True
            await asyncio.wait({waiting}, timeout=0.25)
    return False


async def measure_broadcaster(args: argparse.Namespace) -> dict[str, Any]:
    from broadcaster.core import Broadcaster

    db = Path(args.db)
    folder = db.parent
    settings = bench_settings(
        folder, db, args.twilio_port, args.smtp_port, args.sms_concurrency, args.smtp_connections
    )
    rss_start = _rss_mb()
    opened = time.perf_counter()
    b = await Broadcaster.open(settings=settings)
    open_seconds = time.perf_counter() - opened
    rss_open = _rss_mb()
    sampler = RssSampler(db, args.sample_seconds)
    request = update_request(args.channel)
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
    bounded = False
    try:
        sampler.start()
        started_at = datetime.now(UTC)
        threads0 = thread_cpu()
        cpu0, t0 = _cpu_seconds(), time.perf_counter()
        if profiler is not None:
            profiler.enable()
        result = await b.publish(request)
        publish_seconds = time.perf_counter() - t0
        update_id = result.update.id
        waiting = asyncio.ensure_future(b.wait([update_id]))
        fanned_out = await until_fanned_out(db, update_id, waiting)
        fanned_out_s = time.perf_counter() - t0 if fanned_out else None
        if args.send_seconds and not waiting.done():
            # Bounded: every delivery exists by now; send for this long more, then stop
            # (the dispatcher finishes what is in flight and records it).
            await asyncio.wait({waiting}, timeout=args.send_seconds)
            if not waiting.done():
                bounded = True
                waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        if profiler is not None:
            profiler.disable()
        seconds = time.perf_counter() - t0
        cpu = _cpu_seconds() - cpu0
        threads = cpu_by_role(threads0, cpu)
        peak_rss = _peak_rss_mb()  # before anything else runs in this process
        sampler.stop()
        renders = await b.store.renders(update_id)
    finally:
        sampler.stop()
        await b.close()
    texts = {
        name: {v.language: {"text": v.text, "subject": v.subject} for v in renders[name].variants}
        for name in ("sms", "email")
        if name in renders
    }
    return {
        "seconds": seconds,
        "cpu_percent": 100 * cpu / seconds,
        "publish_seconds": publish_seconds,
        "open_seconds": open_seconds,
        "bounded": bounded,
        "cpu_by_thread": threads,
        "fanned_out_s": fanned_out_s,
        "channels": delivery_summary(db, update_id, started_at),
        "texts": texts,
        "rss_start_mb": rss_start,
        "rss_open_mb": rss_open,
        "peak_rss_mb": peak_rss,
        "samples": sampler.samples,
        "profile": profile_text(profiler) if profiler is not None else None,
    }


def recipients(db: Path) -> tuple[list[tuple[str, str]], list[tuple[int, str, str]]]:
    """The subscribed subscribers the update reaches: (phone, language) for SMS and
    (id, email, language) for email, read from the store as the fan-out filters them."""
    sms: list[tuple[str, str]] = []
    mail: list[tuple[int, str, str]] = []
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        rows = conn.execute(
            "SELECT s.id, s.phone, s.email, s.language, s.components, c.channel "
            "FROM subscribers s JOIN subscriptions c ON c.subscriber_id = s.id "
            "WHERE c.subscribed ORDER BY s.id"
        )
        for sid, phone, email, language, components, channel in rows:
            if not follows_update(json.loads(components) if components else None):
                continue
            if channel == "sms":
                sms.append((phone, language))
            else:
                mail.append((sid, email, language))
    return sms, mail


async def measure_sdk(args: argparse.Namespace) -> dict[str, Any]:
    """The bare SDK loop: the same messages, the same concurrency, no tracking."""
    from email.message import EmailMessage
    from email.policy import SMTP as SMTP_POLICY
    from email.utils import format_datetime

    import aiosmtplib
    from twilio.http.async_http_client import AsyncTwilioHttpClient
    from twilio.rest import Client

    from channels.email import html_body

    texts = json.loads(Path(args.texts).read_text())
    sms_to, mail_to = recipients(Path(args.db))
    sms_text = {lang: v["text"] for lang, v in texts.get("sms", {}).items()}
    mail_parts = {
        lang: (v["subject"], v["text"], html_body(v["text"], language=lang, title=v["subject"]))
        for lang, v in texts.get("email", {}).items()
    }
    sender = FROM_ADDRESS.split("<")[1].rstrip(">")
    http = AsyncTwilioHttpClient()
    client = Client(ACCOUNT_SID, AUTH_TOKEN, http_client=http)
    client.region = client.edge = None
    client.api.base_url = f"http://127.0.0.1:{args.twilio_port}"
    finished: dict[str, float] = {}
    failures: list[str] = []

    async def sms_channel(t0: float) -> int:
        work = iter(sms_to)
        sent = 0

        async def worker() -> None:
            nonlocal sent
            for to, language in work:
                try:
                    message = await client.messages.create_async(
                        to=to, from_=SENDER, body=sms_text[language], validity_period=3600
                    )
                except Exception as exc:
                    failures.append(f"sms {to}: {type(exc).__name__}: {exc}")
                    continue
                if message.status == "queued":
                    sent += 1

        await asyncio.gather(*(worker() for _ in range(args.sms_concurrency)))
        finished["sms"] = time.perf_counter() - t0
        return sent

    async def email_channel(t0: float) -> int:
        work = iter(mail_to)
        sent = 0

        async def worker() -> None:
            nonlocal sent
            smtp = aiosmtplib.SMTP(
                hostname="127.0.0.1", port=args.smtp_port, local_hostname="bench.acme.com"
            )
            await smtp.connect()
            try:
                for sid, to, language in work:
                    subject, text, html = mail_parts[language]
                    mail = EmailMessage(policy=SMTP_POLICY)
                    mail["Subject"] = subject
                    mail["From"] = FROM_ADDRESS
                    mail["To"] = to
                    mail["Date"] = format_datetime(datetime.now(UTC), usegmt=True)
                    mail["Message-ID"] = f"<bench-{sid}@acme.com>"
                    # The channel's headers, so that the messages are the same size.
                    mail["List-Unsubscribe"] = "<" + UNSUBSCRIBE.format(subscriber=sid) + ">"
                    mail["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
                    mail["Auto-Submitted"] = "auto-generated"
                    mail["X-Auto-Response-Suppress"] = "OOF, AutoReply"
                    mail.set_content(text)
                    mail.add_alternative(html, subtype="html")
                    mail["Content-Language"] = language
                    try:
                        await smtp.sendmail(sender, [to], mail.as_bytes())
                    except aiosmtplib.SMTPException as exc:
                        failures.append(f"email {to}: {exc}")
                        continue
                    sent += 1
            finally:
                await smtp.quit()

        await asyncio.gather(*(worker() for _ in range(args.smtp_connections)))
        finished["email"] = time.perf_counter() - t0
        return sent

    run = {"sms": sms_channel, "email": email_channel}
    expected = {"sms": len(sms_to), "email": len(mail_to)}
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    sent = await asyncio.gather(*(run[channel](t0) for channel in args.channel))
    seconds = time.perf_counter() - t0
    cpu = _cpu_seconds() - cpu0
    await http.close()
    channels = {
        channel: {"sent": count, "expected": expected[channel], "settled_s": finished[channel]}
        for channel, count in zip(args.channel, sent, strict=True)
    }
    return {
        "seconds": seconds,
        "cpu_percent": 100 * cpu / seconds,
        "peak_rss_mb": _peak_rss_mb(),
        "channels": channels,
        "failures": failures[:5],
        "ok": not failures and all(c["sent"] == c["expected"] for c in channels.values()),
    }


async def measure_import(args: argparse.Namespace) -> dict[str, Any]:
    """Audience.import_csv of N rows into a fresh store."""
    from broadcaster.core import Broadcaster

    db = Path(args.db)
    settings = bench_settings(db.parent, db, 1, 1, args.sms_concurrency, args.smtp_connections)
    out = io.StringIO()
    out.write("phone,email,language,components\n")
    for i in range(1, args.n + 1):
        phone, email, language, components = subscriber(i)
        out.write(f"{phone or ''},{email or ''},{language},{';'.join(components or [])}\n")
    text = out.getvalue()
    b = await Broadcaster.open(settings=settings)
    try:
        cpu0, t0 = _cpu_seconds(), time.perf_counter()
        report = await b.audience.import_csv(text, source="csv", actor="bench")
        seconds = time.perf_counter() - t0
        cpu = _cpu_seconds() - cpu0
        stored = await b.audience.rows.count()
    finally:
        await b.close()
    return {
        "seconds": seconds,
        "cpu_percent": 100 * cpu / seconds,
        "rows_per_s": args.n / seconds,
        "added": report.added,
        "rejected": [r.reason for r in report.rejected[:3]],
        "stored": stored,
        "peak_rss_mb": _peak_rss_mb(),
        "ok": report.added == args.n and not report.rejected and stored == args.n,
    }


def worker_main(args: argparse.Namespace) -> None:
    """One job, in this (fresh) process; prints one RESULT line."""
    if args.worker == "setup":
        result = setup_main(args)
    else:
        job = {
            "broadcaster": measure_broadcaster,
            "sdk": measure_sdk,
            "import": measure_import,
        }[args.worker](args)

        async def bounded() -> dict[str, Any]:
            return await asyncio.wait_for(job, timeout=args.timeout)

        try:
            # On the loop the broadcaster CLI uses (uvloop where installed), all of them.
            result = run_loop(bounded())
        except TimeoutError:
            result = {"ok": False, "error": f"not finished within {args.timeout:.0f}s"}
        result.setdefault("peak_rss_mb", _peak_rss_mb())
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    os._exit(0)


# -- orchestrating ---------------------------------------------------------------------------


def _busy_cpu_seconds() -> float:
    """CPU seconds all processes on this machine have used (all cores)."""
    import psutil

    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0))


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_job(job: str, options: list[str], timeout: float) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", job, *options]
    command += ["--timeout", str(timeout)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout + 60)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"{job}: no result within {timeout + 60:.0f}s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        return {"ok": False, "error": f"{job}: exit {done.returncode}: {tail}"}
    result: dict[str, Any] = json.loads(lines[-1][len(RESULT_PREFIX) :])
    return result


def run_measured(
    job: str, options: list[str], timeout: float, sims: list[Simulator]
) -> dict[str, Any]:
    """A measured job with the simulators' view of it: what each accepted, their CPU,
    and the CPU other processes used meanwhile."""
    for sim in sims:
        sim.reset()
    sim_cpu = {sim.kind: sim.cpu_seconds() for sim in sims}
    busy, children, wall = _busy_cpu_seconds(), _children_cpu_seconds(), time.perf_counter()
    result = run_job(job, options, timeout)
    wall = time.perf_counter() - wall
    used = {sim.kind: sim.cpu_seconds() - sim_cpu[sim.kind] for sim in sims}
    others = _busy_cpu_seconds() - busy - (_children_cpu_seconds() - children) - sum(used.values())
    result["simulators"] = {sim.kind: sim.stats() for sim in sims}
    if "seconds" in result:
        for sim in sims:
            result["simulators"][sim.kind]["cpu_percent"] = 100 * used[sim.kind] / result["seconds"]
    result["others_cpu_percent"] = max(0.0, 100 * others / wall)
    return result


SIM_OF = {"sms": "twilio", "email": "smtp"}


def verify_simulators(
    result: dict[str, Any], expected: dict[str, Any], sent: dict[str, int]
) -> list[str]:
    """Each simulator accepted exactly one message per expected recipient, in their
    language (for SMS: the body is the rendered text of that language)."""
    problems = []
    for channel, want in expected.items():
        got = result["simulators"][SIM_OF[channel]]
        if got["errors"]:
            problems.append(f"{channel}: the simulator answered {got['errors']} calls with errors")
        if got["duplicates"]:
            problems.append(f"{channel}: {got['duplicates']} recipients got more than one message")
        if got["accepted"] != sent[channel]:
            problems.append(
                f"{channel}: the simulator accepted {got['accepted']} messages, "
                f"{sent[channel]} sends were recorded"
            )
        if sent[channel] == want["count"] and got["digest"] != want["digest"]:
            problems.append(f"{channel}: the recipients are not the expected subscribers")
    return problems


def sms_languages(result: dict[str, Any], texts: dict[str, Any]) -> dict[str, int]:
    """The SMS simulator counts bodies; map each rendered text back to its language."""
    by_text = {v["text"]: lang for lang, v in texts.get("sms", {}).items()}
    counted: dict[str, int] = {}
    for body, count in result["simulators"]["twilio"]["languages"].items():
        lang = by_text.get(body, "?")
        counted[lang] = counted.get(lang, 0) + count
    return counted


def verify_broadcaster(result: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    if "channels" not in result:
        return [result.get("error", "no result")]
    problems = []
    sent = {}
    for channel, want in expected.items():
        got = result["channels"].get(channel, {"states": {}, "deliveries": 0})
        states = got["states"]
        sent[channel] = states.get("sent", 0)
        if got["deliveries"] != want["count"]:
            problems.append(f"{channel}: {got['deliveries']} deliveries, expected {want['count']}")
        if got.get("distinct_recipients", 0) != got["deliveries"]:
            problems.append(f"{channel}: a subscriber has more than one delivery")
        unsent = {s: c for s, c in states.items() if s != "sent"}
        if unsent and not result.get("bounded"):
            problems.append(f"{channel}: not every delivery is sent: {states}")
    problems += verify_simulators(result, expected, sent)
    if not result.get("bounded"):
        languages = {
            "sms": sms_languages(result, result.get("texts", {})),
            "email": result["simulators"]["smtp"]["languages"],
        }
        for channel, want in expected.items():
            if languages[channel] != want["languages"]:
                problems.append(
                    f"{channel}: languages {languages[channel]}, expected {want['languages']}"
                )
    return problems


def verify_sdk(result: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    if "channels" not in result:
        return [result.get("error", "no result")]
    problems = [f"sdk: {f}" for f in result.get("failures", [])]
    sent = {c: result["channels"][c]["sent"] for c in expected}
    for channel, want in expected.items():
        if sent[channel] != want["count"]:
            problems.append(f"sdk {channel}: {sent[channel]} sent, expected {want['count']}")
    return problems + verify_simulators(result, expected, sent)


def rates(result: dict[str, Any]) -> dict[str, float]:
    """Deliveries/s per channel (its messages sent over the time its last one was
    recorded) and overall (every message sent over the whole timed part)."""
    out = {}
    total = 0
    for channel, got in result["channels"].items():
        sent = got["states"].get("sent", 0) if "states" in got else got["sent"]
        out[channel] = sent / got["settled_s"] if got["settled_s"] else 0.0
        total += sent
    out["overall"] = total / result["seconds"]
    return out


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ordered = sorted(runs, key=lambda r: r.get("seconds", float("inf")))
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["runs_seconds"] = [round(r.get("seconds", 0.0), 2) for r in runs]
    return chosen


def timeline(samples: list[dict[str, Any]], points: int = 12) -> list[dict[str, Any]]:
    if len(samples) <= points:
        return samples
    step = (len(samples) - 1) / (points - 1)
    return [samples[round(k * step)] for k in range(points)]


def fmt_int(value: float) -> str:
    return f"{value:,.0f}"


def main() -> int:
    parser = argparse.ArgumentParser(
        description="Fan-out of one update to N subscribers by SMS and email against the "
        "local simulators; incident-broadcaster vs the bare SDKs."
    )
    parser.add_argument("-n", type=int, default=100_000, help="subscribers (default 100,000)")
    parser.add_argument(
        "--sms-concurrency", type=int, default=64, help="sms concurrency (default 64)"
    )
    parser.add_argument(
        "--smtp-connections", type=int, default=8, help="email max_connections (default 8)"
    )
    parser.add_argument(
        "--channel",
        choices=["sms", "email"],
        action="append",
        help="publish to this channel only (repeatable; default: both)",
    )
    parser.add_argument(
        "--import-rows", type=int, default=10_000, help="rows for import_csv (default 10,000)"
    )
    parser.add_argument("--repeat", type=int, default=1, help="broadcaster runs (median)")
    parser.add_argument(
        "--rss-only",
        type=int,
        metavar="N",
        help="only the broadcaster's fan-out to N subscribers (e.g. 1000000): peak RSS "
        f"against the {TARGET_RSS_MB:.0f} MB target; no baseline, no import",
    )
    parser.add_argument(
        "--send-seconds",
        type=float,
        default=None,
        help="stop sending this long after the fan-out has created every delivery "
        "(default: send everything; with --rss-only: 60; 0: send everything)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="one more broadcaster run under cProfile (the fan-out, then 30 s of sending)",
    )
    parser.add_argument("--no-baseline", action="store_true", help="skip the bare SDK run")
    parser.add_argument("--no-import", action="store_true", help="skip the import_csv run")
    parser.add_argument(
        "--timeout", type=float, default=3600, help="seconds per job (default 3600)"
    )
    parser.add_argument("--json", action="store_true", help="print a JSON line last")
    parser.add_argument(
        "--strict",
        action="store_true",
        help=f"with --rss-only: exit 2 when the peak RSS is {TARGET_RSS_MB:.0f} MB or more",
    )
    hidden = argparse.SUPPRESS
    parser.add_argument("--simulator", choices=["twilio", "smtp"], help=hidden)
    parser.add_argument("--worker", choices=["setup", "broadcaster", "sdk", "import"], help=hidden)
    parser.add_argument("--db", help=hidden)
    parser.add_argument("--texts", help=hidden)
    parser.add_argument("--twilio-port", type=int, default=0, help=hidden)
    parser.add_argument("--smtp-port", type=int, default=0, help=hidden)
    parser.add_argument("--sample-seconds", type=float, default=1.0, help=hidden)
    args = parser.parse_args()
    args.channel = args.channel or ["sms", "email"]

    if args.simulator:
        simulator_main(args.simulator)
        return 0
    if args.worker:
        worker_main(args)
        return 0

    # On SIGTERM too, unwind: workers are killed, simulators stopped, temp files removed.
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(143))
    n = args.rss_only or args.n
    rss_mode = args.rss_only is not None
    if args.send_seconds is None:
        args.send_seconds = 60.0 if rss_mode else 0.0
    load_before = os.getloadavg()[0]
    common = [
        "--sms-concurrency",
        str(args.sms_concurrency),
        "--smtp-connections",
        str(args.smtp_connections),
        *(option for channel in args.channel for option in ("--channel", channel)),
    ]
    channels = args.channel
    summary: dict[str, Any] = {
        "n": n,
        "mode": "rss" if rss_mode else "default",
        "sms_concurrency": args.sms_concurrency,
        "smtp_connections": args.smtp_connections,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    problems: list[str] = []
    with (
        tempfile.TemporaryDirectory(prefix="bench-subscribers-") as tmp,
        running_simulator("twilio") as twilio,
        running_simulator("smtp") as smtp,
    ):
        folder = Path(tmp)
        sims = [twilio, smtp]
        ports = ["--twilio-port", str(twilio.port), "--smtp-port", str(smtp.port)]
        template = folder / "template.db"
        print(f"setting up {n:,} subscribers…", flush=True)
        setup = run_job("setup", ["-n", str(n), "--db", str(template)], args.timeout)
        if not setup.get("ok"):
            print(f"  ! setup failed: {setup.get('error')}")
            return 1
        expected = {c: setup["expected"][c] for c in channels}
        summary["setup"] = {"seconds": setup["seconds"], "expected": expected}
        print(
            f"  {setup['seconds']:.1f} s (bulk SQL, not measured); the update reaches "
            + " and ".join(f"{want['count']:,} by {c}" for c, want in expected.items()),
            flush=True,
        )

        runs = []
        for k in range(args.repeat if not rss_mode else 1):
            db = folder / f"run{k}" / "broadcaster.db"
            db.parent.mkdir()
            for suffix in ("", "-wal", "-shm"):
                if Path(f"{template}{suffix}").exists():
                    shutil.copy(f"{template}{suffix}", f"{db}{suffix}")
            options = [*common, *ports, "--db", str(db)]
            if args.send_seconds:
                options += ["--send-seconds", str(args.send_seconds)]
            if rss_mode:
                options += ["--sample-seconds", "2"]
            print(f"broadcaster run {k + 1}…", flush=True)
            run = run_measured("broadcaster", options, args.timeout, sims)
            run["problems"] = verify_broadcaster(run, expected)
            runs.append(run)
            shutil.rmtree(db.parent, ignore_errors=True)
        broadcaster = median_run(runs)
        for run in runs:
            problems += run["problems"]

        sdk = None
        texts = broadcaster.get("texts")
        if not rss_mode and not args.no_baseline and texts and "channels" in broadcaster:
            texts_file = folder / "texts.json"
            texts_file.write_text(json.dumps(texts))
            print("bare SDK run…", flush=True)
            options = [*common, *ports, "--db", str(template), "--texts", str(texts_file)]
            sdk = run_measured("sdk", options, args.timeout, sims)
            sdk["problems"] = verify_sdk(sdk, expected)
            problems += sdk["problems"]

        imported = None
        if not rss_mode and not args.no_import:
            print(f"import_csv of {args.import_rows:,} rows…", flush=True)
            db = folder / "import" / "broadcaster.db"
            db.parent.mkdir()
            options = [*common, "-n", str(args.import_rows), "--db", str(db)]
            imported = run_job("import", options, args.timeout)
            if not imported.get("ok"):
                problems.append(f"import: {imported.get('error') or imported}")

        profiled = None
        if args.profile:
            db = folder / "profile" / "broadcaster.db"
            db.parent.mkdir()
            for suffix in ("", "-wal", "-shm"):
                if Path(f"{template}{suffix}").exists():
                    shutil.copy(f"{template}{suffix}", f"{db}{suffix}")
            print("profiled broadcaster run (cProfile; its figures are not used)…", flush=True)
            # Bounded (the whole fan-out, then 30 s of sending unless told otherwise): the
            # profiler doubles the run time, and the mix of work is the same throughout.
            options = [*common, *ports, "--db", str(db), "--profile"]
            options += ["--send-seconds", str(args.send_seconds or 30)]
            profiled = run_measured("broadcaster", options, args.timeout, sims)
    load_after = os.getloadavg()[0]

    # -- report --------------------------------------------------------------------------
    print()
    print(
        f"Fan-out of one update to {n:,} subscribers ({' + '.join(channels)}) — "
        f"{platform.python_implementation()} {platform.python_version()}, {os.cpu_count()} "
        f"CPUs; simulators in their own processes; sms concurrency {args.sms_concurrency}, "
        f"email {args.smtp_connections} connections"
    )
    b_rates = None
    if "channels" in broadcaster:
        b_rates = rates(broadcaster)
    s_rates = rates(sdk) if sdk and "channels" in sdk else None
    header = (
        f"{'contender':<26}{'seconds':>9}{'deliv/s':>9}{'sms/s':>8}{'email/s':>9}"
        f"{'CPU %':>7}{'CPU ms/deliv':>13}{'twilio %':>9}{'smtp %':>8}{'others %':>9}"
        f"{'peak RSS MB':>13}"
    )
    print(header)
    print("-" * len(header))
    for label, result, r in (
        ("incident-broadcaster", broadcaster, b_rates),
        ("bare SDKs", sdk, s_rates),
    ):
        if result is None:
            continue
        if r is None:
            print(f"{label:<26}  FAILED: {result.get('error')}")
            continue
        sim = result["simulators"]
        total = r["overall"] * result["seconds"]
        cpu_ms = 10 * result["cpu_percent"] * result["seconds"] / max(1, total)
        print(
            f"{label:<26}{result['seconds']:>9.1f}{fmt_int(r['overall']):>9}"
            f"{fmt_int(r['sms']) if 'sms' in r else '-':>8}"
            f"{fmt_int(r['email']) if 'email' in r else '-':>9}{result['cpu_percent']:>7.0f}"
            f"{cpu_ms:>13.2f}{sim['twilio'].get('cpu_percent', 0):>9.0f}"
            f"{sim['smtp'].get('cpu_percent', 0):>8.0f}"
            f"{result['others_cpu_percent']:>9.0f}{result['peak_rss_mb']:>13.1f}"
        )
    sizes = []
    for label, result in (("broadcaster", broadcaster), ("bare SDKs", sdk)):
        sim = (result or {}).get("simulators")
        if not sim:
            continue
        parts = []
        if "sms" in channels:
            parts.append(f"sms {sim['twilio']['bytes'] / max(1, sim['twilio']['accepted']):.0f} B")
        if "email" in channels:
            parts.append(
                f"email {sim['smtp']['bytes'] / max(1, sim['smtp']['accepted']):.0f} B over "
                f"{sim['smtp']['connections']} SMTP connections"
            )
        sizes.append(f"{label} " + ", ".join(parts))
    print("  messages at the simulators: " + "; ".join(sizes))
    ratios = {}
    if b_rates and s_rates:
        ratios = {k: b_rates[k] / s_rates[k] for k in b_rates if s_rates.get(k)}
        print("  broadcaster / bare SDKs: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    if b_rates:
        b = broadcaster
        created = ", ".join(
            f"{c} {b['channels'][c]['created_s']:.1f} s" for c in expected if c in b["channels"]
        )
        print(
            f"  broadcaster: publish() {b['publish_seconds'] * 1000:.0f} ms; every delivery "
            f"created (fan-out in batches) after: {created}; open() {b['open_seconds']:.2f} s "
            f"(not timed); RSS {b['rss_start_mb']:.0f} MB at start, {b['rss_open_mb']:.0f} MB "
            f"after open(), peak {b['peak_rss_mb']:.1f} MB"
        )
        roles = ", ".join(f"{role} {sec:.1f} s" for role, sec in b["cpu_by_thread"].items())
        print(f"  broadcaster CPU by thread: {roles}")
        if len(runs) > 1:
            print(f"  broadcaster runs (seconds): {b['runs_seconds']}")
        for channel in expected:
            got = b["channels"][channel]
            print(
                f"  {channel}: states {got['states']}; {got['attempts']:,} attempts, "
                f"{got['retried']:,} deliveries retried"
                + (f"; last errors {got['errors']}" if got["errors"] else "")
            )
        if b.get("bounded"):
            sent = sum(c["states"].get("sent", 0) for c in b["channels"].values())
            print(
                f"  bounded: every delivery was created {b['fanned_out_s']:.1f} s after "
                f"publish(); sending stopped {args.send_seconds:g} s later "
                f"(--send-seconds), with {sent:,} of "
                f"{sum(c['deliveries'] for c in b['channels'].values()):,} sent"
            )
    if rss_mode and broadcaster.get("samples"):
        print("  RSS over time (s: MB, deliveries created sms/email):")
        for sample in timeline(broadcaster["samples"]):
            created = sample["created"]
            print(
                f"    {sample['t']:>7.1f} s: {sample['rss_mb']:>6.1f} MB  "
                f"{created.get('sms', 0):>8,} / {created.get('email', 0):>8,}"
            )
    if imported is not None and imported.get("ok"):
        print(
            f"  import_csv: {args.import_rows:,} rows in {imported['seconds']:.2f} s = "
            f"{fmt_int(imported['rows_per_s'])} rows/s (CPU {imported['cpu_percent']:.0f} %, "
            f"peak RSS {imported['peak_rss_mb']:.0f} MB)"
        )
    busiest = max((r.get("others_cpu_percent", 0.0) for r in (broadcaster, sdk) if r), default=0.0)
    if busiest > 15:
        print(
            f"  note: other processes used up to {busiest:.0f}% CPU (100% = one core) during "
            "the runs — the figures are lower than on an idle machine"
        )
    peak = broadcaster.get("peak_rss_mb")
    rss_ok = None
    if peak is not None:
        rss_ok = peak < TARGET_RSS_MB
        mark = "PASS" if rss_ok else "MISS"
        print(f"  peak RSS {peak:.1f} MB at N = {n:,}: target < {TARGET_RSS_MB:.0f} MB: {mark}")
    if profiled is not None and profiled.get("profile"):
        print()
        print(
            "Profile (cProfile; a separate run: the fan-out, then "
            f"{args.send_seconds or 30:g} s of sending):"
        )
        print(profiled["profile"])
    for problem in problems:
        print(f"  ! {problem}")

    if args.json:

        def slim(result: dict[str, Any] | None) -> dict[str, Any] | None:
            if result is None:
                return None
            return {k: v for k, v in result.items() if k not in ("texts", "profile")}

        summary.update(
            load_average=[round(load_before, 2), round(load_after, 2)],
            broadcaster_per_s=b_rates,
            sdk_per_s=s_rates,
            ratios=ratios,
            peak_rss_mb=peak,
            target_rss_mb=TARGET_RSS_MB,
            rss_ok=rss_ok,
            import_rows_per_s=imported.get("rows_per_s") if imported else None,
            problems=problems,
            results={"broadcaster": slim(broadcaster), "sdk": slim(sdk), "import": imported},
        )
        print(json.dumps(summary))
    if problems:
        return 1
    if args.strict and rss_mode and not rss_ok:
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
