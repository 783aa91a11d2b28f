"""The procrastinate backend's jobs, what they run on in a worker, and how they are deferred.

- `fanout(update_id)`, deferred in the publish's own transaction: the channels without
  a fan-out are handed to deliver jobs at once, then every running subscriber fan-out is
  advanced (a batch of each channel in turn) and each batch handed out as it is made.
- `assign(channel)`: a channel's due deliveries that no job has go to new `deliver` jobs
  of `workers.batch` each, in the transaction that names the job on each delivery; what
  comes due later (quiet hours) gets an `assign` scheduled at that time.
- `deliver(channel, ids)`: takes its deliveries a channel's `concurrency` at a time,
  sends them through the shared rate limits and settles them. Those to try again stay
  its own, and `DeliveryRetry` runs it again at their next attempt (never before the
  provider's Retry-After). A job killed with its worker is run again by `retry_stalled`
  and takes back what it had in flight: only those deliveries can go out twice.
- `broken(channel)`: while a channel is broken, every 30 s, re-routes what its fallback
  can take; once it works again, hands its deliveries out again.
- `reminders_due`, scheduled at each reminder's due time, and `sweep`, every minute:
  fire due reminders under the store's scheduler lease (one firing at a time, as in
  embedded mode). `sweep` also advances fan-outs and hands out deliveries no live job
  has, and requeues what a job that will not run again left `sending`.
- `retry_stalled` and `cleanup` run periodically.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import procrastinate
from procrastinate.exceptions import AlreadyEnqueued, UniqueViolation
from procrastinate.jobs import Job, Status
from sqlalchemy import Connection
from sqlalchemy.util import await_only

from broadcaster.config import WorkerSettings
from broadcaster.dispatch.backend import SCHEDULER_LEASE, FireDue, fire_as_scheduler
from broadcaster.dispatch.dispatcher import FANOUT_BATCH, BrokenHook
from broadcaster.dispatch.sender import Ready, Sender, Sent, settle_surely
from broadcaster.errors import TransientError
from broadcaster.models import DeliveryState, Reminder
from broadcaster.store import Claimed, DeliveryQueue, Outcome, Store
from broadcaster.store.jobs import JobDeliveries, RateLog
from broadcaster.store.queue import QuietWindow, new_holder_id
from broadcaster.store.reminders import Wanted
from broadcaster.store.tables import utcnow
from channels.base import Channel

log = logging.getLogger("broadcaster.dispatch")

CONTROL_QUEUE = "broadcaster"
BROKEN_RECHECK_SECONDS = 30.0  # a broken channel is looked at again this often
SCHEDULER_BUSY_SECONDS = 2.0  # another worker fires reminders: look again after this
LOCKED_RETRY_SECONDS = 1.0  # a deliver job that could take none of its due deliveries
AGAIN_SECONDS = 5.0  # a job that could not reach the store defers itself this much later
ASSIGN_LIMIT = 5000  # deliveries handed to jobs per transaction
RATE_LOG_KEPT = timedelta(days=1)  # longer than any rate limit's window


def deliver_queue(channel: str) -> str:
    """Each channel's deliver jobs have a queue of their own."""
    return f"deliver.{channel}"


class RunAgainAt(Exception):
    """The job has more to do at `at` (deliveries to try again, a busy scheduler);
    `error` is the adapter's latest transient error, when that is why."""

    def __init__(self, at: datetime, error: Exception | None = None) -> None:
        super().__init__(f"run again at {at.isoformat()}")
        self.at = at
        self.error = error


class DeliveryRetry(procrastinate.BaseRetryStrategy):
    """When a job runs again: at `RunAgainAt.at`, never before the provider's Retry-After
    carried by the adapter's `TransientError`; after any other failure (the store
    briefly gone), after a backoff capped at a minute, for as long as it takes (how
    often a delivery is tried is its channel's `max_attempts` and deadline, kept with
    the delivery; nothing is dropped because the store was down)."""

    def get_retry_decision(
        self, *, exception: BaseException, job: Job
    ) -> procrastinate.RetryDecision | None:
        if isinstance(exception, RunAgainAt):
            at = exception.at
            error = exception.error
            if isinstance(error, TransientError) and error.retry_after:
                at = max(at, utcnow() + timedelta(seconds=error.retry_after))
            return procrastinate.RetryDecision(retry_at=at)
        return procrastinate.RetryDecision(retry_in={"seconds": min(60, 2 ** min(job.attempts, 6))})


jobs = procrastinate.Blueprint()
_RETRY = DeliveryRetry()


def _runtime(context: procrastinate.JobContext) -> WorkerRuntime:
    runtime = (context.additional_context or {}).get("runtime")
    if not isinstance(runtime, WorkerRuntime):
        raise RuntimeError("broadcaster jobs run in `broadcaster worker`")
    return runtime


def _job_id(context: procrastinate.JobContext) -> int:
    if context.job.id is None:  # procrastinate runs stored jobs only
        raise RuntimeError("a job without an id")
    return context.job.id


@jobs.task(name="broadcaster.fanout", queue=CONTROL_QUEUE, pass_context=True, retry=_RETRY)
async def fanout(context: procrastinate.JobContext, update_id: int) -> None:
    """Hand an update's deliveries to jobs, its subscriber fan-outs as they are made."""
    await _runtime(context).fanout()


# Jobs deferred with a queueing lock are never retried by procrastinate: a retry puts
# the job back in `todo`, which fails while another job with its lock waits there.
# They defer a fresh job of theirs instead (`Deferrer._once`); the lock keeps it single.


@jobs.task(name="broadcaster.assign", queue=CONTROL_QUEUE, pass_context=True)
async def assign(context: procrastinate.JobContext, channel: str, due: str = "now") -> None:
    """Hand a channel's due deliveries that no job has to deliver jobs."""
    runtime = _runtime(context)
    try:
        await runtime.assign(channel)
    except Exception:  # the store is busy or briefly gone
        log.exception("could not hand out %s's deliveries; trying again", channel)
        await runtime.deferrer.assign(channel, utcnow() + timedelta(seconds=AGAIN_SECONDS))


@jobs.task(name="broadcaster.deliver", pass_context=True, retry=_RETRY)
async def deliver(context: procrastinate.JobContext, channel: str, ids: list[int]) -> None:
    """Send a batch of one channel's deliveries."""
    await _runtime(context).deliver(_job_id(context), channel, ids)


@jobs.task(name="broadcaster.broken", queue=CONTROL_QUEUE, pass_context=True)
async def broken(context: procrastinate.JobContext, channel: str) -> None:
    """Look after a broken channel until it works again."""
    runtime = _runtime(context)
    try:
        healthy = await runtime.look_after_broken(channel)
    except Exception:  # the store is busy or briefly gone
        log.exception("could not look after broken channel %s; trying again", channel)
        healthy = False
    if not healthy:
        await runtime.deferrer.broken(channel, utcnow() + timedelta(seconds=BROKEN_RECHECK_SECONDS))


@jobs.task(name="broadcaster.reminders_due", queue=CONTROL_QUEUE, pass_context=True)
async def reminders_due(
    context: procrastinate.JobContext, incident_id: int, kind: str, due_at: str
) -> None:
    """Fire the reminders due now (this one among them); when another worker is firing,
    look again shortly (it may have fetched its list before this one came due)."""
    runtime = _runtime(context)
    try:
        fired = await runtime.fire_reminders()
    except Exception:  # the store is busy or briefly gone
        log.exception("could not fire reminders; trying again")
        fired = False
    if not fired:
        again = utcnow() + timedelta(seconds=SCHEDULER_BUSY_SECONDS)
        await runtime.deferrer.reminder(incident_id, kind, datetime.fromisoformat(due_at), again)


@jobs.task(name="broadcaster.sweep", queue=CONTROL_QUEUE, pass_context=True, retry=_RETRY)
async def sweep(context: procrastinate.JobContext, timestamp: int) -> None:
    """Every minute, what a deferral lost with its process would have done."""
    await _runtime(context).sweep()


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
        try:
            await manager.retry_job(job)
        except UniqueViolation:
            # A job of the same queueing lock waits already and does the same work.
            assert job.id is not None
            await manager.finish_job_by_id_async(job.id, Status.FAILED, delete_job=False)


@jobs.task(name="broadcaster.cleanup", queue=CONTROL_QUEUE, pass_context=True)
async def cleanup(context: procrastinate.JobContext, timestamp: int) -> None:
    """Forget finished jobs after `workers.keep_jobs_hours` (deliveries keep their own
    record), and old rate-limit reservations."""
    runtime = _runtime(context)
    await context.app.job_manager.delete_old_jobs(
        nb_hours=runtime.workers.keep_jobs_hours,
        include_failed=True,
        include_cancelled=True,
        include_aborted=True,
    )
    await RateLog(runtime.store).forget(RATE_LOG_KEPT)


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
            deferrer = self._reminder(incident_id, wanted.kind.value, wanted.due_at, raw)
            # A savepoint: the same reminder already scheduled must not abort the publish.
            with conn.begin_nested() as savepoint:
                try:
                    await_only(deferrer)
                except AlreadyEnqueued:
                    savepoint.rollback()

    def _reminder(
        self,
        incident_id: int,
        kind: str,
        due_at: datetime,
        connection: Any = None,
        at: datetime | None = None,
    ) -> Awaitable[int]:
        """A reminder's job at its due time (or `at`); one per (incident, kind, due)."""
        deferred: Awaitable[int] = (
            self._task("reminders_due")
            .configure(
                connection=connection,
                schedule_at=at or due_at,
                queueing_lock=f"reminder:{incident_id}:{kind}:{due_at.isoformat()}",
            )
            .defer_async(incident_id=incident_id, kind=kind, due_at=due_at.isoformat())
        )
        return deferred

    async def reminder(self, incident_id: int, kind: str, due_at: datetime, at: datetime) -> None:
        """The job of one reminder again, at `at`."""
        with contextlib.suppress(AlreadyEnqueued):
            await self._reminder(incident_id, kind, due_at, at=at)

    async def reminders(self, reminders: list[Reminder]) -> None:
        """Jobs for reminders stored outside a publish (a cancel restores promises)."""
        for r in reminders:
            with contextlib.suppress(AlreadyEnqueued):
                await self._reminder(r.incident_id, r.kind.value, r.due_at)

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

    async def _once(self, name: str, lock: str, at: datetime | None, **kwargs: Any) -> None:
        """Defer a job unless one with this queueing lock is waiting."""
        with contextlib.suppress(AlreadyEnqueued):
            await (
                self._task(name).configure(schedule_at=at, queueing_lock=lock).defer_async(**kwargs)
            )

    async def assign(self, channel: str, at: datetime | None = None) -> None:
        """An `assign` job for the channel, now or at `at`."""
        due = at.isoformat() if at is not None else "now"
        await self._once("assign", f"assign:{channel}:{due}", at, channel=channel, due=due)

    async def broken(self, channel: str, at: datetime | None = None) -> None:
        """The `broken` job of a channel, now or at `at`."""
        await self._once("broken", f"broken:{channel}", at, channel=channel)


@dataclass
class WorkerRuntime:
    """What the jobs of one worker process use: its channels, its sender, the store."""

    store: Store
    channels: Mapping[str, Channel]
    workers: WorkerSettings
    deferrer: Deferrer
    sender: Sender
    fire_due: FireDue
    lease_seconds: float
    on_broken: BrokenHook | None = None
    quiet: QuietWindow | None = None
    # Set as the worker stops: deliver jobs take nothing more and hand the rest back.
    stopping: bool = False
    holder: str = field(default_factory=new_holder_id)

    def __post_init__(self) -> None:
        self.queue = DeliveryQueue(self.store)
        self.owned = JobDeliveries(self.store)

    def stop(self) -> None:
        """The worker stops: running deliver jobs finish their sends and hand back the
        rest (they run again elsewhere at once)."""
        self.stopping = True

    async def fire_reminders(self) -> bool:
        """Fire due reminders under the store's scheduler lease, as the embedded backend
        does, then let it go for the next job; whether this worker could fire."""
        try:
            return await fire_as_scheduler(self.queue, self.holder, self.fire_due)
        finally:
            with contextlib.suppress(Exception):
                await self.queue.release_lease(SCHEDULER_LEASE, self.holder)

    async def sweep(self) -> None:
        await self.fire_reminders()
        await self.advance_fanouts()
        for name in self.channels:
            await self.owned.requeue_orphans(name)
            await self.assign(name, recover=True)

    async def fanout(self) -> None:
        # Team channels, webhooks, the status page first: they need no fan-out.
        for name, channel in self.channels.items():
            if channel.address_kind is None:
                await self.assign(name)
        await self.advance_fanouts()

    async def advance_fanouts(self) -> None:
        """A batch of each subscriber channel's running fan-out in turn, each handed to
        deliver jobs as it is made, until none runs."""
        running = {n for n, c in self.channels.items() if c.address_kind is not None}
        while running:
            for name in sorted(running):
                broken = await self.queue.is_broken(name)
                reroute = self.sender.fallbacks.get(name) if broken else None
                stepped, still = await self.queue.fanout_step(
                    name,
                    FANOUT_BATCH,
                    quiet=self.quiet,
                    reroute=reroute,
                    reason=f"{name} is broken",
                )
                if stepped:
                    await self.assign(reroute.fallback if reroute is not None else name)
                if not still:
                    running.discard(name)
                    await self.assign(name)

    async def assign(self, channel: str, *, recover: bool = False) -> None:
        if await self.queue.is_broken(channel):
            await self.deferrer.broken(channel)  # its own job looks after it
            return
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
        if channel is None or await self.queue.is_broken(channel_name):
            # Removed from the config, or broken: its deliveries wait without a job
            # (the channel's `broken` job, or the next worker configured with it).
            await self.owned.release(job_id)
            if channel is not None:
                await self.deferrer.broken(channel_name)
            return
        outcomes: list[Outcome] = []
        finished: set[tuple[int, str]] = set()  # threads whose delivery settled
        errors: list[Exception] = []
        found_broken: str | None = None
        took = 0
        while found_broken is None and not self.stopping:
            claimed = await self.owned.take(
                job_id, ids, limit=channel.concurrency, lease_seconds=self.lease_seconds
            )
            took += len(claimed)
            if not claimed:
                break
            sent = await self._send(channel, claimed)
            taken = [s.outcome for s in sent]
            await settle_surely(self.queue, taken)
            outcomes += taken
            errors += [s.error for s in sent if s.error is not None]
            found_broken = next((s.broken for s in sent if s.broken is not None), None)
            settled = {o.id for o in taken if not o.state.is_pending}
            finished |= {c.thread for c in claimed if c.id in settled}
            if len(claimed) < channel.concurrency:
                break  # it had no more due: spare the empty take
        for fallback in {o.reroute.fallback for o in outcomes if o.reroute is not None}:
            await self.deferrer.assign(fallback)
        if found_broken is not None:
            await self._found_broken(channel_name, found_broken)
            await self.owned.release(job_id)
            return
        if await self.owned.followups_waiting(channel_name, finished):
            # A follow-up waited for one of these posts (its thread): it may go now.
            await self.deferrer.assign(channel_name)
        pending = await self.owned.still_queued(job_id)
        if pending is not None:
            if not took:  # due, yet locked by another transaction: not again at once
                pending = max(pending, utcnow() + timedelta(seconds=LOCKED_RETRY_SECONDS))
            raise RunAgainAt(pending, errors[-1] if errors else None)

    async def _send(self, channel: Channel, claimed: list[Claimed]) -> list[Sent]:
        ready, settled = await self.sender.prepare(channel, claimed)
        slots = asyncio.Semaphore(channel.concurrency)
        broken: str | None = None

        async def one(item: Ready) -> Sent:
            nonlocal broken
            async with slots:
                if broken is not None:  # found broken meanwhile: back, this try uncounted
                    back = Outcome(item.claimed.id, DeliveryState.QUEUED, uncount_attempt=True)
                    return Sent(back)
                sent = await self.sender.send(channel, item)
                broken = broken or sent.broken
                return sent

        return [Sent(o) for o in settled] + list(await asyncio.gather(*map(one, ready)))

    async def _found_broken(self, channel: str, reason: str) -> None:
        log.error(
            "%s: channel broken, its deliveries stay queued: %s",
            channel,
            reason,
            extra={"channel": channel, "outcome": "broken"},
        )
        first = await self.queue.mark_broken(channel, reason)
        await self.deferrer.broken(channel)
        if first and self.on_broken is not None:
            await self.on_broken(channel, reason)

    async def look_after_broken(self, channel: str) -> bool:
        """While broken: what the fallback reaches goes there (see
        Dispatcher._while_broken). Once marked healthy (a worker started, or `retry`):
        its deliveries are handed out again. Whether it is healthy (or gone)."""
        if channel not in self.channels:
            return True
        if not await self.queue.is_broken(channel):
            await self.assign(channel)
            return True
        reroute = self.sender.fallbacks.get(channel)
        if reroute is not None:
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
                await self.assign(reroute.fallback)
        return False
