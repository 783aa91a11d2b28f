"""A loopback HTTP sink for benchmarks: answers 200 to any POST, counts what it got.

Run it in its own process so it shares neither the event loop nor the GIL with the code
being measured:

    python bench/sink.py [--kind aiohttp|raw] [--port 0]

It prints `PORT <n>` on its first stdout line once it listens on 127.0.0.1, and exits
when its stdin closes (so it never outlives the process that started it) or on SIGTERM.
`GET /_stats` answers `{"posts": <count>, "bytes": <body bytes>}`.

Two servers, same behaviour:
- `aiohttp`: `aiohttp.web` with one catch-all handler and no access log.
- `raw`: a minimal HTTP/1.1 keep-alive server on `asyncio.Protocol` (Content-Length
  bodies only), several times faster than `aiohttp.web` — used to check that the sink is
  not what limits a measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from typing import Any

STATS_PATH = "/_stats"


class Counter:
    def __init__(self) -> None:
        self.posts = 0
        self.bytes = 0
        self.connections = 0

    def stats(self) -> bytes:
        return json.dumps(
            {"posts": self.posts, "bytes": self.bytes, "connections": self.connections}
        ).encode()


async def start_aiohttp(counter: Counter, port: int) -> tuple[int, Any]:
    from aiohttp import web

    # A client that gives up mid-request (a timed-out run) is not the sink's problem.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)

    async def handle(request: web.Request) -> web.Response:
        if request.method == "GET" and request.path == STATS_PATH:
            return web.Response(body=counter.stats(), content_type="application/json")
        body = await request.read()
        if request.method == "POST":
            counter.posts += 1
            counter.bytes += len(body)
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    server_manager = runner.server
    assert server_manager is not None
    opened = server_manager.connection_made

    def connection_made(handler: Any, transport: Any) -> None:
        counter.connections += 1
        opened(handler, transport)

    server_manager.connection_made = connection_made  # type: ignore[method-assign]
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=4096)
    await site.start()
    server = site._server
    assert server is not None
    bound = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return bound, runner.cleanup


_OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"


class _RawHttp(asyncio.Protocol):
    """Just enough HTTP/1.1: request line, headers, Content-Length body, keep-alive."""

    def __init__(self, counter: Counter) -> None:
        self.counter = counter
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.counter.connections += 1

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].decode("latin-1")
            length = 0
            close = False
            lines = head.split("\r\n")
            for line in lines[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    length = int(value.strip())
                elif name == "connection" and value.strip().lower() == "close":
                    close = True
            if len(self.buffer) < end + 4 + length:
                return  # the body is still coming
            self.buffer = self.buffer[end + 4 + length :]
            method, _, rest = lines[0].partition(" ")
            path = rest.partition(" ")[0]
            assert self.transport is not None
            if method == "GET" and path == STATS_PATH:
                body = self.counter.stats()
                self.transport.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                )
            else:
                if method == "POST":
                    self.counter.posts += 1
                    self.counter.bytes += length
                self.transport.write(_OK)
            if close:
                self.transport.close()
                return


async def start_raw(counter: Counter, port: int) -> tuple[int, Any]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _RawHttp(counter), "127.0.0.1", port, backlog=4096)
    bound = server.sockets[0].getsockname()[1]

    async def cleanup() -> None:
        server.close()
        await server.wait_closed()

    return bound, cleanup


class _ParentWatch(asyncio.Protocol):
    def __init__(self, done: asyncio.Event) -> None:
        self.done = done

    def connection_lost(self, exc: Exception | None) -> None:
        self.done.set()


async def serve(kind: str, port: int) -> None:
    counter = Counter()
    start = start_raw if kind == "raw" else start_aiohttp
    bound, cleanup = await start(counter, port)
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)

    # Exit when the parent goes away: our stdin is its pipe, EOF means it closed or died.
    if not sys.stdin.isatty():
        await loop.connect_read_pipe(lambda: _ParentWatch(done), sys.stdin)

    print(f"PORT {bound}", flush=True)
    await done.wait()
    await cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=["aiohttp", "raw"], default="aiohttp")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    asyncio.run(serve(args.kind, args.port))


if __name__ == "__main__":
    main()
