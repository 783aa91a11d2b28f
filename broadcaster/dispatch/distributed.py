"""The procrastinate backend: jobs in the store's PostgreSQL database, run by any number
of `broadcaster worker` processes on any number of nodes (the jobs: `tasks.py`).

A process that publishes (CLI, `serve`) defers jobs and watches; `work()` runs them.
Each channel has its own queue and, in each worker process, its own procrastinate worker
with its own slots: a slow provider fills only its own (procrastinate alone fetches by
priority then id across the queues a worker listens to, so one slow channel's backlog
would hold up the rest).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import procrastinate
from procrastinate.schema import SchemaManager
from sqlalchemy import Connection, text

from broadcaster.config import WorkerSettings
from broadcaster.dispatch.backend import DispatchBackend, FireDue, Predicate, Tick, quiet_window
from broadcaster.dispatch.dispatcher import BrokenHook
from broadcaster.dispatch.ratelimit import SharedRateLimiters
from broadcaster.dispatch.sender import Sender
from broadcaster.dispatch.tasks import (
    CONTROL_QUEUE,
    Deferrer,
    WorkerRuntime,
    deliver_queue,
    jobs,
)
from broadcaster.models import ChannelRender
from broadcaster.store import Claimed, DeliveryQueue, Store
from broadcaster.store.reminders import ReminderStore, Wanted
from broadcaster.store.store import InTransaction
from channels.base import Channel

if TYPE_CHECKING:
    from broadcaster.config import Settings

log = logging.getLogger("broadcaster.dispatch")

SWEEP_CRON = "* * * * *"
CLEANUP_CRON = "17 * * * *"
WATCH_SECONDS = 0.2
WORKERS_LOOK_SECONDS = 2.0  # a watcher looks for live workers after this
RESTART_MAX_SECONDS = 30.0  # a worker that stopped by itself is started again, backing off


def build_app(conninfo: str, workers: WorkerSettings, queues: int) -> procrastinate.App:
    """The procrastinate app on the store's database, with our jobs and periodic tasks;
    its pool has room for each of the `queues` workers' heartbeat and fetch at once."""
    app = procrastinate.App(
        connector=procrastinate.PsycopgConnector(
            conninfo=conninfo, min_size=1, max_size=queues + 3
        ),
    )
    app.add_tasks_from(jobs, namespace="")
    app.periodic(cron=SWEEP_CRON, periodic_id="sweep")(app.tasks["broadcaster.sweep"])
    app.periodic(cron=CLEANUP_CRON, periodic_id="cleanup")(app.tasks["broadcaster.cleanup"])
    app.periodic(cron=f"* * * * * */{workers.retry_stalled_every}", periodic_id="stalled")(
        app.tasks["broadcaster.retry_stalled"]
    )
    return app


def libpq_url(store_url: str) -> str:
    """The store's SQLAlchemy URL as psycopg takes it."""
    return store_url.replace("postgresql+psycopg://", "postgresql://", 1)


async def apply_schema(store_url: str) -> bool:
    """Create procrastinate's tables in the store's database unless they are there;
    whether it did. Nodes starting together take turns (an advisory lock)."""
    import psycopg

    connect = psycopg.AsyncConnection.connect(libpq_url(store_url))
    async with await connect as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('procrastinate schema'))")
        cursor = await conn.execute("SELECT to_regclass('procrastinate_jobs') IS NOT NULL")
        row = await cursor.fetchone()
        if row is not None and row[0]:
            return False
        await conn.execute(SchemaManager.get_schema())
    return True


async def supervise(name: str, run: Callable[[], Awaitable[None]]) -> None:
    """Run one procrastinate worker until cancelled. procrastinate stops a worker when
    one of its side tasks fails (a heartbeat lost in a short database outage): it is
    started again, backing off up to RESTART_MAX_SECONDS, instead of leaving its queue
    without a worker (every node would meet the same outage)."""
    loop = asyncio.get_running_loop()
    delay = 1.0
    while True:
        started = loop.time()
        try:
            await run()
            log.error("worker %s stopped; starting it again in %.0f s", name, delay)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("worker %s failed; starting it again in %.0f s", name, delay)
        if loop.time() - started > 10 * RESTART_MAX_SECONDS:
            delay = 1.0  # it had run a good while: this is a new outage
        await asyncio.sleep(delay)
        delay = min(delay * 2, RESTART_MAX_SECONDS)


async def run_together(runs: list[Awaitable[None]], on_stop: Callable[[], None]) -> None:
    """Run workers until cancelled; then call `on_stop`, stop each worker exactly once
    and wait for all. (`asyncio.gather` returns as soon as the first one stopped, before
    the others' running jobs are done; a second cancel would cut a graceful stop short.)"""
    tasks = [asyncio.ensure_future(r) for r in runs]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        on_stop()
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]


class ProcrastinateBackend(DispatchBackend):
    """Deliveries and reminders as procrastinate jobs, run by `broadcaster worker`s.

    A process that publishes (CLI, `serve`) only defers jobs and watches."""

    def __init__(
        self,
        store: Store,
        channels: Mapping[str, Channel],
        settings: Settings,
        *,
        on_broken: BrokenHook | None = None,
    ) -> None:
        self.store = store
        self.channels = channels
        self.settings = settings
        self.workers = settings.workers
        self.on_broken = on_broken
        self.app = build_app(
            libpq_url(settings.store_url), settings.workers, queues=len(channels) + 1
        )
        self.deferrer = Deferrer(self.app)
        self._opened = False
        self._created_schema = False
        self._later: set[asyncio.Task[None]] = set()

    async def open(self) -> None:
        if not self._opened:
            self._created_schema = await apply_schema(self.settings.store_url)
            await self.app.open_async()
            self._opened = True

    async def upgrade(self) -> bool:
        """Create the job tables if they are missing (`broadcaster db upgrade`); whether
        they were made by this process (as it opened, or now)."""
        return await apply_schema(self.settings.store_url) or self._created_schema

    async def close(self) -> None:
        if self._later:
            await asyncio.gather(*self._later, return_exceptions=True)
        if self._opened:
            await self.app.close_async()
            self._opened = False

    def in_publish(self, reminders: list[Wanted]) -> InTransaction:
        """The hook a publish runs in its transaction (see `PublishPlan.in_transaction`)."""

        def hook(conn: Connection, update_id: int, incident_id: int) -> None:
            self.deferrer.in_transaction(conn, update_id, incident_id, reminders)

        return hook

    def _soon(self, work: Callable[[], Awaitable[None]]) -> None:
        async def run() -> None:
            try:
                await work()
            except Exception:  # the sweep hands it out within a minute
                log.exception("could not defer jobs; the next sweep will")

        task = asyncio.get_running_loop().create_task(run())
        self._later.add(task)
        task.add_done_callback(self._later.discard)

    def published(
        self,
        update_id: int | None = None,
        renders: Mapping[str, ChannelRender] | None = None,
        claimed: list[Claimed] | None = None,
    ) -> None:
        if update_id is not None:
            return  # its fan-out job was deferred in the publish's transaction

        async def assign_all() -> None:
            for name in self.channels:
                await self.deferrer.assign(name)

        self._soon(assign_all)

    def reminders_stored(self) -> None:
        async def schedule() -> None:
            await self.deferrer.reminders(await ReminderStore(self.store).upcoming(limit=1000))

        self._soon(schedule)

    async def workers_alive(self) -> int:
        """`broadcaster worker` processes that beat within `workers.stalled_seconds` (each
        runs one procrastinate worker per channel, plus one)."""
        async with self.store.sessions() as session:
            beating = await session.scalar(
                text(
                    "SELECT count(*) FROM procrastinate_workers "
                    "WHERE last_heartbeat > now() - make_interval(secs => :seconds)"
                ),
                {"seconds": self.workers.stalled_seconds},
            )
        return -(-int(beating or 0) // (len(self.channels) + 1))

    async def problem(self) -> tuple[str | None, str]:
        alive = await self.workers_alive()
        if not alive:
            return (
                "no `broadcaster worker` is running on this store: nothing is sent until one "
                "starts",
                "procrastinate",
            )
        return None, f"procrastinate: {alive} `broadcaster worker` process(es) running"

    async def run_reminders(self, fire_due: FireDue, stop: asyncio.Event) -> None:
        """Workers fire reminders (their jobs): a `serve` has nothing to run."""
        await stop.wait()

    async def drive(self, until: Predicate, on_tick: Tick | None = None) -> None:
        """Workers send: watch until `until()`, saying so when no worker runs."""
        loop = asyncio.get_running_loop()
        warned, looked = False, loop.time()
        while not await until():
            if on_tick is not None:
                await on_tick(False)
            if not warned and loop.time() - looked > WORKERS_LOOK_SECONDS:
                looked = loop.time()
                reason, _ = await self.problem()
                if reason is not None:
                    log.warning("%s", reason)
                    warned = True
            await asyncio.sleep(WATCH_SECONDS)

    async def work(self, fire_due: FireDue, *, concurrency: int | None = None) -> None:
        """Run this process's workers until cancelled: one on the control queue (fan-outs,
        assignments, reminders, periodic tasks), and one per channel on its own queue.

        Cancelled (SIGTERM), deliver jobs take nothing more, settle what they have in
        flight and hand the rest back to run elsewhere; a job still running after half
        of `stalled_seconds` is aborted (to run again elsewhere), so that no other worker
        takes it for a dead one's while it still sends."""
        queue = DeliveryQueue(self.store)
        # A worker starting tries every channel again: a secret may have been fixed.
        await queue.mark_healthy(list(self.channels))
        runtime = WorkerRuntime(
            store=self.store,
            channels=self.channels,
            workers=self.workers,
            deferrer=self.deferrer,
            sender=Sender(self.store, self.channels, SharedRateLimiters(self.store)),
            fire_due=fire_due,
            lease_seconds=self.settings.dispatch.sending_lease_seconds,
            on_broken=self.on_broken,
            quiet=quiet_window(self.settings),
        )
        options: dict[str, Any] = {
            "additional_context": {"runtime": runtime},
            "install_signal_handlers": False,
            "update_heartbeat_interval": self.workers.heartbeat_seconds,
            "stalled_worker_timeout": self.workers.stalled_seconds,
            "shutdown_graceful_timeout": self.workers.stalled_seconds / 2,
            "delete_jobs": "successful",
        }
        queues = {"control": ([CONTROL_QUEUE], 4, True)} | {
            name: ([deliver_queue(name)], concurrency or self.workers.concurrency, False)
            for name in self.channels
        }

        def worker(name: str) -> Callable[[], Awaitable[None]]:
            names, slots, listens = queues[name]
            return lambda: self.app.run_worker_async(
                queues=names,
                concurrency=slots,
                name=f"broadcaster-{name}",
                listen_notify=listens,
                fetch_job_polling_interval=self.workers.poll_seconds,
                **options,
            )

        started = []
        try:
            for channel in self.channels.values():
                await channel.start()
                started.append(channel)
            await run_together([supervise(name, worker(name)) for name in queues], runtime.stop)
        finally:
            for channel in started:
                with contextlib.suppress(Exception):
                    await channel.close()
