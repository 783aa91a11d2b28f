"""The procrastinate backend: jobs in the store's PostgreSQL database, run by any number
of `broadcaster worker` processes on any number of nodes.

The jobs:

- `fanout(update_id)` is deferred in the publish's own transaction (procrastinate's
  `connection=` option on our psycopg connection). It advances the subscriber fan-outs
  (deliveries created in batches) and hands what is due to deliver jobs.
- `assign(channel)` hands a channel's due deliveries that no job has yet to new
  `deliver` jobs of `workers.batch` each, in the transaction that names the job on each
  delivery (`deliveries.job_id`). What comes due later (quiet hours) gets an `assign`
  scheduled at that time.
- `deliver(channel, ids)` takes its deliveries, sends them through the shared rate
  limits and settles them. Those to try again stay its own: `DeliveryRetry` runs the job
  again at their next attempt, which honours the provider's Retry-After. A job killed
  with its worker is run again by `retry_stalled` and takes back what it had in flight:
  at most those deliveries go out twice, with the same Idempotency-Key.
- `reminders_due` is scheduled at each promised update's reminder (a queueing lock per
  incident, kind and due time); `sweep`, every minute, fires what a lost deferral missed
  and hands out deliveries no job has.
- `retry_stalled` and `remove_old_jobs` run periodically.

Each channel has its own queue, and in each worker its own procrastinate worker with its
own slots: a slow provider fills only its own (procrastinate alone would fetch by
priority then id across queues, so one slow channel's backlog would hold up the rest).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import procrastinate
from procrastinate.exceptions import AlreadyEnqueued
from procrastinate.jobs import Job
from procrastinate.schema import SchemaManager
from sqlalchemy import Connection, text
from sqlalchemy.util import await_only

from broadcaster.config import WorkerSettings
from broadcaster.dispatch.backend import (
    DispatchBackend,
    FireDue,
    Predicate,
    Tick,
    quiet_window,
)
from broadcaster.dispatch.dispatcher import FANOUT_BATCH, BrokenHook
from broadcaster.dispatch.ratelimit import SharedRateLimiters
from broadcaster.dispatch.sender import Ready, Sender
from broadcaster.models import ChannelRender, DeliveryState, Reminder
from broadcaster.store import Claimed, DeliveryQueue, Outcome, Store
from broadcaster.store.jobs import JobDeliveries
from broadcaster.store.queue import QuietWindow
from broadcaster.store.reminders import Wanted
from broadcaster.store.tables import utcnow
from channels.base import Channel

if TYPE_CHECKING:
    from broadcaster.config import Settings

log = logging.getLogger("broadcaster.dispatch")

CONTROL_QUEUE = "broadcaster"
BROKEN_RETRY_SECONDS = 30.0  # a broken channel's deliver jobs look again this often
ASSIGN_LIMIT = 5000  # deliveries handed to jobs per transaction
MAX_JOB_ATTEMPTS = 1000  # a job failing for another reason than its deliveries
SWEEP_CRON = "* * * * *"
CLEANUP_CRON = "17 * * * *"
WATCH_SECONDS = 0.2
WORKERS_LOOK_SECONDS = 2.0  # a watcher looks for live workers after this
FireReminders = FireDue


def deliver_queue(channel: str) -> str:
    """Each channel's deliver jobs have a queue of their own."""
    return f"deliver.{channel}"


class DeliveriesPending(Exception):
    """Deliveries of a deliver job are queued again, to be tried at `retry_at` (their
    next attempt; a broken channel's, when it is looked at again)."""

    def __init__(self, retry_at: datetime, retry_after: float | None = None) -> None:
        super().__init__(f"deliveries to try again at {retry_at.isoformat()}")
        self.retry_at = retry_at
        self.retry_after = retry_after


class DeliveryRetry(procrastinate.BaseRetryStrategy):
    """Runs a deliver job again when its deliveries are due again, never before a
    provider's Retry-After; any other failure (the store briefly gone) after a capped
    backoff. How often a delivery is tried is its channel's `max_attempts` and deadline,
    kept with the delivery."""

    def get_retry_decision(
        self, *, exception: BaseException, job: Job
    ) -> procrastinate.RetryDecision | None:
        if isinstance(exception, DeliveriesPending):
            at = exception.retry_at
            if exception.retry_after:
                at = max(at, utcnow() + timedelta(seconds=exception.retry_after))
            return procrastinate.RetryDecision(retry_at=at)
        if job.attempts >= MAX_JOB_ATTEMPTS:
            return None
        return procrastinate.RetryDecision(retry_in={"seconds": min(60, 2**job.attempts)})


jobs = procrastinate.Blueprint()
_RETRY = DeliveryRetry()


def _runtime(context: procrastinate.JobContext) -> WorkerRuntime:
    runtime = (context.additional_context or {}).get("runtime")
    if not isinstance(runtime, WorkerRuntime):
        raise RuntimeError("broadcaster jobs run in `broadcaster worker`")
    return runtime


@jobs.task(name="broadcaster.fanout", queue=CONTROL_QUEUE, pass_context=True, retry=_RETRY)
async def fanout(context: procrastinate.JobContext, update_id: int) -> None:
    """Create an update's subscriber deliveries and hand everything due to jobs."""
    await _runtime(context).fanout(update_id)


@jobs.task(name="broadcaster.assign", queue=CONTROL_QUEUE, pass_context=True, retry=_RETRY)
async def assign(
    context: procrastinate.JobContext, channel: str, due: str = "now", recover: bool = False
) -> None:
    """Hand a channel's due deliveries that no job has to deliver jobs (with `recover`,
    also those queued again after their job ended: a retry)."""
    await _runtime(context).assign(channel, recover=recover)


@jobs.task(name="broadcaster.deliver", pass_context=True, retry=_RETRY)
async def deliver(context: procrastinate.JobContext, channel: str, ids: list[int]) -> None:
    """Send a batch of one channel's deliveries."""
    job_id = context.job.id
    if job_id is None:  # procrastinate always runs a stored job
        raise RuntimeError("a deliver job without an id")
    await _runtime(context).deliver(job_id, channel, ids)


@jobs.task(
    name="broadcaster.reminders_due",
    queue=CONTROL_QUEUE,
    pass_context=True,
    lock="broadcaster.scheduler",
    retry=_RETRY,
)
async def reminders_due(
    context: procrastinate.JobContext, incident_id: int, kind: str, due_at: str
) -> None:
    """Fire the reminders due now (this one among them)."""
    await _runtime(context).fire_reminders()


@jobs.task(
    name="broadcaster.sweep", queue=CONTROL_QUEUE, pass_context=True, lock="broadcaster.scheduler"
)
async def sweep(context: procrastinate.JobContext, timestamp: int) -> None:
    """Every minute: fire due reminders and hand out due deliveries that no job has
    (a process died between its commit and a deferral made after it)."""
    runtime = _runtime(context)
    await runtime.fire_reminders()
    for name in runtime.channels:
        await runtime.assign(name, recover=True)


@jobs.task(name="broadcaster.retry_stalled", queue=CONTROL_QUEUE, pass_context=True)
async def retry_stalled(context: procrastinate.JobContext, timestamp: int) -> None:
    """Run again the jobs of workers that stopped beating (killed, or their node died)."""
    runtime = _runtime(context)
    manager = context.app.job_manager
    stalled = await manager.get_stalled_jobs(
        seconds_since_heartbeat=runtime.workers.stalled_seconds
    )
    for job in stalled:
        log.warning("running job %s again: its worker stopped", job.call_string)
        await manager.retry_job(job)


@jobs.task(name="broadcaster.cleanup", queue=CONTROL_QUEUE, pass_context=True)
async def cleanup(context: procrastinate.JobContext, timestamp: int) -> None:
    """Forget finished jobs after `workers.keep_jobs_hours` (deliveries keep their own
    record)."""
    hours = _runtime(context).workers.keep_jobs_hours
    await context.app.job_manager.delete_old_jobs(
        nb_hours=hours, include_failed=True, include_cancelled=True, include_aborted=True
    )


def build_app(conninfo: str, workers: WorkerSettings) -> procrastinate.App:
    """The procrastinate app on the store's database, with our jobs and periodic tasks."""
    app = procrastinate.App(
        connector=procrastinate.PsycopgConnector(conninfo=conninfo, min_size=1, max_size=4),
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


class Deferrer:
    """Defers our jobs, on a transaction's connection or on the app's pool."""

    def __init__(self, app: procrastinate.App) -> None:
        self.app = app

    def _task(self, name: str) -> Any:
        return self.app.tasks[f"broadcaster.{name}"]

    def in_transaction(
        self, conn: Connection, update_id: int, incident_id: int, reminders: list[Wanted]
    ) -> None:
        """From the publish's transaction (synchronous SQLAlchemy, on psycopg 3): its
        fan-out job and its reminders' jobs commit with the update or not at all."""
        raw = conn.connection.driver_connection
        await_only(self._task("fanout").configure(connection=raw).defer_async(update_id=update_id))
        for wanted in reminders:
            self.reminder_on(conn, incident_id, wanted.kind.value, wanted.due_at)

    def reminder_on(self, conn: Connection, incident_id: int, kind: str, due_at: datetime) -> None:
        """A reminder's job at its due time; one per (incident, kind, due time)."""
        raw = conn.connection.driver_connection
        deferrer = self._task("reminders_due").configure(
            connection=raw,
            schedule_at=due_at,
            queueing_lock=f"reminder:{incident_id}:{kind}:{due_at.isoformat()}",
        )
        # A savepoint: the same reminder already scheduled must not abort the publish.
        with conn.begin_nested() as savepoint:
            try:
                await_only(
                    deferrer.defer_async(
                        incident_id=incident_id, kind=kind, due_at=due_at.isoformat()
                    )
                )
            except AlreadyEnqueued:
                savepoint.rollback()

    async def reminders(self, reminders: list[Reminder]) -> None:
        """Jobs for reminders stored outside a publish (a cancel restores promises)."""
        for reminder in reminders:
            with contextlib.suppress(AlreadyEnqueued):
                await (
                    self._task("reminders_due")
                    .configure(
                        schedule_at=reminder.due_at,
                        queueing_lock=(
                            f"reminder:{reminder.incident_id}:{reminder.kind.value}:"
                            f"{reminder.due_at.isoformat()}"
                        ),
                    )
                    .defer_async(
                        incident_id=reminder.incident_id,
                        kind=reminder.kind.value,
                        due_at=reminder.due_at.isoformat(),
                    )
                )

    def deliver_batches(
        self, conn: Connection, channel: str, batches: list[list[int]]
    ) -> list[int]:
        """Deliver jobs for these batches, on the assigning transaction's connection."""
        raw = conn.connection.driver_connection
        deferrer = self._task("deliver").configure(connection=raw, queue=deliver_queue(channel))
        job_ids: list[int] = await_only(
            deferrer.batch_defer_async(*({"channel": channel, "ids": ids} for ids in batches))
        )
        return job_ids

    async def assign(
        self, channel: str, at: datetime | None = None, *, recover: bool = False
    ) -> None:
        """An `assign` job for the channel, now or at `at`; none when one is waiting."""
        due = at.isoformat() if at is not None else "now"
        lock = f"assign:{channel}:{due}" + (":recover" if recover else "")
        with contextlib.suppress(AlreadyEnqueued):
            await (
                self._task("assign")
                .configure(schedule_at=at, queueing_lock=lock)
                .defer_async(channel=channel, due=due, recover=recover)
            )


@dataclass
class WorkerRuntime:
    """What the jobs of one worker process use: its channels, its sender, the store."""

    store: Store
    channels: Mapping[str, Channel]
    workers: WorkerSettings
    deferrer: Deferrer
    sender: Sender
    fire_due: FireReminders
    lease_seconds: float
    on_broken: BrokenHook | None = None
    quiet: QuietWindow | None = None

    def __post_init__(self) -> None:
        self.queue = DeliveryQueue(self.store)
        self.owned = JobDeliveries(self.store)

    async def fire_reminders(self) -> None:
        async def always() -> bool:  # the job's lock keeps it to one worker at a time
            return True

        await self.fire_due(always)

    async def fanout(self, update_id: int) -> None:
        for name, channel in self.channels.items():
            if channel.address_kind is None:
                continue
            running = True
            while running:
                reroute = None
                if await self.queue.is_broken(name):
                    reroute = self.sender.fallbacks.get(name)
                stepped, running = await self.queue.fanout_step(
                    name,
                    FANOUT_BATCH,
                    quiet=self.quiet,
                    reroute=reroute,
                    reason=f"{name} is broken",
                )
                if stepped:
                    # Sending starts while the rest of the fan-out is being created.
                    await self.assign(name)
                    if reroute is not None:
                        await self.assign(reroute.fallback)
        for name in self.channels:
            await self.assign(name)

    async def assign(self, channel: str, *, recover: bool = False) -> None:
        while True:
            given = await self.owned.assign(
                channel,
                batch=self.workers.batch,
                limit=ASSIGN_LIMIT,
                defer=self.deferrer.deliver_batches,
                recover=recover,
            )
            if given < ASSIGN_LIMIT:
                break
        later = await self.owned.next_due(channel)
        if later is not None:
            await self.deferrer.assign(channel, later)

    async def deliver(self, job_id: int, channel_name: str, ids: list[int]) -> None:
        channel = self.channels.get(channel_name)
        if channel is None:
            log.error("deliver job for channel %s, which is no longer configured", channel_name)
            raise DeliveriesPending(utcnow() + timedelta(seconds=BROKEN_RETRY_SECONDS))
        if await self.queue.is_broken(channel_name):
            await self._while_broken(channel_name)
            pending = await self.owned.still_queued(job_id)
            if pending is not None:
                raise DeliveriesPending(utcnow() + timedelta(seconds=BROKEN_RETRY_SECONDS))
            return
        outcomes: list[Outcome] = []
        finished: set[tuple[int, str]] = set()  # threads whose delivery settled
        broken: str | None = None
        while broken is None:
            claimed = await self.owned.take(
                job_id, ids, limit=channel.concurrency, lease_seconds=self.lease_seconds
            )
            if not claimed:
                break
            taken, broken = await self._send(channel, claimed)
            await self.queue.settle(taken)
            outcomes += taken
            settled = {o.id for o in taken if not o.state.is_pending}
            finished |= {c.thread for c in claimed if c.id in settled}
        rerouted = {o.reroute.fallback for o in outcomes if o.reroute is not None}
        for fallback in rerouted:
            await self.deferrer.assign(fallback)
        if broken is not None:
            await self._found_broken(channel_name, broken)
        if await self.owned.followups_waiting(channel_name, finished):
            # A follow-up waited for one of these posts (its thread): it may go now.
            await self.deferrer.assign(channel_name)
        pending = await self.owned.still_queued(job_id)
        if pending is not None:
            retry_at = pending
            if broken is not None:
                retry_at = utcnow() + timedelta(seconds=BROKEN_RETRY_SECONDS)
            raise DeliveriesPending(retry_at)

    async def _send(
        self, channel: Channel, claimed: list[Claimed]
    ) -> tuple[list[Outcome], str | None]:
        ready, outcomes = await self.sender.prepare(channel, claimed)
        slots = asyncio.Semaphore(channel.concurrency)
        broken: str | None = None

        async def one(item: Ready) -> Outcome:
            nonlocal broken
            async with slots:
                if broken is not None:  # found broken meanwhile: back, this try uncounted
                    return Outcome(item.claimed.id, DeliveryState.QUEUED, uncount_attempt=True)
                outcome, reason = await self.sender.send(channel, item)
                broken = broken or reason
                return outcome

        outcomes += await asyncio.gather(*(one(item) for item in ready))
        return outcomes, broken

    async def _found_broken(self, channel: str, reason: str) -> None:
        first = not await self.queue.is_broken(channel)
        log.error(
            "%s: channel broken, its deliveries stay queued: %s",
            channel,
            reason,
            extra={"channel": channel, "outcome": "broken"},
        )
        await self._while_broken(channel)
        await self.queue.mark_broken(channel, reason)
        if first and self.on_broken is not None:
            await self.on_broken(channel, reason)

    async def _while_broken(self, channel: str) -> None:
        """What the fallback can reach goes there now (see Dispatcher._while_broken)."""
        reroute = self.sender.fallbacks.get(channel)
        if reroute is None:
            return
        moved = await self.queue.reroute_queued(
            reroute, reason=f"{channel} is broken", batch=FANOUT_BATCH
        )
        if moved:
            log.warning(
                "%s: broken, %d deliveries re-routed to %s",
                channel,
                moved,
                reroute.fallback,
                extra={"channel": channel, "outcome": "rerouted"},
            )
            await self.deferrer.assign(reroute.fallback)


async def run_together(coroutines: list[Coroutine[Any, Any, None]]) -> None:
    """Run procrastinate workers until one stops or this is cancelled; then stop each
    exactly once and wait for all. (`asyncio.gather` would return as soon as the first
    one stopped, before the others' running jobs were done; a second cancel would cut
    a worker's graceful shutdown short.)"""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
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
        self.app = build_app(libpq_url(settings.store_url), settings.workers)
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

    def in_publish(self, reminders: list[Wanted]) -> Any:
        """The hook a publish runs in its transaction (see `PublishPlan.in_transaction`)."""

        def hook(conn: Connection, update_id: int, incident_id: int) -> None:
            self.deferrer.in_transaction(conn, update_id, incident_id, reminders)

        return hook

    def _soon(self, work: Any) -> None:
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
                await self.deferrer.assign(name, recover=True)

        self._soon(assign_all)

    def reminders_stored(self) -> None:
        async def schedule() -> None:
            from broadcaster.store.reminders import ReminderStore

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
        assignments, reminders, periodic tasks), and one per channel on its own queue."""
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
        started = []
        try:
            for channel in self.channels.values():
                await channel.start()
                started.append(channel)
            context = {"runtime": runtime}
            common: dict[str, Any] = {
                "additional_context": context,
                "install_signal_handlers": False,
                "update_heartbeat_interval": self.workers.heartbeat_seconds,
                "stalled_worker_timeout": self.workers.stalled_seconds,
                "delete_jobs": "successful",
            }
            workers = [
                self.app.run_worker_async(
                    queues=[CONTROL_QUEUE],
                    concurrency=4,
                    name="broadcaster-control",
                    **common,
                )
            ]
            workers += [
                self.app.run_worker_async(
                    queues=[deliver_queue(name)],
                    concurrency=concurrency or self.workers.concurrency,
                    name=f"broadcaster-{name}",
                    listen_notify=False,
                    fetch_job_polling_interval=self.workers.poll_seconds,
                    **common,
                )
                for name in self.channels
            ]
            await run_together(workers)
        finally:
            for channel in started:
                with contextlib.suppress(Exception):
                    await channel.close()
