"""`POST /inbound/<channel>`: requests providers send to a channel (Telegram updates),
handed to the channel's `InboundEndpoint` as headers and raw bytes.

The server never imports an SDK and never parses these bodies: the endpoint
authenticates (before it parses) and answers. The body is size-limited like a
monitoring webhook's (`hooks.max_body_bytes`), and the path is an "inbound" one for the
per-address limit: refused requests spend the sender's tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from urllib.parse import quote

from fastapi import APIRouter, HTTPException, Request, Response
from starlette.background import BackgroundTask

from broadcaster.core import Broadcaster
from broadcaster.server.hooks import read_body
from channels.base import InboundEndpoint, InboundRequest

log = logging.getLogger("broadcaster.inbound")

PREFIX = "/inbound"


class InboundEndpoints:
    """The channels' endpoints while `serve` runs: opened at start (each told the URL
    Telegram & co. reach it at, from `serve.public_url`), closed at stop."""

    def __init__(self, broadcaster: Broadcaster) -> None:
        self.public_url = broadcaster.settings.serve.public_url
        self.endpoints: dict[str, InboundEndpoint] = {}
        for name, channel in broadcaster.channels.items():
            endpoint = channel.inbound()
            if endpoint is not None:
                self.endpoints[name] = endpoint
        self._opening: asyncio.Task[None] | None = None

    def url_of(self, channel: str) -> str | None:
        if self.public_url is None:
            return None
        return f"{self.public_url}{PREFIX}/{quote(channel, safe='')}"

    def start(self) -> None:
        """Open every endpoint in the background: a provider may call as soon as its
        webhook is registered, so the server must be listening by then, and a slow
        provider must not hold up the start."""
        self._opening = asyncio.create_task(self._open_all(), name="inbound-open")

    async def _open_all(self) -> None:
        for name, endpoint in self.endpoints.items():
            try:
                await endpoint.open(self.url_of(name))
            except Exception:
                log.exception("%s: inbound endpoint did not open", name, extra={"channel": name})

    async def close(self) -> None:
        if self._opening is not None:
            self._opening.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._opening
        for name, endpoint in self.endpoints.items():
            try:
                await endpoint.close()
            except Exception:
                log.exception("%s: inbound endpoint did not close", name)


def inbound_router(endpoints: InboundEndpoints, *, max_body_bytes: int) -> APIRouter:
    """POST /inbound/{channel}, for the channels whose config turns receiving on."""
    router = APIRouter(
        prefix=PREFIX,
        tags=["provider callbacks"],
        responses={
            400: {"description": "the body is not what the provider sends"},
            401: {"description": "the provider's secret is missing or wrong"},
            404: {"description": "this channel receives nothing (or has no secret set)"},
            413: {"description": "body over hooks.max_body_bytes"},
            429: {"description": "too many refused requests from this address"},
        },
    )

    @router.post("/{channel}")
    async def inbound(channel: str, request: Request) -> Response:
        """A provider's request to a channel (Telegram: the support bot's updates)."""
        endpoint = endpoints.endpoints.get(channel)
        if endpoint is None:
            raise HTTPException(status_code=404, detail="no channel receives requests here")
        body = await read_body(request, max_body_bytes)
        headers = {key.lower(): value for key, value in request.headers.items()}
        reply = await endpoint.handle(InboundRequest(headers=headers, body=body))
        return Response(
            reply.body,
            status_code=reply.status,
            media_type=reply.content_type,
            background=BackgroundTask(reply.then) if reply.then is not None else None,
        )

    return router
