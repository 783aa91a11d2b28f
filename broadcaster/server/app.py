"""The HTTP app of `broadcaster serve`: health, the live public side, and dispatch.

While it runs, the app holds the store's dispatcher lease (through the embedded
backend), so CLI commands on the same store only watch while it sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Iterator

import uvicorn
from fastapi import FastAPI, HTTPException, Response
from fastapi.responses import JSONResponse

from broadcaster.core import Broadcaster
from broadcaster.server.hooks import hooks_router
from broadcaster.server.live_site import LiveSite

_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".json": "application/json",
    ".js": "text/javascript; charset=utf-8",
    ".atom": "application/atom+xml; charset=utf-8",
}
# Public and cacheable for a few seconds: during an outage the page may be hit hard.
_PUBLIC_HEADERS = {"Cache-Control": "public, max-age=10", "Access-Control-Allow-Origin": "*"}


def create_app(broadcaster: Broadcaster, *, dispatch: bool = True) -> FastAPI:
    """The app; with `dispatch`, it also drives deliveries while it runs."""
    site = LiveSite(broadcaster)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        stop = asyncio.Event()
        worker = asyncio.create_task(broadcaster.dispatch_until(stop)) if dispatch else None
        try:
            yield
        finally:
            # Graceful: in-flight sends finish and their outcomes are recorded.
            stop.set()
            if worker is not None:
                await worker

    app = FastAPI(
        title="incident-broadcaster",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )

    app.include_router(hooks_router(broadcaster))

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        """The process answers."""
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> JSONResponse:
        """Ready when the store answers and no due delivery has waited too long."""
        problem = await broadcaster.dispatch_problem()
        if problem is not None:
            return JSONResponse({"status": "not ready", "reason": problem}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/{path:path}", include_in_schema=False)
    async def public(path: str) -> Response:
        """The status page, status JSON, banner.js, feeds and Statuspage-style JSON."""
        files = await site.files()
        name = path.strip("/")
        if not name or name == site.languages[0]:
            name = "index.html"  # the default language lives at the root
        elif f"{name}/index.html" in files:
            name = f"{name}/index.html"
        content = files.get(name)
        if content is None:
            raise HTTPException(status_code=404, detail="no such page")
        suffix = name[name.rfind(".") :]
        return Response(
            content,
            media_type=_CONTENT_TYPES.get(suffix, "application/octet-stream"),
            headers=_PUBLIC_HEADERS,
        )

    return app


class GracefulServer(uvicorn.Server):
    """uvicorn's server, stopping on SIGINT/SIGTERM and then returning normally.

    uvicorn re-raises the signal after its graceful shutdown, which would kill the
    process before the store is closed; here the command ends and exits 0. A second
    Ctrl-C still forces the exit.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.handle_exit, sig, None)
        try:
            yield
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
