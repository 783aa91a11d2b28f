"""The public side served live: the same renderer as the static files, from the store."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from broadcaster.core import Broadcaster
from broadcaster.errors import ConfigError
from broadcaster.server.languages import negotiate_language
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


@dataclass(frozen=True)
class PublicAnswer:
    """What a request for the public side gets: a file of the site, or a redirect.

    `redirect` is relative to the requested URL, so the site also works behind a
    proxy that serves it under a sub-path.
    """

    name: str | None = None
    redirect: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


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
                if state.status_page_url is None:
                    # Served from here: the absolute links (feeds, Statuspage JSON) point here.
                    public_url = self.broadcaster.settings.serve.public_url
                    state = state.model_copy(update={"status_page_url": public_url})
                self._files = await asyncio.to_thread(render_site, state)
                self._rendered_at = time.monotonic()
        return self._files

    def locate(self, path: str, accept_language: str | None) -> PublicAnswer:
        """Which file answers `path`; `/` alone picks the language by `Accept-Language`.

        Only the bare root negotiates. `index.html` (the default language, which the
        language switch links to) and `<lang>/` are fixed, so a visitor who picks English
        on a French browser stays in English, and those URLs cache without `Vary`.
        Directories without their slash, and the default language by name, redirect to
        the URL whose relative links work.
        """
        default = self.languages[0]
        if path == "":
            wanted = negotiate_language(accept_language, self.languages, default)
            vary = {"Vary": "Accept-Language"}
            if wanted == default:
                return PublicAnswer(name="index.html", headers={**vary, "Content-Language": wanted})
            return PublicAnswer(redirect=f"{wanted}/", headers=vary)
        if path in (default, f"{default}/", f"{default}/index.html"):
            # The root page's links are relative to the root: served here they would break.
            return PublicAnswer(redirect="../" * path.count("/") + "index.html")
        if path in self.languages:
            return PublicAnswer(redirect=f"{path}/")
        name = f"{path}index.html" if path.endswith("/") else path
        language = next(
            (code for code in self.languages if name == f"{code}/index.html"),
            default if name == "index.html" else None,
        )
        return PublicAnswer(
            name=name, headers={"Content-Language": language} if language is not None else {}
        )
