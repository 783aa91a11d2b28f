"""The one small interface between the core and whatever drives deliveries.

The embedded backend (default) runs the `Dispatcher` in this process while it holds the
store's dispatcher lease; a process that cannot get the lease (a `serve` has it) only
watches. A distributed backend implements the same two calls on its task engine.

Reminders (broadcaster/scheduler.py) are due times stored with the update that promised
them; *when* they fire is the backend's too: `reminders_stored` after a publish stored
some, and `run_reminders` for as long as `serve` runs. The embedded backend looks at the
store about once a second while it holds the scheduler lease; a task engine would defer
a job per reminder at its due time instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping

from broadcaster.config import DispatchSettings, Settings
from broadcaster.dispatch.dispatcher import BrokenHook, Dispatcher
from broadcaster.models import ChannelRender
from broadcaster.store import Claimed, DeliveryQueue, Store
from broadcaster.store.queue import QuietWindow, new_holder_id
from broadcaster.store.reminders import Wanted
from broadcaster.store.store import InTransaction
from channels.base import Channel

log = logging.getLogger("broadcaster.dispatch")

DISPATCHER_LEASE = "dispatcher"
SCHEDULER_LEASE = "scheduler"
# Renewed before each reminder; long enough to outlast one slow team message (30 s), so a
# second process never fires a reminder this one is still firing. A dead process on this
# host is taken over at once; on another host, after this.
SCHEDULER_LEASE_SECONDS = 90.0
REMINDER_LOOK_SECONDS = 1.0
Predicate = Callable[[], Awaitable[bool]]
Tick = Callable[[bool], Awaitable[None]]
StillMine = Callable[[], Awaitable[bool]]
FireDue = Callable[[StillMine], Awaitable[object]]


async def fire_as_scheduler(queue: DeliveryQueue, holder: str, fire_due: FireDue) -> bool:
    """Fire due reminders if `holder` holds (or now takes) the store's scheduler lease,
    renewed before each reminder; whether it does. One process fires at a time."""

    async def still_mine() -> bool:
        return await queue.acquire_lease(SCHEDULER_LEASE, holder, SCHEDULER_LEASE_SECONDS)

    holds = await still_mine()
    if holds:
        await fire_due(still_mine)
    return holds


def quiet_window(settings: Settings) -> QuietWindow | None:
    """Quiet hours (subscribers.quiet_hours) as the fan-out applies them; subscribers who
    set no time zone are in the config's."""
    quiet = settings.subscribers.quiet_hours
    if quiet is None:
        return None
    return QuietWindow(start=quiet.start, end=quiet.end, default_timezone=settings.timezone)


class DispatchBackend(ABC):
    """Drives stored deliveries to a final state."""

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Get ready before the first publish (a task engine's tables and connections)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Finish what this process still has to hand over (deferrals)."""

    async def problem(self) -> tuple[str | None, str]:
        """Why nothing would be sent now (None: no reason), and what drives deliveries."""
        return None, "embedded: the publishing command, `dispatch` or a running `serve` sends"

    def in_publish(self, reminders: list[Wanted]) -> InTransaction | None:
        """Work a publish does in its own transaction (a task engine defers its jobs)."""
        return None

    def claim_lease(self) -> float | None:
        """How long a publish may lease a new incident's deliveries to this process's
        dispatcher (stored `sending`, handed over by `published`); None: not now."""
        return None

    @abstractmethod
    def published(
        self,
        update_id: int | None = None,
        renders: Mapping[str, ChannelRender] | None = None,
        claimed: list[Claimed] | None = None,
    ) -> None:
        """Deliveries were just stored by this process: look at them now. With the
        update's renders per channel, they need not be read back from the store;
        `claimed` are deliveries stored already claimed (see `claim_lease`)."""

    def reminders_stored(self) -> None:  # noqa: B027 - optional hook
        """A publish stored reminders: a backend that keeps its own timers sets them."""

    @abstractmethod
    async def run_reminders(self, fire_due: FireDue, stop: asyncio.Event) -> None:
        """Call `fire_due(still_mine)` when reminders may be due, until `stop` is set;
        in one place at a time across every process on the store (`still_mine()` says
        whether this place still is the one, before each reminder)."""

    @abstractmethod
    async def drive(self, until: Predicate, on_tick: Tick | None = None) -> None:
        """Dispatch (or watch, when another process dispatches) until `until()` is true.

        `on_tick(dispatching)` is awaited between looks, for progress displays.
        """


class EmbeddedBackend(DispatchBackend):
    """In-process asyncio workers, one dispatcher per store at a time (by lease)."""

    def __init__(
        self,
        store: Store,
        channels: Mapping[str, Channel],
        settings: DispatchSettings,
        *,
        quiet: QuietWindow | None = None,
        tick_seconds: float = 0.2,
        on_broken: BrokenHook | None = None,
    ) -> None:
        """`quiet` hours hold non-critical updates to subscribers inside them."""
        self.store = store
        self.queue = DeliveryQueue(store)
        self.channels = channels
        self.settings = settings
        self.quiet = quiet
        self.tick_seconds = tick_seconds
        self.on_broken = on_broken
        self.holder = new_holder_id()
        self._dispatcher: Dispatcher | None = None
        # One drive at a time per process: its dispatcher owns the channels' sessions.
        self._driving = asyncio.Lock()
        self._reminders = asyncio.Event()

    def claim_lease(self) -> float | None:
        running = self._dispatcher is not None and self._dispatcher.accepting
        return self.settings.sending_lease_seconds if running else None

    def published(
        self,
        update_id: int | None = None,
        renders: Mapping[str, ChannelRender] | None = None,
        claimed: list[Claimed] | None = None,
    ) -> None:
        dispatcher = self._dispatcher
        if dispatcher is not None and update_id is not None and renders:
            dispatcher.remember_renders(update_id, renders)
        if claimed and (dispatcher is None or not dispatcher.accepting):
            # It stopped while the publish was being stored: the next dispatcher of
            # this store resumes every `sending` delivery as it starts.
            log.info(
                "%d deliveries claimed as dispatch stopped; resumed at its next start", len(claimed)
            )
        elif claimed and dispatcher is not None:
            dispatcher.take(claimed)
        elif dispatcher is not None:
            dispatcher.wake()

    def reminders_stored(self) -> None:
        self._reminders.set()

    async def fire_if_holder(self, fire_due: FireDue) -> bool:
        """Fire due reminders if this process holds (or now takes) the scheduler lease;
        whether it does."""
        return await fire_as_scheduler(self.queue, self.holder, fire_due)

    async def run_reminders(self, fire_due: FireDue, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self._reminders.clear()
            try:
                await self.fire_if_holder(fire_due)
            except Exception:  # the store is busy or briefly gone: look again soon
                log.exception("could not fire due reminders; retrying")
            waits = [
                asyncio.ensure_future(stop.wait()),
                asyncio.ensure_future(self._reminders.wait()),
            ]
            await asyncio.wait(
                waits, timeout=REMINDER_LOOK_SECONDS, return_when=asyncio.FIRST_COMPLETED
            )
            for waiter in waits:
                waiter.cancel()

    async def drive(self, until: Predicate, on_tick: Tick | None = None) -> None:
        # This process may already be driving (a `serve` running, or an earlier waiter
        # winding down): wait alongside it, and take over if it ends first.
        while self._driving.locked():
            if await until():
                return
            if on_tick is not None:
                await on_tick(self._dispatcher is not None)
            await asyncio.sleep(self.tick_seconds)
        async with self._driving:
            await self._drive(until, on_tick)

    async def _drive(self, until: Predicate, on_tick: Tick | None) -> None:
        stop = asyncio.Event()
        running: asyncio.Task[None] | None = None
        renew_every = self.settings.lease_seconds / 3
        loop = asyncio.get_running_loop()
        renewed_at = 0.0
        try:
            while True:
                if running is not None and running.done():
                    running.result()  # a crashed dispatcher is an error, not a silent watch
                if loop.time() - renewed_at >= renew_every:
                    holds = await self.queue.acquire_lease(
                        DISPATCHER_LEASE, self.holder, self.settings.lease_seconds
                    )
                    renewed_at = loop.time()
                    if holds and running is None:
                        # We alone dispatch this store now: whatever is `sending` was
                        # left by a process that died mid-send.
                        resumed = await self.queue.resume_sending(everything=True)
                        if resumed:
                            log.warning("resuming %d deliveries left in flight", resumed)
                        # A new dispatcher tries every channel again: a secret may have
                        # been fixed since one was found broken.
                        await self.queue.mark_healthy(list(self.channels))
                        stop = asyncio.Event()
                        self._dispatcher = Dispatcher(
                            self.store,
                            self.channels,
                            self.settings,
                            quiet=self.quiet,
                            on_broken=self.on_broken,
                        )
                        running = asyncio.create_task(self._dispatcher.run(stop))
                    elif holds:
                        # A send stuck past its lease (a hung task) is sent again.
                        await self.queue.resume_sending(everything=False)
                    elif running is not None:
                        log.warning("lost the dispatcher lease; only watching now")
                        stop.set()
                        await running
                        running, self._dispatcher = None, None
                if await until():
                    break
                if on_tick is not None:
                    await on_tick(running is not None)
                await asyncio.sleep(self.tick_seconds)
        finally:
            if running is not None:
                stop.set()
                with contextlib.suppress(Exception):
                    await running
                self._dispatcher = None
            with contextlib.suppress(Exception):
                await self.queue.release_lease(DISPATCHER_LEASE, self.holder)
