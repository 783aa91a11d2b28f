"""The HTTP app of `broadcaster serve`: health, the live public side, and dispatch.

While it runs, the app holds the store's dispatcher lease (through the embedded
backend), so CLI commands on the same store only watch while it sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import uvicorn
from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from broadcaster.config import ServeSettings
from broadcaster.core import Broadcaster
from broadcaster.errors import BroadcasterError
from broadcaster.server.api import api_router, broadcaster_error
from broadcaster.server.heartbeat import beat_while_ready
from broadcaster.server.hooks import bearer_matches, hooks_router
from broadcaster.server.inbound import InboundEndpoints, inbound_router
from broadcaster.server.limits import PerIpRateLimit
from broadcaster.server.live_site import LiveSite
from broadcaster.server.metrics import Metrics
from broadcaster.server.subscribe import subscribe_router
from broadcaster.site.media import CACHE_CONTROL, content_type

# Public and cacheable for a few seconds: during an outage the page may be hit hard.
_PUBLIC_HEADERS = {"Cache-Control": CACHE_CONTROL, "Access-Control-Allow-Origin": "*"}


def create_app(broadcaster: Broadcaster, *, dispatch: bool = True) -> FastAPI:
    """The app; with `dispatch`, it also drives deliveries while it runs."""
    site = LiveSite(broadcaster)
    inbound = InboundEndpoints(broadcaster)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        stop = asyncio.Event()
        worker = asyncio.create_task(broadcaster.dispatch_until(stop)) if dispatch else None
        heartbeat = asyncio.create_task(beat_while_ready(broadcaster, stop))
        inbound.start()  # registers webhooks (Telegram's support bot) in the background
        try:
            yield
        finally:
            # Graceful: in-flight sends finish and their outcomes are recorded.
            stop.set()
            heartbeat.cancel()  # a heartbeat in flight must not hold the exit up
            if worker is not None:
                await worker
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
            await inbound.close()

    app = FastAPI(
        title="incident-broadcaster",
        lifespan=lifespan,
        docs_url="/v1/docs",
        redoc_url=None,
        openapi_url="/v1/openapi.json",
    )
    app.add_exception_handler(BroadcasterError, broadcaster_error)
    # Routes are matched in order: the webhooks, the busiest, first.
    hooks = hooks_router(broadcaster)
    app.include_router(hooks)
    app.include_router(api_router(broadcaster))
    app.include_router(
        inbound_router(inbound, max_body_bytes=broadcaster.settings.hooks.max_body_bytes)
    )
    if broadcaster.settings.subscribers.self_service:
        # Before the public side's catch-all route; the form speaks the site's languages.
        app.include_router(subscribe_router(broadcaster, languages=site.languages))
    metrics = Metrics(broadcaster)
    hook_sources = {
        route.path.removeprefix("/hooks/") for route in hooks.routes if isinstance(route, APIRoute)
    }

    serve = broadcaster.settings.serve
    # Outermost first: the real client address, then counting (429s included), then limits.
    app.add_middleware(
        PerIpRateLimit,
        limits=serve.rate_limit_per_ip,
        on_refusal=lambda limit: metrics.rate_limited.labels(limit).inc(),
    )
    app.add_middleware(HookRequestCounter, metrics=metrics, sources=hook_sources)
    app.add_middleware(ProxyHeadersMiddleware, trusted_hosts=serve.trusted_proxies)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus(request: Request) -> Response:
        """Prometheus metrics; a bearer token when `serve.metrics_token` is set."""
        ref = broadcaster.settings.serve.metrics_token
        if ref is not None:
            expected = ref.resolve(broadcaster.settings.resolve_path(Path(".")))
            if expected is None or not bearer_matches(
                request.headers.get("authorization"), expected.get_secret_value()
            ):
                raise HTTPException(status_code=401, detail="metrics need the bearer token")
        return Response(await metrics.render(), media_type=CONTENT_TYPE_LATEST)

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
    async def public(path: str, request: Request) -> Response:
        """The status page, status JSON, banner.js, feeds and Statuspage-style JSON."""
        answer = site.locate(path, request.headers.get("accept-language"))
        headers = {**_PUBLIC_HEADERS, **answer.headers}
        if answer.redirect is not None:
            return RedirectResponse(answer.redirect, status_code=302, headers=headers)
        name = answer.name or ""
        content = (await site.files()).get(name)
        if content is None:
            raise HTTPException(status_code=404, detail="no such page")
        return Response(content, media_type=content_type(name), headers=headers)

    return app


def server_config(
    app: ASGIApp, settings: ServeSettings, *, host: str | None = None, port: int | None = None
) -> uvicorn.Config:
    """uvicorn's settings for the app, as `serve` runs it.

    Forwarded headers are the app's job (it believes only `serve.trusted_proxies`, not
    uvicorn's FORWARDED_ALLOW_IPS), and log lines are the root handler's
    (`broadcaster.logs`), uvicorn's access lines included."""
    config = uvicorn.Config(
        app,
        host=host or settings.host,
        port=settings.port if port is None else port,
        lifespan="on",
        proxy_headers=False,
        log_config=None,
        log_level="info",
    )
    # Access lines are INFO records of "uvicorn.access": switched by its level, because
    # uvicorn's own `access_log=False` detaches that logger for the whole process.
    access = logging.INFO if settings.access_log else logging.WARNING
    for name in ("uvicorn.error", "uvicorn.access"):
        # Another uvicorn in this process may have configured them with its own handlers.
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    logging.getLogger("uvicorn.access").setLevel(access)
    return config


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


class HookRequestCounter:
    """Counts monitoring webhook requests by source and status (a plain ASGI middleware:
    Starlette's `BaseHTTPMiddleware` costs a task group and a stream per request)."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics, sources: set[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.sources = sources

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith("/hooks/"):
            await self.app(scope, receive, send)
            return
        source = path.removeprefix("/hooks/")
        # Unknown paths share one label: a scanner must not grow the metrics.
        label = source if source in self.sources else "other"

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.webhook_requests.labels(label, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)
