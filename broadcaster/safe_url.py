"""URLs that subscribers give us, and the guard that keeps them pointing outside.

A subscriber webhook is a URL a stranger typed: without a guard, `serve` would POST to
whatever it names — the cloud's metadata service, an admin port on localhost, a host on
the company network (server-side request forgery). So a URL must be https, and it may
only reach public addresses, unless the operator allows a network in config:

- at registration, every address its host resolves to is checked (`check_url`);
- at send time, the connection is made through `GuardedResolver`, which hands aiohttp
  only the addresses that pass: the address checked is the address connected to, so a
  DNS answer that changes between check and connect (DNS rebinding) gains nothing.
  Redirects are not followed (the caller passes `allow_redirects=False`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from aiohttp.abc import ResolveResult
from aiohttp.resolver import ThreadedResolver

from broadcaster.subscribers import InvalidSubscriberError

__all__ = [
    "GuardedResolver",
    "UnsafeUrlError",
    "UrlPolicy",
    "check_url",
    "normalise_url",
]

MAX_URL_LENGTH = 2048
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class UnsafeUrlError(InvalidSubscriberError):
    """A URL we will not call: not https, or its host is not a public address."""


def normalise_url(raw: str) -> str:
    """The URL as given, if it has the form of one we could call (http(s), a host, no
    credentials before the host); UnsafeUrlError otherwise. Where it points is
    `check_url`'s business."""
    url = raw.strip()
    if len(url) > MAX_URL_LENGTH:
        raise UnsafeUrlError(f"webhook URL is longer than {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number
    except ValueError:
        raise UnsafeUrlError("webhook URL is not a URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UnsafeUrlError("webhook URL must start with https:// and name a host")
    if "@" in parts.netloc:
        raise UnsafeUrlError(
            "webhook URL must not carry a user and password before the host "
            "(put a token in the path or query)"
        )
    if any(c.isspace() for c in url):
        raise UnsafeUrlError("webhook URL must not contain spaces")
    return url


@dataclass(frozen=True)
class UrlPolicy:
    """Where subscriber URLs may point: public addresses over https, plus the networks
    the operator allows (a partner on the company network, the local simulators)."""

    allow_networks: Sequence[IpNetwork] = field(default_factory=tuple)
    allow_http: bool = False

    def refusal(self, address: str) -> str | None:
        """Why this IP address may not be called, or None when it may."""
        try:
            ip: IpAddress = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return f"{address} is not an IP address"
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
        if any(ip in network for network in self.allow_networks):
            return None
        if ip.is_global and not ip.is_multicast:
            return None
        kind = (
            "loopback"
            if ip.is_loopback
            else "link-local"
            if ip.is_link_local
            else "private"
            if ip.is_private
            else "not public"
        )
        return f"{ip} is a {kind} address (allow its network in the channel's allow_networks)"

    def check_scheme(self, url: str) -> str:
        """The URL's host, if its scheme is allowed; UnsafeUrlError otherwise."""
        parts = urlsplit(url)
        allowed = ("https", "http") if self.allow_http else ("https",)
        if parts.scheme not in allowed or not parts.hostname:
            raise UnsafeUrlError("webhook URL must be https://")
        return parts.hostname


def ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


async def check_url(url: str, policy: UrlPolicy) -> None:
    """Refuse (UnsafeUrlError) a URL that is not https or whose host resolves, even
    partly, to an address the policy refuses, or does not resolve at all."""
    host = policy.check_scheme(normalise_url(url))
    if ip_literal(host):
        addresses = [host]
    else:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, 443, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError):
            raise UnsafeUrlError(f"webhook URL: host '{host}' does not resolve") from None
        addresses = sorted({str(info[4][0]) for info in infos})
    for address in addresses:
        refusal = policy.refusal(address)
        if refusal is not None:
            raise UnsafeUrlError(f"webhook URL: {host}: {refusal}")


class GuardedResolver(ThreadedResolver):
    """aiohttp's threaded resolver, keeping only the addresses the policy allows; none
    left is a connection error naming the refusal. Pair it with a check of IP-literal
    hosts, which aiohttp connects to without asking the resolver."""

    def __init__(self, policy: UrlPolicy) -> None:
        super().__init__()
        self.policy = policy

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await super().resolve(host, port, family)
        allowed = [r for r in found if self.policy.refusal(r["host"]) is None]
        if not allowed:
            refusals = {self.policy.refusal(r["host"]) for r in found}
            raise OSError(f"{host}: {'; '.join(sorted(r for r in refusals if r))}")
        return allowed
