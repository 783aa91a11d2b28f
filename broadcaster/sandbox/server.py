"""What every provider simulator shares: an aiohttp app on 127.0.0.1 (an ephemeral port
by default), run in the caller's event loop (`async with`) or on a thread of its own
(`with`, `start_in_thread`) for code under test that runs its own loop or process."""

from __future__ import annotations

import asyncio
import threading
from abc import ABC, abstractmethod
from types import TracebackType
from typing import ClassVar, Self

from aiohttp import web


class SimulatorServer(ABC):
    """Start, stop and address one simulator; subclasses provide `_app()`."""

    what: ClassVar[str] = "the simulator"  # for error messages
    # Stopping must not wait for a request scripted to be slow.
    stop_grace_seconds: ClassVar[float] = 0.5

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self._host, self._port = host, port
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
            await web.TCPSite(runner, self._host, self._port).start()
        except BaseException:
            await runner.cleanup()
            raise
        host, port = runner.addresses[0][:2]
        self._runner, self._url = runner, f"http://{host}:{port}"

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
