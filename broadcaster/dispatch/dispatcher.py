"""In-process workers that drive deliveries to a final state.

One loop per channel claims due deliveries (at most the channel's concurrency at a time)
and sends each in its own task, through the channel's rate limits. Outcomes are written
back in batches by one writer. A delivery's slot is freed only once its outcome is
committed, so a killed process can re-send at most `concurrency` deliveries per channel.

A subscriber channel with a fallback hands the fallback what it cannot send: a delivery
that fails permanently (in the transaction that fails it), and, once the channel is found
broken, everything queued on it that the fallback can reach (`_while_broken`).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from broadcaster.config import DispatchSettings
from broadcaster.dispatch.ratelimit import Limiters, RateLimiters
from broadcaster.dispatch.sender import SEND_TIMEOUT_SECONDS, Ready, Sender, settle_surely
from broadcaster.models import ChannelRender, DeliveryState
from broadcaster.store import Claimed, DeliveryQueue, Outcome, Store
from broadcaster.store.queue import QuietWindow
from channels.base import Channel

log = logging.getLogger("broadcaster.dispatch")

BROKEN_RECHECK_SECONDS = 2.0
BrokenHook = Callable[[str, str], Awaitable[None]]
REROUTE_SWEEP_SECONDS = 30.0  # a broken channel's queue is looked through at least this often
FANOUT_BATCH = 2000  # subscribers turned into deliveries per transaction


@dataclass
class _ChannelState:
    unsettled: int = 0
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    broken: str | None = None
    # Claimed by a publish in this process, waiting for a free slot (see `take`).
    handed: deque[Claimed] = field(default_factory=deque)
    # The queue may hold due deliveries: claim before sleeping. Handing deliveries over
    # does not set it, so a publish that hands its deliveries costs no claim.
    look: bool = True
    # Broken with a fallback: queued deliveries may be waiting to be re-routed.
    reroute: bool = False
    # Found broken, with a fallback: not marked in the store until its fan-outs are done
    # and its queue re-routed, so `wait` keeps waiting for what the fallback takes.
    unmarked: bool = False
    swept_at: float = 0.0  # loop time of the last look through a broken channel's queue


class Dispatcher:
    """Sends queued deliveries of the given channels until stopped."""

    def __init__(
        self,
        store: Store,
        channels: Mapping[str, Channel],
        settings: DispatchSettings,
        *,
        quiet: QuietWindow | None = None,
        on_broken: BrokenHook | None = None,
        limiters: Limiters | None = None,
    ) -> None:
        """`on_broken(channel, reason)` is run (in the background) when a channel is
        found broken: the core tells the team. `limiters` default to in-process ones."""
        self.store = store
        self.queue = DeliveryQueue(store)
        self.on_broken = on_broken
        self.channels = dict(channels)
        self.settings = settings
        self.quiet = quiet
        self.sender = Sender(store, self.channels, limiters or RateLimiters())
        self.fallbacks = self.sender.fallbacks
        self._states = {name: _ChannelState() for name in self.channels}
        self._outcomes: asyncio.Queue[tuple[str, Outcome, str | None]] = asyncio.Queue()
        self._sends: set[asyncio.Task[None]] = set()
        self._running = False
        self._stopping = False

    def remember_renders(self, update_id: int, renders: Mapping[str, ChannelRender]) -> None:
        """An update's renders, handed over by the process that just published it."""
        self.sender.remember_renders(update_id, renders)

    @property
    def accepting(self) -> bool:
        """Running and not stopping: deliveries handed over now will be sent."""
        return self._running and not self._stopping

    def take(self, claimed: list[Claimed]) -> None:
        """Deliveries a publish in this process stored already claimed for us: sent as
        slots free up, before anything claimed from the queue."""
        for item in claimed:
            state = self._states[item.channel]
            state.handed.append(item)
            state.wake.set()

    def wake(self) -> None:
        """Look at the queue now (a publish or retry happened in this process)."""
        for state in self._states.values():
            state.look = True
            state.wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Dispatch until `stop` is set, then finish what is in flight and return."""
        started: list[Channel] = []
        writer: asyncio.Task[None] | None = None
        loops: list[asyncio.Task[None]] = []
        try:
            for channel in self.channels.values():
                await channel.start()
                started.append(channel)
            writer = asyncio.create_task(self._write_outcomes(), name="outcome-writer")
            loops = [
                asyncio.create_task(self._channel_loop(channel), name=f"channel:{name}")
                for name, channel in self.channels.items()
            ]
            self._running = True
            await stop.wait()
        finally:
            self._stopping = True
            self.wake()
            await asyncio.gather(*loops, return_exceptions=True)
            self._release_handed()
            if self._sends:
                await asyncio.wait(self._sends, timeout=SEND_TIMEOUT_SECONDS)
            if writer is not None:  # without it, outcomes wait for a future dispatcher
                await self._outcomes.join()
            if writer is not None:
                writer.cancel()
                await asyncio.gather(writer, return_exceptions=True)
            for channel in started:
                await channel.close()

    def _release_handed(self) -> None:
        """Handed deliveries never started go back to the queue (this try uncounted)."""
        for name, state in self._states.items():
            while state.handed:
                item = state.handed.popleft()
                state.unsettled += 1  # settled by the writer like any outcome
                release = Outcome(item.id, DeliveryState.QUEUED, uncount_attempt=True)
                self._outcomes.put_nowait((name, release, None))

    async def _channel_loop(self, channel: Channel) -> None:
        state = self._states[channel.name]
        while not self._stopping:
            state.wake.clear()
            free = channel.concurrency - state.unsettled
            if state.handed and free > 0:
                batch = [state.handed.popleft() for _ in range(min(free, len(state.handed)))]
                state.unsettled += len(batch)
                await self._start_sends(channel, batch)
                continue
            if state.broken is not None:
                if state.unmarked or await self.queue.is_broken(channel.name):
                    await self._while_broken(channel, state)
                    continue
                log.warning(
                    "%s: marked healthy again, resuming",
                    channel.name,
                    extra={"channel": channel.name, "outcome": "resumed"},
                )
                state.broken = None
            free = channel.concurrency - state.unsettled
            if state.unsettled and free < channel.concurrency / 2:
                # Busy: claim again when half the slots are free, so claims (each a
                # write transaction) stay large instead of one per settled batch.
                await self._sleep(state, self.settings.poll_seconds)
                continue
            if not state.look:  # woken for handed deliveries or a settle only
                await self._sleep(state, self.settings.poll_seconds)
                continue
            state.look = False
            fanning = False
            try:
                if channel.address_kind is not None:  # subscribers: create the next batch
                    fanning = await self.queue.advance_fanout(
                        channel.name, FANOUT_BATCH, quiet=self.quiet
                    )
                claimed = await self.queue.claim(
                    channel.name, free, self.settings.sending_lease_seconds
                )
            except Exception:  # the store is busy or briefly gone: look again later
                log.exception(
                    "%s: could not claim deliveries; retrying",
                    channel.name,
                    extra={"channel": channel.name},
                )
                state.look = True
                await self._sleep(state, BROKEN_RECHECK_SECONDS)
                continue
            if claimed:
                state.unsettled += len(claimed)
                await self._start_sends(channel, claimed)
            if len(claimed) < free and not fanning:  # nothing more is due now
                await self._sleep(state, self.settings.poll_seconds)
            else:
                state.look = True  # a full claim, or a fan-out going on: more may be due

    async def _while_broken(self, channel: Channel, state: _ChannelState) -> None:
        """A broken channel sends nothing. With a fallback, its fan-outs go on and what
        is queued on it is re-routed now, not once it works again: an SMS account
        suspended mid-outage must not leave subscribers who also have email waiting.
        Whoever the fallback cannot reach stays queued here. The channel is marked
        broken in the store once its running fan-outs are done and re-routed."""
        reroute = self.fallbacks.get(channel.name)
        if reroute is None or state.broken is None:
            await self._sleep(state, BROKEN_RECHECK_SECONDS)
            return
        running = False
        reason = f"{channel.name} is broken"
        try:
            # A fan-out batch goes to the fallback as it is created.
            stepped, running = await self.queue.fanout_step(
                channel.name, FANOUT_BATCH, quiet=self.quiet, reroute=reroute, reason=reason
            )
            if stepped:
                self._look_at(reroute.fallback)
            now = asyncio.get_running_loop().time()
            # Looking through the whole queue costs a scan of it: when the channel was
            # found broken or outcomes came back to it since, and now and then for what
            # other processes queued (their publishes' fan-outs are taken above).
            if state.reroute or now - state.swept_at >= REROUTE_SWEEP_SECONDS:
                state.reroute = False
                state.swept_at = now
                moved = await self.queue.reroute_queued(reroute, reason=reason, batch=FANOUT_BATCH)
                if moved:
                    log.warning(
                        "%s: broken, %d deliveries re-routed to %s",
                        channel.name,
                        moved,
                        reroute.fallback,
                        extra={"channel": channel.name, "outcome": "rerouted"},
                    )
                    self._look_at(reroute.fallback)
            if state.unmarked and not running:
                await self.queue.mark_broken(channel.name, state.broken)
                state.unmarked = False
        except Exception:  # the store is busy or briefly gone: look again later
            log.exception(
                "%s: could not re-route deliveries; retrying",
                channel.name,
                extra={"channel": channel.name},
            )
            state.reroute = True
            running = False
        if not running:
            await self._sleep(state, BROKEN_RECHECK_SECONDS)

    def _look_at(self, name: str) -> None:
        """Deliveries were queued on channel `name` by this process: claim them now."""
        state = self._states.get(name)
        if state is not None:
            state.look = True
            state.wake.set()

    async def _sleep(self, state: _ChannelState, seconds: float) -> None:
        """Until woken, or `seconds`; then the queue is looked at again in any case."""
        try:
            await asyncio.wait_for(state.wake.wait(), timeout=seconds)
        except TimeoutError:
            state.look = True

    async def _start_sends(self, channel: Channel, claimed: list[Claimed]) -> None:
        ready, settled = await self.sender.prepare(channel, claimed)
        for outcome in settled:
            self._outcomes.put_nowait((channel.name, outcome, None))
        for item in ready:
            task = asyncio.create_task(self._send(channel, item))
            self._sends.add(task)
            task.add_done_callback(self._sends.discard)

    async def _send(self, channel: Channel, item: Ready) -> None:
        sent = await self.sender.send(channel, item)
        self._outcomes.put_nowait((channel.name, sent.outcome, sent.broken))

    async def _write_outcomes(self) -> None:
        while True:
            batch = [await self._outcomes.get()]
            while len(batch) < self.settings.flush_batch and not self._outcomes.empty():
                batch.append(self._outcomes.get_nowait())
            await self._settle(batch)
            for _ in batch:
                self._outcomes.task_done()

    async def _settle(self, batch: list[tuple[str, Outcome, str | None]]) -> None:
        await settle_surely(self.queue, [outcome for _, outcome, _ in batch])
        for name, outcome, broken in batch:
            state = self._states[name]
            state.unsettled -= 1
            if outcome.reroute is not None:
                self._look_at(outcome.reroute.fallback)
            if broken is not None or state.broken is not None:
                state.reroute = True  # something may be queued here that the fallback takes
            if broken is not None and state.broken is None:
                state.broken = broken
                fallback = self.fallbacks.get(name)
                log.error(
                    "%s: channel broken, its deliveries stay queued%s: %s",
                    name,
                    f" (those {fallback.fallback} reaches are re-routed there)" if fallback else "",
                    broken,
                    extra={"channel": name, "outcome": "broken"},
                )
                if fallback is not None:
                    state.unmarked = True  # marked by _while_broken, once re-routed
                else:
                    await self.queue.mark_broken(name, broken)
                if self.on_broken is not None:
                    # In the background: telling the team must not hold up the outcomes.
                    told = asyncio.ensure_future(self.on_broken(name, broken))
                    self._sends.add(told)
                    told.add_done_callback(self._sends.discard)
            state.wake.set()
