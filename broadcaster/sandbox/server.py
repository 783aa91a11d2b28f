"""What every provider simulator shares: an aiohttp app on 127.0.0.1 (an ephemeral port
by default), run in the caller's event loop (`async with`) or on a thread of its own
(`with`, `start_in_thread`) for code under test that runs its own loop or process; the
failures a test scripts (`FailureScript`), the calls the simulator saw (`CallLog`), and
the bits of HTTP they all speak (request parameters, Retry-After, a dropped connection)."""

from __future__ import annotations

import asyncio
import ssl
import threading
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import Any, ClassVar, Generic, Protocol, Self, TypeVar

from aiohttp import web


class Repeatable(Protocol):
    """A scripted answer that applies to its next `times` calls (None: every call)."""

    @property
    def times(self) -> int | None: ...


F = TypeVar("F", bound=Repeatable)
C = TypeVar("C")


class _Step(Generic[F]):
    __slots__ = ("failure", "remaining")

    def __init__(self, failure: F) -> None:
        self.failure = failure
        self.remaining = failure.times


class FailureScript(Generic[F]):
    """Scripted failures (or any scripted answers) per key — a method, an operation, a
    target — used in order: each applies to its next `times` matching calls, then the
    next one takes over; `times=None` applies to every matching call from then on.

    Safe from any thread: the simulator may run on a thread of its own while a test
    scripts it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._steps: dict[str, deque[_Step[F]]] = {}

    def add(self, key: str, *failures: F) -> None:
        """Append failures to the script of `key`."""
        with self._lock:
            self._steps.setdefault(key, deque()).extend(_steps(failures))

    def replace(self, key: str, *failures: F) -> None:
        """Make these failures the whole script of `key`."""
        with self._lock:
            self._steps[key] = deque(_steps(failures))

    def next(self, key: str, matches: Callable[[F], bool] | None = None) -> F | None:
        """The failure for the next call of `key`, counted against its `times`, or None.

        With `matches`, failures that do not apply to this call are passed over and
        keep their place for the calls they do apply to."""
        with self._lock:
            for step in self._steps.get(key, ()):
                if matches is None or matches(step.failure):
                    break
            else:
                return None
            if step.remaining is not None:
                step.remaining -= 1
                if step.remaining <= 0:
                    self._steps[key].remove(step)
            return step.failure

    def clear(self) -> None:
        """Forget every script."""
        with self._lock:
            self._steps.clear()


def _steps(failures: tuple[F, ...]) -> list[_Step[F]]:
    # A failure for fewer than one call never applies.
    return [_Step(f) for f in failures if f.times is None or f.times >= 1]


class CallLog(Generic[C]):
    """What a simulator saw, oldest first; recorded and read safely from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: list[C] = []

    def record(self, entry: C) -> None:
        with self._lock:
            self._entries.append(entry)

    def snapshot(self) -> list[C]:
        """Every entry so far, oldest first (a copy)."""
        with self._lock:
            return list(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


class SimulatorServer(ABC):
    """Start, stop and address one simulator; subclasses provide `_app()`."""

    what: ClassVar[str] = "the simulator"  # for error messages
    # Stopping must not wait for a request scripted to be slow.
    stop_grace_seconds: ClassVar[float] = 0.5

    def __init__(
        self, *, host: str = "127.0.0.1", port: int = 0, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        self._host, self._port = host, port
        self._ssl = ssl_context  # set: it serves https (a test's certificate)
        self._runner: web.AppRunner | None = None
        self._url: str | None = None
        self._thread: threading.Thread | None = None
        self._thread_loop: asyncio.AbstractEventLoop | None = None

    @abstractmethod
    def _app(self) -> web.Application:
        """The routes of the provider's API."""

    async def start(self) -> None:
        """Listen on host:port (port 0: an ephemeral port, see `url`)."""
        if self._runner is not None:
            raise RuntimeError(f"{self.what} is already running")
        # No access log: a simulator must keep up with thousands of requests a second.
        runner = web.AppRunner(
            self._app(),
            access_log=None,
            handle_signals=False,
            shutdown_timeout=self.stop_grace_seconds,
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, self._host, self._port, ssl_context=self._ssl).start()
        except BaseException:
            await runner.cleanup()
            raise
        host, port = runner.addresses[0][:2]
        scheme = "https" if self._ssl is not None else "http"
        self._runner, self._url = runner, f"{scheme}://{host}:{port}"

    async def stop(self) -> None:
        """Close the listening socket and any open connection."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def start_in_thread(self) -> None:
        """Run the server on its own event loop in a background thread; returns once it
        listens (or raises why not)."""
        if self._thread is not None:
            raise RuntimeError(f"{self.what} already runs in a thread")
        loop = asyncio.new_event_loop()
        started = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.start())
            except BaseException as exc:
                failure.append(exc)
                started.set()
                loop.close()
                return
            started.set()
            try:
                loop.run_forever()
            finally:
                loop.close()

        thread = threading.Thread(target=run, name=type(self).__name__, daemon=True)
        thread.start()
        started.wait()
        if failure:
            thread.join()
            raise failure[0]
        self._thread, self._thread_loop = thread, loop

    def stop_thread(self, timeout: float = 10.0) -> None:
        """Stop a server started with `start_in_thread` and wait for its thread."""
        thread, loop = self._thread, self._thread_loop
        if thread is None or loop is None:
            return
        asyncio.run_coroutine_threadsafe(self.stop(), loop).result(timeout)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        self._thread = self._thread_loop = None

    def __enter__(self) -> Self:
        self.start_in_thread()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_thread()

    @property
    def url(self) -> str:
        """The base URL, e.g. http://127.0.0.1:43123 (once started)."""
        if self._url is None:
            raise RuntimeError(f"{self.what} is not started: call start() first")
        return self._url


class ScriptedSimulator(SimulatorServer, Generic[F, C]):
    """A simulator that records every call (`calls`) and fails the ones a test scripts;
    subclasses record into `_calls`, script `_failures`, and forget their own state in
    `_forget()`."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(host=host, port=port)
        self._calls: CallLog[C] = CallLog()
        self._failures: FailureScript[F] = FailureScript()

    @property
    def calls(self) -> list[C]:
        """Every call, oldest first (a snapshot)."""
        return self._calls.snapshot()

    def reset(self) -> None:
        """Forget every call, every scripted failure and what the provider keeps."""
        self._calls.clear()
        self._failures.clear()
        self._forget()

    def _forget(self) -> None:
        """Forget what the provider keeps (messages, posts…)."""


async def request_params(request: web.Request) -> dict[str, Any]:
    """The query parameters and the body's, JSON or form-encoded (as the SDKs send them)."""
    params: dict[str, Any] = dict(request.query)
    if request.can_read_body:
        if request.content_type == "application/json":
            body = await request.json()
            if isinstance(body, dict):
                params.update(body)
        else:
            form = await request.post()
            params.update({key: str(value) for key, value in form.items()})
    return params


def dropped(request: web.Request) -> web.Response:
    """Close the connection without an answer: the client sees the server disconnect.
    (aiohttp wants a response from the handler; this one is never sent.)"""
    if request.transport is not None:
        request.transport.close()
    return web.Response(status=204)


def retry_after_header(seconds: float) -> str:
    """Retry-After for a delay in seconds."""
    # delay-seconds is an integer in RFC 9110; fractions are kept for fast tests.
    return str(int(seconds)) if float(seconds).is_integer() else repr(float(seconds))
