"""The public side served live: the same renderer as the static files, from the store."""

from __future__ import annotations

import asyncio
import time

from broadcaster.core import Broadcaster
from broadcaster.errors import ConfigError
from broadcaster.site.render import render_site
from broadcaster.site.snapshot import public_state


def public_channel(broadcaster: Broadcaster) -> str:
    """The banner channel whose updates the live site shows."""
    wanted = broadcaster.settings.serve.public_channel
    banners = [n for n, c in broadcaster.channels.items() if c.config.type == "banner"]
    if wanted is not None:
        if wanted not in banners:
            raise ConfigError(
                f"serve.public_channel: '{wanted}' is not a banner channel — "
                f"banner channels: {', '.join(banners) or 'none'}"
            )
        return wanted
    if not banners:
        raise ConfigError(
            "serve needs a banner channel for its public side — add one with "
            'type = "banner" (see `broadcaster init`)'
        )
    return banners[0]


class LiveSite:
    """Renders the public side at most every `cache_seconds`, once for all requests."""

    def __init__(self, broadcaster: Broadcaster) -> None:
        self.broadcaster = broadcaster
        self.channel = public_channel(broadcaster)
        self.languages = broadcaster.channels[self.channel].languages
        self.cache_seconds = broadcaster.settings.serve.site_cache_seconds
        self._files: dict[str, bytes] = {}
        self._rendered_at = float("-inf")
        self._lock = asyncio.Lock()

    async def files(self) -> dict[str, bytes]:
        """Relative path -> content, as `render_site` makes them."""
        if time.monotonic() - self._rendered_at < self.cache_seconds:
            return self._files
        async with self._lock:  # one render for a burst of requests
            if time.monotonic() - self._rendered_at >= self.cache_seconds:
                state = await public_state(
                    self.broadcaster.store,
                    self.broadcaster.settings,
                    channel=self.channel,
                    languages=self.languages,
                )
                self._files = render_site(state)
                self._rendered_at = time.monotonic()
        return self._files
