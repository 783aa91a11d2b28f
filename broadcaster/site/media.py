"""How the public side's files are served: media type and caching, the same for the live
server (`broadcaster serve`) and for a bucket behind a CDN (the banner channel)."""

from __future__ import annotations

from pathlib import PurePosixPath

__all__ = ["CACHE_CONTROL", "content_type"]

_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".json": "application/json",
    ".js": "text/javascript; charset=utf-8",
    ".atom": "application/atom+xml; charset=utf-8",
}

# Public and cacheable for a few seconds: during an outage the page may be hit hard, and a
# cache in front absorbs that, while a new update still shows within seconds.
CACHE_CONTROL = "public, max-age=10"


def content_type(path: str) -> str:
    """The Content-Type of a site file, from its suffix."""
    return _CONTENT_TYPES.get(PurePosixPath(path).suffix, "application/octet-stream")
